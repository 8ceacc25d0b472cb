#!/usr/bin/env python
"""Check `rlhf plan`'s memory estimate against measured peaks: real stages, run one at a time.

    .venv/bin/python bench/plan_check.py                         # every setting, ~10 min on 2 CPU cores
    .venv/bin/python bench/plan_check.py --settings tiny-sft gpt2-small-ppo
    .venv/bin/python bench/plan_check.py --show bench/results/plan_check.json

Each setting runs a stage (`rlhf sft|reward|ppo RECIPE --set ... --output-dir WORKDIR/...`) in a child process and
asks `rlhf plan` (same recipe, same --set, --json) what it expects:

- on a CPU, the measure is the child's peak RSS (getrusage ru_maxrss, read when it exits) minus the peak RSS of a
  child that only imports the runtime a stage imports (torch, transformers, trl, peft, accelerate, datasets,
  tokenizers, matplotlib and our stage modules) and runs one tiny matmul to start the thread pool. What is left is the
  stage's own memory: tensors, plus what the estimate deliberately leaves out (Python objects, the data in host
  memory, allocator slack), which is part of the reported error. The plan is asked for one CPU process (an
  Accelerate config with use_cpu: true, written into the workdir);
- with a GPU (torch.cuda.is_available() in the child), the measure is torch.cuda.max_memory_allocated(): tensors
  only, the CUDA context excluded, as in the estimate. The plan is asked for one GPU (no Accelerate config).

Error = (estimate - measured) / measured. Settings:

  tiny-sft, tiny-reward, tiny-ppo   recipes/tiny/{sft,reward,ppo}.yaml on the tiny default's models (runs/tiny, made
                                    by `rlhf pipeline recipes/tiny/pipeline.yaml`; --tiny-runs elsewhere), fewer steps
  gpt2-small-sft                    a random-init GPT-2-small (12 x 768, vocabulary 50,257, 128 positions: 124M),
                                    built locally with the tiny tokenizer, SFT on the tiny demonstrations
  gpt2-small-ppo                    the same as policy and as reward model: PPO, full fine-tuning, value head shared,
                                    reference a frozen copy
  gpt2-small-ppo-lora               the same with LoRA r=16 (reference: the adapter disabled)
  with a GPU, also: gpt2-small-sft-bf16 and gpt2-small-ppo-bf16 (bf16 autocast), and gpt2-small-sft-1024,
  -1024-bf16, -1024-checkpointing (a 1,024-position GPT-2-small, 8 texts of 1,024 tokens per step)

Results: bench/results/plan_check.json (--out). Needs only the standard library here; the children run in this
interpreter's environment (the project's venv).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/rlhf-plan-check")
DEFAULT_OUT = REPO / "bench" / "results" / "plan_check.json"
# The plan of a CPU run: one process on the CPU (an Accelerate config the benchmark writes into its workdir).
CPU_CONFIG = ("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\nnum_machines: 1\n"
              "num_processes: 1\nuse_cpu: true\n")
MIB = 1024**2

# The stage in a child; its peak memory written when it exits (atexit runs on the CLI's sys.exit).
CHILD = r"""
import atexit, json, resource, sys
out = sys.argv[1]
sys.argv = ["rlhf"] + sys.argv[2:]

def report():
    data = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        data.update(cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                    cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(), device=torch.cuda.get_device_name())
    with open(out, "w") as handle:
        json.dump(data, handle)

atexit.register(report)
import os
if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # pinned: PPO would raise glibc's thresholds again (keep_freed_memory)
    import rlhf_pipeline.ppo.trainer as trainer
    trainer.keep_freed_memory = lambda: False
from rlhf_pipeline.cli import main
main()
"""

# The runtime alone: what every stage imports, and a matmul small enough to leave no trace but start the threads.
BASELINE = r"""
import json, resource, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import torch, transformers, trl, peft, accelerate, datasets, tokenizers  # noqa: F401
from trl import DPOTrainer, RewardTrainer, SFTTrainer  # noqa: F401
from accelerate import Accelerator  # noqa: F401
import rlhf_pipeline.stages.sft, rlhf_pipeline.stages.reward, rlhf_pipeline.stages.ppo  # noqa: F401
import rlhf_pipeline.ppo.trainer, rlhf_pipeline.ppo.modules, rlhf_pipeline.held_out  # noqa: F401
x = torch.ones(64, 64)
(x @ x).sum().item()
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cuda": torch.cuda.is_available()}))
"""

BUILD_SMALL = r"""
import json, sys, torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
tokenizer_dir, out, positions = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
kw = dict(vocab_size=max(50257, len(tok)), n_positions=positions, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
          pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
policy = GPT2LMHeadModel(GPT2Config(**kw))
policy.save_pretrained(out + "/policy")
tok.save_pretrained(out + "/policy")
torch.manual_seed(1)
reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **kw))
reward.save_pretrained(out + "/reward")
tok.save_pretrained(out + "/reward")
info = {"vocab_size": kw["vocab_size"], "policy_parameters": sum(p.numel() for p in policy.parameters()),
        "reward_parameters": sum(p.numel() for p in reward.parameters())}
json.dump(info, open(out + "/models.json", "w"), indent=1)
print(json.dumps(info))
"""


def settings(tiny: Path, small: Path, long_data: Path) -> dict[str, dict]:
    """name -> the stage command (rlhf <stage> <recipe> <--set ...>); every run writes under the workdir. Settings
    marked gpu run only where a GPU is (on 2 CPU cores they would take too long)."""
    quiet = ["training.disable_tqdm=true"]
    long = small.parent / "gpt2-small-1024"
    ppo_small = [f"policy.name_or_path={small / 'policy'}", f"reward.model={small / 'reward'}", "value.mode=shared",
                 "training.total_episodes=32", "training.rollout_batch_size=16", "training.num_mini_batches=2",
                 "training.ppo_epochs=1", "training.eval_prompts=16", "training.eval_batch_size=16", "gold=null"]
    sft_long = [f"model.name_or_path={long / 'policy'}", f"data.files={long_data}", "data.eval_size=8",
                "training.max_steps=3", "training.per_device_train_batch_size=8", "training.max_length=1024",
                "training.per_device_eval_batch_size=8", *quiet]
    return {
        "tiny-sft": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "set": [
            f"model.name_or_path={tiny / 'pretrain'}", "training.max_steps=40", *quiet]},
        "tiny-reward": {"stage": "reward", "recipe": "recipes/tiny/reward.yaml", "set": [
            f"model.name_or_path={tiny / 'sft'}", "training.max_steps=40", *quiet]},
        "tiny-ppo": {"stage": "ppo", "recipe": "recipes/tiny/ppo.yaml", "set": [
            f"policy.name_or_path={tiny / 'sft'}", f"reward.model={tiny / 'reward'}", "training.total_episodes=256"]},
        "gpt2-small-sft": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "set": [
            f"model.name_or_path={small / 'policy'}", "data.eval_size=32", "training.max_steps=4",
            "training.per_device_train_batch_size=16", "training.per_device_eval_batch_size=16",
            "training.learning_rate=1e-4", *quiet]},
        "gpt2-small-ppo": {"stage": "ppo", "recipe": "recipes/tiny/ppo.yaml", "set": [
            *ppo_small, "training.learning_rate=1e-5"]},
        "gpt2-small-ppo-lora": {"stage": "ppo", "recipe": "recipes/tiny/ppo.yaml", "set": [
            *ppo_small, "training.learning_rate=1e-4", "peft.r=16", "peft.dropout=0.0"]},
        "gpt2-small-sft-bf16": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "gpu": True, "set": [
            f"model.name_or_path={small / 'policy'}", "data.eval_size=32", "training.max_steps=4",
            "training.per_device_train_batch_size=16", "training.per_device_eval_batch_size=16",
            "training.learning_rate=1e-4", "training.bf16=true", *quiet]},
        "gpt2-small-ppo-bf16": {"stage": "ppo", "recipe": "recipes/tiny/ppo.yaml", "gpu": True, "set": [
            *ppo_small, "training.learning_rate=1e-5", "training.mixed_precision=bf16"]},
        "gpt2-small-sft-1024": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "gpu": True, "long": True,
                                "set": [*sft_long, "training.bf16=false"]},
        "gpt2-small-sft-1024-bf16": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "gpu": True, "long": True,
                                     "set": [*sft_long, "training.bf16=true"]},
        "gpt2-small-sft-1024-checkpointing": {"stage": "sft", "recipe": "recipes/tiny/sft.yaml", "gpu": True,
                                              "long": True, "set": [*sft_long, "training.bf16=true",
                                                                    "training.activation_checkpointing=true"]},
    }


def say(message: str) -> None:
    print(f"[plan_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_env(threads: int, pinned: bool = False) -> dict[str, str]:
    """The children's environment: offline, `threads` threads; `pinned`: glibc's mmap threshold fixed at 64 KiB, so
    that a freed tensor leaves the RSS (by default glibc raises the threshold, up to 32 MiB, each time a large block
    is freed, and the heap then keeps what later tensors of that size free: the RSS holds the heap's high-water mark
    and its fragmentation; our PPO trainer raises it to 1 GiB itself on a CPU, `keep_freed_memory`, which the pinned
    children switch off)."""
    env = dict(os.environ)
    if pinned:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "WANDB_DISABLED": "true", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def long_texts(path: Path, rows: int = 64, chars: int = 6000) -> Path:
    """Plain texts of about 1,500 tokens (the tiny tokenizer), joined from the tiny corpus: the 1,024-token settings
    are cut at max_length, so every batch is 1,024 tokens long."""
    import gzip

    if not path.exists():
        corpus = [json.loads(line)["text"] for line in
                  gzip.open(REPO / "recipes" / "tiny" / "data" / "corpus.jsonl.gz", "rt", encoding="utf-8")]
        texts, current = [], ""
        for text in corpus:
            current += text + " "
            if len(current) >= chars:
                texts.append({"text": current})
                current = ""
            if len(texts) == rows:
                break
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(t) + "\n" for t in texts))
    return path


def build_small_models(small: Path, tokenizer_dir: Path, env: dict[str, str], positions: int = 128) -> dict:
    info = small / "models.json"
    if not info.exists():
        say(f"building the random-init GPT-2-small policy and reward model in {small}")
        small.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([sys.executable, "-c", BUILD_SMALL, str(tokenizer_dir), str(small), str(positions)],
                             capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if out.returncode:
            raise SystemExit(f"building the GPT-2-small models failed:\n{out.stderr[-2000:]}")
    return json.loads(info.read_text())


def baseline(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, env=env, cwd=REPO,
                         check=False)
    if out.returncode:
        raise SystemExit(f"the baseline process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(spec: dict, cpu_config: Path | None, env: dict[str, str]) -> dict:
    """`rlhf plan --json` of the setting: for one CPU process (`cpu_config`), or for one GPU (None)."""
    cmd = [sys.executable, "-m", "rlhf_pipeline", "plan", spec["recipe"], *sum((["--set", s] for s in spec["set"]), []),
           "--json", *(["--accelerate-config", str(cpu_config)] if cpu_config else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if out.returncode:
        raise SystemExit(f"rlhf plan failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def measure(name: str, spec: dict, workdir: Path, env: dict[str, str]) -> dict:
    run_dir, report = workdir / "runs" / name, workdir / "runs" / f"{name}.json"
    report.unlink(missing_ok=True)
    log = workdir / "runs" / f"{name}.log"
    cmd = [sys.executable, "-c", CHILD, str(report), spec["stage"], spec["recipe"],
           *sum((["--set", s] for s in spec["set"]), []), "--output-dir", str(run_dir), "--overwrite"]
    t0 = time.time()
    with open(log, "w") as handle:
        rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
    if rc or not report.exists():
        tail = "".join(log.read_text().splitlines(True)[-25:])
        raise SystemExit(f"{name} failed (exit {rc}); the end of {log}:\n{tail}")
    return {**json.loads(report.read_text()), "wall_s": round(time.time() - t0, 1), "log": str(log),
            "command": ["rlhf", *cmd[4:]]}


def table(results: dict) -> str:
    if results.get("gpu"):
        lines = ["| setting | estimate (peak phase) | measured: torch.cuda.max_memory_allocated | error |",
                 "|---|---|---:|---:|"]
        for name, row in results["settings"].items():
            lines.append(f"| {name} | {row['estimate_mib']:,.1f} MiB ({row['peak_phase']}) | "
                         f"{row['measured_mib']['cuda']:,.1f} MiB | {100 * row['error']['cuda']:+.0f} % |")
        return "\n".join(lines)
    modes = [m for m in ("pinned", "default") if m in results["baseline_rss_mib"]]
    heads = {"pinned": "peak RSS - runtime, mmap threshold pinned", "default": "peak RSS - runtime, glibc default"}
    lines = ["| setting | estimate (peak phase) | " + " | ".join(f"{heads[m]} | error" for m in modes) + " |",
             "|---|---|" + "---:|---:|" * len(modes)]
    for name, row in results["settings"].items():
        cells = [f"{row['measured_mib'][m]:,.1f} MiB | {100 * row['error'][m]:+.0f} %" if m in row["measured_mib"]
                 else "- | -" for m in modes]
        lines.append(f"| {name} | {row['estimate_mib']:,.1f} MiB ({row['peak_phase']}) | " + " | ".join(cells) + " |")
    lines.append("\nruntime baseline (peak RSS of a process that only imported the libraries): " + ", ".join(
        f"{results['baseline_rss_mib'][m]:,.0f} MiB ({m})" for m in modes))
    return "\n".join(lines)


def reestimate(path: Path, all_settings: dict, workdir: Path, env: dict[str, str]) -> None:
    results = json.loads(path.read_text())
    cpu_config = workdir / "cpu.yaml"
    cpu_config.write_text(CPU_CONFIG)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    for name, row in results["settings"].items():
        planned = estimate(all_settings[name], None if results["gpu"] else cpu_config, env)
        est = planned["memory"]["peak_bytes"]
        row.setdefault("earlier_estimates", []).append({"estimate_mib": row["estimate_mib"], "error": row["error"],
                                                        "peak_phase": row["peak_phase"]})
        row.update(estimate_mib=est / MIB, peak_phase=planned["memory"]["peak_phase"], plan=planned["memory"],
                   error={mode: (est / MIB - measured) / measured for mode, measured in row["measured_mib"].items()})
        say(f"{name}: estimate {est / MIB:,.1f} MiB, errors " +
            ", ".join(f"{mode} {100 * e:+.0f} %" for mode, e in row["error"].items()))
    results["estimates_recomputed"] = f"at commit {commit} on {_dt.date.today().isoformat()} (--reestimate)"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=None, help="Which settings (default: all).")
    ap.add_argument("--tiny-runs", type=Path, default=REPO / "runs" / "tiny",
                    help="The tiny default's run dirs (pretrain, sft, reward): read only.")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["both", "pinned", "default"], default="both",
                    help="CPU only: measure with glibc's mmap threshold pinned at 64 KiB, with glibc's default, or "
                         "both (each setting runs once per choice).")
    ap.add_argument("--show", type=Path, help="Print the table of a saved result and exit.")
    ap.add_argument("--reestimate", type=Path, metavar="RESULTS",
                    help="Recompute the estimates of a saved result with this checkout's `rlhf plan` (the models are "
                         "rebuilt here, the same shapes), keep its measurements, and write it back: a GPU run's "
                         "figures checked against a later memory model. The earlier estimates stay in the file.")
    args = ap.parse_args()
    if args.show:
        print(table(json.loads(args.show.read_text())))
        return
    tiny = args.tiny_runs.resolve()
    for part in ("pretrain", "sft", "reward"):
        if not (tiny / part / "config.json").is_file():
            raise SystemExit(f"{tiny / part} is missing: run `rlhf pipeline recipes/tiny/pipeline.yaml` first, or "
                             "point --tiny-runs at a tiny run")
    workdir = args.workdir.resolve()
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    small = workdir / "gpt2-small"
    all_settings = settings(tiny, small, workdir / "long.jsonl")
    gpu = baseline(env)["cuda"]
    chosen = args.settings or [name for name, spec in all_settings.items() if gpu or not spec.get("gpu")]
    unknown = [s for s in chosen if s not in all_settings]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose among {list(all_settings)}")
    if any(s.startswith("gpt2-small") for s in chosen):
        models = build_small_models(small, tiny / "sft", env)
        say(f"GPT-2-small models: {models}")
    if args.reestimate:
        chosen = list(json.loads(args.reestimate.read_text())["settings"])
    if any(all_settings[s].get("long") for s in chosen):
        build_small_models(small.parent / "gpt2-small-1024", tiny / "sft", env, positions=1024)
        long_texts(workdir / "long.jsonl")
    if args.reestimate:
        reestimate(args.reestimate, all_settings, workdir, env)
        return
    cpu_config = workdir / "cpu.yaml"
    cpu_config.write_text(CPU_CONFIG)
    modes = ["cuda"] if gpu else (["pinned", "default"] if args.malloc == "both" else [args.malloc])
    envs = {mode: child_env(args.threads, pinned=mode == "pinned") for mode in modes}
    bases = {mode: baseline(envs[mode])["peak_rss_bytes"] for mode in modes if mode != "cuda"}
    say(f"GPU: {gpu}; runtime baseline peak RSS: " + ", ".join(f"{m} {b / MIB:,.0f} MiB" for m, b in bases.items()))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    results = {"gpu": gpu, "baseline_rss_mib": {m: b / MIB for m, b in bases.items()}, "settings": {},
               "commit": commit or None,
               "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
               "cpus": os.cpu_count(), "threads": args.threads, "python": sys.version.split()[0]}
    if args.out.exists():  # keep the other settings' rows of an earlier run of the same kind
        previous = json.loads(args.out.read_text())
        if previous.get("gpu") == gpu:
            results["settings"] = {k: v for k, v in previous.get("settings", {}).items() if k in all_settings}
    for name in chosen:
        spec = all_settings[name]
        planned = estimate(spec, None if gpu else cpu_config, env)
        est = planned["memory"]["peak_bytes"]
        say(f"{name}: estimate {est / MIB:,.1f} MiB ({planned['memory']['peak_phase']})")
        row = {"estimate_mib": est / MIB, "peak_phase": planned["memory"]["peak_phase"], "measured_mib": {},
               "error": {}, "peak_rss_mib": {}, "wall_s": {}, "plan": planned["memory"], "models": planned["models"]}
        for mode in modes:
            run = measure(f"{name}-{mode}", spec, workdir, envs[mode])
            measured = run["cuda_max_allocated_bytes"] if mode == "cuda" else run["peak_rss_bytes"] - bases[mode]
            row["measured_mib"][mode] = measured / MIB
            row["error"][mode] = (est - measured) / measured
            row["peak_rss_mib"][mode] = run["peak_rss_bytes"] / MIB
            row["wall_s"][mode] = run["wall_s"]
            row["command"] = run["command"]
            row.update({k: run[k] for k in run if k.startswith("cuda_") or k == "device"})
            say(f"{name} ({mode}): measured {measured / MIB:,.1f} MiB: error {100 * row['error'][mode]:+.0f} % "
                f"({run['wall_s']:.0f} s)")
        results["settings"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
