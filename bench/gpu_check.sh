#!/usr/bin/env bash
# One prepared check of this project on a GPU machine. Parts 1 and 2 took 154 s on one H200 (bench/results/
# gpu_check_h200.json); part 3 has not run on a GPU yet. Each part has a timeout (270, 210 and 420 s: the worst case
# is 15 minutes; GPU_CHECK_ENGINES=0 keeps it under 9). Run it from anywhere; it works in the repository root:
#
#   PYTHONPATH=/tmp/site:. bash bench/gpu_check.sh              # python3 with torch+CUDA; our wheels in /tmp/site
#   GPU_CHECK_CPU_SMOKE=1 bash bench/gpu_check.sh               # on a CPU: tiny sizes, checks the script's paths
#
# Part 1: the tiny pipeline (recipes/tiny/pipeline.yaml: pretrain, SFT, reward, PPO, eval) in bf16 (training.bf16
#         for the Trainer stages, training.mixed_precision: bf16 for PPO): wall time and each stage's metrics.
# Part 2: bench/flops.py --device cuda --dtype bf16: the bf16 matmul rate and the GPT-2-small PPO benchmark:
#         episodes/s, torch.cuda.max_memory_allocated, each phase's model FLOP/s as a fraction of the measured bf16
#         matmul rate and of the GPU's nominal dense bf16 peak.
# Part 3: bench/engines_check.sh: rlhf sft, ppo and dpo under fsdp.yaml, sft under zero2/zero3.yaml and ppo under
#         zero2.yaml when DeepSpeed imports, on part 1's models (GPU_CHECK_ENGINES=0 skips it; engines_check.json).
#         Alone, with the tiny pipeline's models kept: bash bench/engines_check.sh TINY_RUNS (under 10 minutes).
# Then a summary. Nothing is fetched (HF_HUB_OFFLINE); the programs run as `python3 -m rlhf_pipeline` and
# `python3 bench/flops.py` (no entry point, no venv). Everything it keeps goes to ${OUT:-/tmp/gpu_check}: two files,
# gpu_check.log (all output) and gpu_check.json (versions, each part's status, times and figures). Scratch (the
# pipeline's runs, the models) lives in a temporary directory, removed at the end (GPU_CHECK_KEEP=1 keeps it).
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_CPU_SMOKE=1, GPU_CHECK_KEEP=1,
# GPU_CHECK_PIPELINE_TIMEOUT / GPU_CHECK_FLOPS_TIMEOUT (seconds; defaults 270 / 210).

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
mkdir -p "$OUT" || exit 2
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.json"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)" || exit 2
: > "$LOG"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

PIPELINE_TIMEOUT="${GPU_CHECK_PIPELINE_TIMEOUT:-270}"
FLOPS_TIMEOUT="${GPU_CHECK_FLOPS_TIMEOUT:-210}"
if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    # small enough for a few minutes on 2 CPU cores: each Trainer stage a few steps, PPO 2 updates; no gate
    # (TrainingArguments wants use_cpu for bf16 without a GPU)
    PIPELINE_SETS=(--set 'stages.pretrain.set={"training.bf16": true, "training.use_cpu": true, "training.max_steps": 20}'
                   --set 'stages.sft.set={"training.bf16": true, "training.use_cpu": true, "training.max_steps": 10}'
                   --set 'stages.reward.set={"training.bf16": true, "training.use_cpu": true, "training.max_steps": 10}'
                   --set 'stages.ppo.set={"training.mixed_precision": "bf16", "training.total_episodes": 128, "training.eval_prompts": 32}'
                   --set 'gate.min_reward_accuracy=null')
    FLOPS_ARGS=(--device cpu --dtype bf16 --smoke)
else
    DEVICE=cuda
    PIPELINE_SETS=(--set 'stages.pretrain.set={"training.bf16": true}'
                   --set 'stages.sft.set={"training.bf16": true}'
                   --set 'stages.reward.set={"training.bf16": true}'
                   --set 'stages.ppo.set={"training.mixed_precision": "bf16"}')
    FLOPS_ARGS=(--device cuda --dtype bf16)
fi

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
banner() { printf '\n========== %s (%s) ==========\n' "$1" "$(date -u +%H:%M:%S)"; }

START="$(now)"
banner "environment"
echo "repo: $(pwd)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')  smoke: $SMOKE  out: $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader
"$PY" - <<'EOF' > "$WORK/environment.json"
import importlib.metadata as m, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "pydantic", "typer", "tensorboard"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
try:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                      "bf16": torch.cuda.is_bf16_supported()}
except Exception as exc:  # noqa: BLE001
    out["torch_error"] = repr(exc)
print(json.dumps(out))
EOF
cat "$WORK/environment.json"
"$PY" - <<'EOF'
import importlib.metadata as m
try:
    major, minor = (int(x) for x in m.version("transformers").split(".")[:2])
    if (major, minor) < (5, 20):
        print(f"WARNING: transformers {m.version('transformers')} is older than this project's 5.20 (pyproject.toml): "
              "install the pinned wheels first (constraints.txt); the Trainer stages may refuse recipe keys")
except m.PackageNotFoundError:
    print("WARNING: transformers is not installed")
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "WARNING: torch sees no CUDA device; the parts below will fail (GPU_CHECK_CPU_SMOKE=1 runs them on the CPU)"
fi

# ---------------------------------------------------------------------------------------------------------------
banner "part 1: tiny pipeline in bf16 (timeout ${PIPELINE_TIMEOUT}s)"
T0="$(now)"
timeout --kill-after=20 "$PIPELINE_TIMEOUT" "$PY" -m rlhf_pipeline pipeline recipes/tiny/pipeline.yaml \
    --set "output_dir=$WORK/tiny" "${PIPELINE_SETS[@]}"
PIPELINE_RC=$?
PIPELINE_S="$(elapsed "$T0" "$(now)")"
echo "part 1: exit code $PIPELINE_RC, wall ${PIPELINE_S}s"
"$PY" - "$WORK/tiny" <<'EOF' > "$WORK/pipeline_metrics.json"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
keys = ["train_runtime", "train_loss", "eval_loss", "eval_accuracy", "eval_margin", "eval_score_before",
        "eval_score_after", "eval_gold_before", "eval_gold_after", "eval_kl", "episodes_per_second", "win_rate",
        "policy_gold", "reward_accuracy"]
out = {}
for stage in ("pretrain", "sft", "reward", "ppo", "eval"):
    path = root / stage / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
        out[stage] = {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
print(json.dumps(out))
EOF
"$PY" - "$WORK/pipeline_metrics.json" <<'EOF'
import json, sys
metrics = json.loads(open(sys.argv[1]).read() or "{}")
for stage, row in metrics.items():
    print(f"  {stage:<9}" + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
if not metrics:
    print("  (no stage finished)")
EOF

# ---------------------------------------------------------------------------------------------------------------
banner "part 2: bench/flops.py ${FLOPS_ARGS[*]} (timeout ${FLOPS_TIMEOUT}s)"
T0="$(now)"
timeout --kill-after=20 "$FLOPS_TIMEOUT" "$PY" bench/flops.py "${FLOPS_ARGS[@]}" --workdir "$WORK/flops" \
    --out "$WORK/flops.json"
FLOPS_RC=$?
FLOPS_S="$(elapsed "$T0" "$(now)")"
echo "part 2: exit code $FLOPS_RC, wall ${FLOPS_S}s"

# ---------------------------------------------------------------------------------------------------------------
ENGINES_TIMEOUT="${GPU_CHECK_ENGINES_TIMEOUT:-420}"
if [ "$SMOKE" = 1 ] || [ "${GPU_CHECK_ENGINES:-1}" = 0 ]; then
    ENGINES_RC=0
    echo "part 3 (engines) skipped: it needs a GPU (FSDP and DeepSpeed)"
else
    banner "part 3: bench/engines_check.sh on the tiny pipeline's models (timeout ${ENGINES_TIMEOUT}s)"
    OUT="$OUT" PYTHON="$PY" timeout --kill-after=20 "$ENGINES_TIMEOUT" bash bench/engines_check.sh "$WORK/tiny"
    ENGINES_RC=$?
    echo "part 3: exit code $ENGINES_RC ($OUT/engines_check.json)"
fi

# ---------------------------------------------------------------------------------------------------------------
banner "summary"
TOTAL_S="$(elapsed "$START" "$(now)")"
"$PY" - "$WORK" "$JSON" "$SMOKE" "$PIPELINE_RC" "$PIPELINE_S" "$FLOPS_RC" "$FLOPS_S" "$TOTAL_S" <<'EOF'
import json, sys
from pathlib import Path
work, out_path, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
pipeline_rc, pipeline_s, flops_rc, flops_s, total_s = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), \
    float(sys.argv[7]), float(sys.argv[8])

def read(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None

def status(rc):
    return "ok" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else f"FAILED (exit {rc})")

flops = read("flops.json")
summary = {"smoke": smoke, "total_seconds": total_s, "environment": read("environment.json"),
           "pipeline": {"status": status(pipeline_rc), "exit_code": pipeline_rc, "wall_seconds": pipeline_s,
                        "stages": read("pipeline_metrics.json")},
           "flops": {"status": status(flops_rc), "exit_code": flops_rc, "wall_seconds": flops_s, "result": flops}}
print(f"part 1, tiny pipeline bf16: {status(pipeline_rc)}, {pipeline_s:.0f} s")
print(f"part 2, GPT-2-small PPO:    {status(flops_rc)}, {flops_s:.0f} s")
if flops:
    mm, ppo, peak = flops.get("matmul") or {}, flops.get("ppo") or {}, flops.get("nominal_peak_tflops")
    if mm:
        print(f"  measured bf16 matmul rate (best square): {mm['limit_tflops']:.1f} TFLOP/s"
              + (f" = {100 * mm['limit_tflops'] / peak:.0f} % of the nominal {peak} TFLOP/s" if peak else ""))
    if ppo:
        print(f"  episodes/s {ppo['episodes_per_second']:.1f}; peak GPU memory (max_memory_allocated) "
              + (f"{ppo['peak_gpu_memory_bytes'] / 2**30:.2f} GiB" if ppo.get("peak_gpu_memory_bytes") else "n/a"))
        for phase, p in ppo["phases"].items():
            of_mm = p.get("fraction_of_matmul_rate")
            of_peak = p.get("fraction_of_nominal_peak")
            print(f"  {phase:<11}{p['seconds']:8.2f} s {p['tflops_per_s'] or 0:9.2f} TFLOP/s"
                  + (f"  {100 * of_mm:5.1f} % of measured matmul" if of_mm is not None else "")
                  + (f"  {100 * of_peak:5.1f} % of nominal peak" if of_peak is not None else ""))
print(f"total {total_s:.0f} s")
out_path.write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out_path}")
EOF
[ "${GPU_CHECK_KEEP:-0}" = 1 ] && echo "scratch kept: $WORK" || rm -rf "$WORK"
echo "log: $LOG"
RC=0
{ [ "$PIPELINE_RC" = 0 ] && [ "$FLOPS_RC" = 0 ] && [ "$ENGINES_RC" = 0 ]; } || RC=1
exec 1>&3 2>&4  # the log's writer gets its end of file: wait until it has written everything
wait "$TEE_PID" 2>/dev/null
exit "$RC"
