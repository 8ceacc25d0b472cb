#!/usr/bin/env bash
# The sharded engines on one GPU (called by bench/gpu_check.sh after its tiny pipeline, or alone): rlhf sft, rlhf ppo
# (with checkpoints) and rlhf dpo launched with recipes/accelerate/fsdp.yaml (FSDP2, one process: every code path of
# the sharded run but the cross-GPU traffic), then, when DeepSpeed imports, rlhf sft with zero2.yaml and zero3.yaml
# and rlhf ppo with zero2.yaml. Each part is timed, its exit code and metrics go to $OUT/engines_check.json; a part that fails does not
# stop the next.
#
#   bash bench/engines_check.sh TINY_RUNS     # TINY_RUNS: a finished tiny pipeline's output dir (pretrain, sft, reward)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
TINY="${1:?usage: engines_check.sh TINY_RUNS}"
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/engines_check.XXXXXX)" || exit 2
mkdir -p "$OUT"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
LAUNCH=("$PY" -m accelerate.commands.accelerate_cli launch --num_processes 1 --mixed_precision bf16)
DATA=(--set training.bf16=true --set training.logging_steps=5)

part() {  # part NAME TIMEOUT COMMAND...: run, time, record exit code and the run's metrics
    local name="$1" limit="$2"; shift 2
    printf '\n---------- engines: %s (timeout %ss) ----------\n' "$name" "$limit"
    local t0; t0="$(date +%s.%N)"
    timeout --kill-after=15 "$limit" "$@"
    local rc=$?
    local seconds; seconds="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    echo "engines: $name: exit code $rc, ${seconds}s"
    "$PY" - "$name" "$rc" "$seconds" "$WORK/$name/metrics.json" >> "$RESULTS" <<'PYEOF'
import json, sys
from pathlib import Path
name, rc, seconds, metrics = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
keep = ("train_runtime", "train_loss", "eval_loss", "train_steps", "saved", "episodes_per_second", "eval_score_before",
        "eval_score_after", "eval_gold_before", "eval_gold_after", "eval_kl", "peak_memory_bytes")
row = {"part": name, "exit_code": rc, "seconds": seconds}
if metrics.is_file():
    data = json.loads(metrics.read_text())
    row["metrics"] = {k: data[k] for k in keep if k in data}
print(json.dumps(row))
PYEOF
}

part fsdp-sft 120 "${LAUNCH[@]}" --config_file recipes/accelerate/fsdp.yaml -m rlhf_pipeline sft recipes/tiny/sft.yaml \
    --set "model.name_or_path=$TINY/pretrain" --set training.max_steps=30 "${DATA[@]}" --output-dir "$WORK/fsdp-sft"
part fsdp-ppo 150 "${LAUNCH[@]}" --config_file recipes/accelerate/fsdp.yaml -m rlhf_pipeline ppo recipes/tiny/ppo.yaml \
    --set "policy.name_or_path=$TINY/sft" --set "reward.model=$TINY/reward" --set training.total_episodes=256 \
    --set training.mixed_precision=bf16 --set training.eval_prompts=64 --set training.save_every=2 \
    --output-dir "$WORK/fsdp-ppo"
part fsdp-dpo 150 "${LAUNCH[@]}" --config_file recipes/accelerate/fsdp.yaml -m rlhf_pipeline dpo recipes/tiny/dpo.yaml \
    --set "model.name_or_path=$TINY/sft" --set training.max_steps=30 --set evaluation.prompts=64 "${DATA[@]}" \
    --output-dir "$WORK/fsdp-dpo"
if "$PY" -c "import deepspeed" 2>/dev/null; then
    for stage in 2 3; do
        part "zero$stage-sft" 150 "${LAUNCH[@]}" --config_file "recipes/accelerate/zero$stage.yaml" -m rlhf_pipeline sft \
            recipes/tiny/sft.yaml --set "model.name_or_path=$TINY/pretrain" --set training.max_steps=30 "${DATA[@]}" \
            --output-dir "$WORK/zero$stage-sft"
    done
    part zero2-ppo 150 "${LAUNCH[@]}" --config_file recipes/accelerate/zero2.yaml -m rlhf_pipeline ppo \
        recipes/tiny/ppo.yaml --set "policy.name_or_path=$TINY/sft" --set "reward.model=$TINY/reward" \
        --set training.total_episodes=256 --set training.mixed_precision=bf16 --set training.eval_prompts=64 \
        --set training.save_every=2 --output-dir "$WORK/zero2-ppo"
else
    echo "engines: DeepSpeed does not import here: the ZeRO parts were not run"
fi
"$PY" - "$RESULTS" "$OUT/engines_check.json" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
open(sys.argv[2], "w").write(json.dumps(rows, indent=1) + "\n")
for row in rows:
    print(f"  {row['part']:<18} exit {row['exit_code']:<4} {row['seconds']:6.1f} s  {row.get('metrics', {})}")
PYEOF
rm -rf "$WORK"
