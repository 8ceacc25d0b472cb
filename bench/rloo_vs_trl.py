#!/usr/bin/env python
"""Benchmark: our RLOO (`rlhf ppo`, `training.advantage_estimator: rloo`) against TRL's own `RLOOTrainer`.

Both trainers run on this machine, one after the other, on identical work: the tiny default's SFT policy, its
training and held-out prompts, ONE reward function file (bench/tiny_reward.py: the tiny reward model's score minus
a missing-EOS penalty, in TRL's convention), the same k, batch shape, sampling, learning rate, KL coefficient,
optimizer, threads and seed. The benchmark prints, for each trainer, episodes/s of training, peak RSS, and the
held-out gold and reward-score gains (with standard errors) of its final policy, measured by one evaluation
routine (below) for every policy. See bench/README.md for what every figure means.

    .venv/bin/python bench/rloo_vs_trl.py                      # ours vs TRL, ~3 min on 2 quiet cores
    .venv/bin/python bench/rloo_vs_trl.py --repeats 3          # timings: best of 3 (what the README's results use)
    .venv/bin/python bench/rloo_vs_trl.py --methods            # part 2: ours gae vs rloo vs grpo (+ DPO if present)
    .venv/bin/python bench/rloo_vs_trl.py --show bench/results/rloo_vs_trl.json

Models: `--models DIR` holding `sft/` and `reward/` (default: runs/tiny under the repository root). When they are
absent the benchmark builds them first with `rlhf pipeline recipes/tiny/pipeline.yaml --only pretrain|sft|reward`
into WORKDIR/models (~2.5 min on 2 cores) and says so.

Each measured trainer runs in its own child of a tiny wrapper process (bench/ppo_vs_peer.py's WRAPPER); the wrapper
reports getrusage(RUSAGE_CHILDREN).ru_maxrss after the child exits, so the peak RSS covers that one trainer process.
`--cpu-lock FILE` takes an exclusive flock on FILE around every trainer run and every evaluation (machines shared
with other benchmarks); do not also wrap the whole command in `flock FILE` (it would wait for itself).

The script's own process needs only the standard library and PyYAML (it imports its helpers from
bench/ppo_vs_peer.py); the trainers, TRL's runner (bench/trl_rloo_run.py) and the evaluation
(`--eval-config`, run as a child) use the project's venv, TRL included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import gzip
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from ppo_vs_peer import (  # noqa: E402  (the helpers of the PPO benchmark, shared rather than copied)
    add_timing_arguments,
    child_env,
    fmt,
    git_commit,
    loadavg,
    measured,
    ratio,
    say,
    versions,
    wait_until_quiet,
)

DEFAULT_WORKDIR = Path("/tmp/rlhf-bench-rloo")
DEFAULT_RESULTS = REPO / "bench" / "results"
REWARD_FILE = BENCH / "tiny_reward.py"
TRL_RUNNER = BENCH / "trl_rloo_run.py"
TRAIN_PROMPTS = REPO / "recipes" / "tiny" / "data" / "prompts-train.jsonl.gz"
TEST_PROMPTS = REPO / "recipes" / "tiny" / "data" / "prompts-test.jsonl.gz"

# The work both trainers do: the README's "RLOO on the tiny default" (recipes/tiny/ppo.yaml with
# advantage_estimator rloo and k = 4), every number given to both explicitly.
WORK = {
    "samples_per_prompt": 4,  # k = TRL num_generations
    "total_episodes": 2048,  # completions generated in the whole run
    "rollout_batch_size": 64,  # completions per update = TRL's generation batch (16 prompts x 4)
    "num_mini_batches": 4,  # optimizer steps per epoch = TRL steps_per_generation (per_device batch 16, accum 1)
    "ppo_epochs": 4,  # = TRL num_iterations
    "response_length": 24,  # = TRL max_completion_length
    "temperature": 0.7,
    "top_k": 0,
    "top_p": 1.0,
    "learning_rate": 3e-4,  # recipes/tiny/ppo.yaml
    "kl_coef": 0.05,  # beta; k1 KL summed over the response, in the reward, for both
    "cliprange": 0.2,  # TRL epsilon
    "adam_eps": 1e-5,  # our default (TRL's is 1e-8): one value for both
    "max_grad_norm": 1.0,  # both defaults
    "missing_eos_penalty": 1.0,  # inside the shared reward function (TRL has no such option)
    "max_prompt_length": 39,  # our PPO's limit for the tiny policy: context 64 - 24 response - 1 EOS
    "seed": 0,
    "window": 4,  # updates averaged for the training-reward start / end
}
TARGET = ("ours >= 1.5x TRL's episodes/s at equal or better held-out gold gain, where 'equal' means not below TRL's "
          "by 2 SE of the difference or more")

# The evaluation of every policy, run as a child of this script (`--eval-config FILE`): for each sampling seed, one
# response per held-out prompt (transformers' generate, temperature 0.7, top-k 0, top-p 1, 24 tokens, cut after the
# first EOS), scored by the tiny reward model (bench/tiny_reward.py's RewardModel: raw score, and the reward both
# trainers optimise = raw - penalty without EOS), by the gold annotator (rlhf_pipeline.tiny.annotator, told whether
# the response ended with EOS), and its KL to the initial policy (sum over the response of log pi - log pi_init at
# the sampling temperature).


def eval_main(cfg_path: str) -> int:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.tiny.annotator import gold_score

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(cfg["threads"])
    os.environ["RLHF_BENCH_REWARD_MODEL"] = cfg["reward_model"]
    os.environ["RLHF_BENCH_MISSING_EOS_PENALTY"] = str(cfg["penalty"])
    spec = importlib.util.spec_from_file_location("bench_tiny_reward", cfg["reward_file"])
    reward_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_module)
    tok = AutoTokenizer.from_pretrained(cfg["initial"])
    texts = [json.loads(line)["prompt"] for line in gzip.open(cfg["prompts"], "rt") if line.strip()]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    keep = [i for i, s in enumerate(ids) if 0 < len(s) <= cfg["max_prompt_length"]][: cfg["n_prompts"]]
    texts, ids = [texts[i] for i in keep], [ids[i] for i in keep]
    eos, pad, T, temp = tok.eos_token_id, tok.pad_token_id, cfg["response_length"], cfg["temperature"]
    initial = AutoModelForCausalLM.from_pretrained(cfg["initial"], dtype=torch.float32).eval()

    def logprobs(model, full, mask, start, resp, keep_mask):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=full, attention_mask=mask, position_ids=pos).logits[:, start - 1:-1].float() / temp
        lp = torch.gather(logits, 2, resp.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return (lp * keep_mask).sum(1)

    out = {"prompts": len(texts), "seeds": cfg["seeds"], "policies": {}}
    for name, path in cfg["policies"].items():
        policy = initial if path == cfg["initial"] else \
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        per = {m: [] for m in ("reward", "score", "gold", "kl", "length", "eos")}
        for seed in range(cfg["seeds"]):
            torch.manual_seed(1000 + seed)
            rows = {m: [] for m in per}
            for b in range(0, len(ids), cfg["batch_size"]):
                chunk, chunk_texts = ids[b:b + cfg["batch_size"]], texts[b:b + cfg["batch_size"]]
                L = max(len(x) for x in chunk)
                q = torch.tensor([[pad] * (L - len(x)) + x for x in chunk])
                qm = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in chunk])
                with torch.no_grad():
                    seq = policy.generate(input_ids=q, attention_mask=qm, do_sample=True, temperature=temp, top_k=0,
                                          top_p=1.0, max_new_tokens=T, eos_token_id=eos, pad_token_id=pad,
                                          use_cache=True)
                    resp = seq[:, L:]
                    is_eos = resp == eos
                    has = is_eos.any(1)
                    last = torch.where(has, is_eos.int().argmax(1), torch.full_like(has, resp.shape[1] - 1,
                                                                                   dtype=torch.long))
                    keep_mask = (torch.arange(resp.shape[1])[None] <= last[:, None]).long()
                    resp = torch.where(keep_mask.bool(), resp, torch.full_like(resp, pad))
                    full = torch.cat([q, resp], 1)
                    mask = torch.cat([qm, keep_mask], 1)
                    kl = (logprobs(policy, full, mask, L, resp, keep_mask)
                          - logprobs(initial, full, mask, L, resp, keep_mask)) if policy is not initial \
                        else torch.zeros(len(chunk))
                completions = tok.batch_decode(resp, skip_special_tokens=True)
                completion_ids = [r[m.bool()].tolist() for r, m in zip(resp, keep_mask)]
                raw = reward_module.reward_model_scores(chunk_texts, completions)
                rows["score"] += raw
                rows["reward"] += reward_module.reward(chunk_texts, completions, completion_ids)
                rows["gold"] += gold_score(chunk_texts, completions, has.tolist())
                rows["kl"] += kl.tolist()
                rows["length"] += keep_mask.sum(1).tolist()
                rows["eos"] += has.float().tolist()
            for m in per:
                per[m].append(rows[m])
        out["policies"][name] = per
    Path(cfg["out"]).write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_lock(path: Path | None):
    """An exclusive flock on `path` (shared with other benchmarks on the machine) for the duration; none if None."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        t0 = time.time()
        fcntl.flock(handle, fcntl.LOCK_EX)
        if time.time() - t0 > 1:
            say(f"waited {time.time() - t0:.0f}s for the CPU lock {path}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bench_env(threads: int, reward_model: Path) -> dict[str, str]:
    env = child_env(threads)
    # this checkout's rlhf_pipeline first, whatever the venv has installed (editable or not)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RLHF_BENCH_REWARD_MODEL"] = str(reward_model)
    env["RLHF_BENCH_MISSING_EOS_PENALTY"] = str(WORK["missing_eos_penalty"])
    return env


def rlhf_exe() -> list[str]:
    exe = Path(sys.executable).parent / "rlhf"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf_pipeline"]


def has_dpo(env: dict) -> bool:
    out = subprocess.run([*rlhf_exe(), "dpo", "--help"], capture_output=True, text=True, env=env, cwd=REPO,
                         check=False)
    return out.returncode == 0


def ensure_models(args, env: dict) -> tuple[Path, str]:
    """The SFT policy and reward model: --models DIR, else runs/tiny, else built into WORKDIR/models."""
    for base in filter(None, [args.models, REPO / "runs" / "tiny"]):
        if (base / "sft" / "config.json").exists() and (base / "reward" / "config.json").exists():
            return base.resolve(), f"existing models in {base.resolve()}"
        if args.models is not None and base == args.models:
            raise SystemExit(f"--models {base}: no sft/ and reward/ model there")
    base = args.workdir / "models"
    if (base / "sft" / "config.json").exists() and (base / "reward" / "config.json").exists():
        return base, f"models built earlier by this benchmark in {base}"
    say(f"no tiny SFT policy / reward model under runs/tiny: building them into {base} with `rlhf pipeline "
        "recipes/tiny/pipeline.yaml --only pretrain|sft|reward` (about 2.5 min on 2 cores)")
    t0 = time.time()
    for stage in ("pretrain", "sft", "reward"):
        cmd = [*rlhf_exe(), "pipeline", str(REPO / "recipes" / "tiny" / "pipeline.yaml"), "--set",
               f"output_dir={base}", "--only", stage]
        with cpu_lock(args.cpu_lock):
            rc = subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
        if rc:
            raise SystemExit(f"building the tiny models failed at `{shlex.join(cmd)}` (exit {rc})")
    return base, f"built by this benchmark in {base} ({time.time() - t0:.0f}s)"


def write_recipe(path: Path, models: Path, estimator: str, seed: int, out_dir: Path) -> None:
    import yaml

    w = WORK
    k = 1 if estimator == "gae" else w["samples_per_prompt"]
    training = {
        "advantage_estimator": estimator,
        "total_episodes": w["total_episodes"],
        "rollout_batch_size": w["rollout_batch_size"],
        "num_mini_batches": w["num_mini_batches"],
        "ppo_epochs": w["ppo_epochs"],
        "learning_rate": w["learning_rate"],
        "kl_coef": w["kl_coef"],
        "cliprange": w["cliprange"],
        "adam_eps": w["adam_eps"],
        "max_grad_norm": w["max_grad_norm"],
        "lr_schedule": "linear",
        # the penalty is inside the shared reward function (bench/tiny_reward.py), as TRL has none
        "missing_eos_penalty": None,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "eval_prompts": 16,  # our own before/after check (outside the timing); the bench evaluates every policy
        "num_samples": 0,
        "report_to": "none",
    }
    if estimator == "rloo":
        training.update(kl_estimator="k1", whiten_advantages=False)  # TRL: normalize_advantages=False
    elif estimator == "gae":
        training.update(kl_estimator="k1", vf_coef=0.1)  # recipes/tiny/ppo.yaml
    recipe = {
        "stage": "ppo",
        "seed": seed,
        "output_dir": str(out_dir),
        "policy": {"name_or_path": str(models / "sft"), "dtype": "float32"},
        "reward": {"function": f"{REWARD_FILE}:reward"},
        "data": {"files": {"train": str(TRAIN_PROMPTS), "test": str(TEST_PROMPTS)}, "eval_split": "test",
                 "max_prompt_length": w["max_prompt_length"]},
        "generation": {"response_length": w["response_length"], "temperature": w["temperature"],
                       "top_k": w["top_k"], "top_p": w["top_p"], "samples_per_prompt": k},
        "training": training,
    }
    if estimator == "gae":
        recipe["value"] = {"mode": "shared"}  # recipes/tiny/ppo.yaml
    header = (f"# Written by bench/rloo_vs_trl.py: our {estimator} on the tiny default, the benchmark's shared work.\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


DPO_PAIRS = 2048  # recipes/tiny/dpo.yaml's max_train_samples: one epoch, 64 optimizer steps of 32 pairs


def write_dpo_recipe(path: Path, models: Path, seed: int, out_dir: Path) -> None:
    """recipes/tiny/dpo.yaml from the same SFT model: the annotator-labelled pairs the reward model learned from
    (DPO needs no reward model and samples nothing in training). Its own before/after evaluation is cut to 16 prompts
    (outside the timing); the bench evaluates the final policy like every other."""
    import yaml

    recipe = {
        "stage": "dpo", "extends": str(REPO / "recipes" / "tiny" / "dpo.yaml"), "seed": seed,
        "output_dir": str(out_dir),
        "model": {"name_or_path": str(models / "sft"), "dtype": "float32"},
        "reward": None, "gold": None,
        "data": {"max_train_samples": DPO_PAIRS},
        "evaluation": {"prompts": 16},
        "training": {"report_to": "none"},
    }
    path.write_text("# Written by bench/rloo_vs_trl.py: our DPO (recipes/tiny/dpo.yaml) from the bench's SFT model.\n"
                    + yaml.safe_dump(recipe, sort_keys=False))


def read_dpo(out_dir: Path, usage: dict) -> dict:
    m = json.loads((out_dir / "metrics.json").read_text())
    return {"usage": usage, "episodes": None, "pairs": m["train_pairs"], "episodes_per_s": None,
            "pairs_per_s": m["pairs_per_second"], "train_s": m["train_runtime"], "peak_rss_mb": usage["peak_rss_mb"],
            "update_s_mean": None, "time_split_s": {}, "train_reward_start": None, "train_reward_end": None,
            "train_reward_gain_se": None, "kl_end_train": None, "grad_norm_mean": None, "policy": str(out_dir)}


def trl_config(path: Path, models: Path, seed: int, out_dir: Path, threads: int) -> Path:
    w = WORK
    cfg = {"policy": str(models / "sft"), "train_prompts": str(TRAIN_PROMPTS),
           "reward_function": f"{REWARD_FILE}:reward", "output_dir": str(out_dir),
           "out": str(out_dir.with_suffix(".report.json")), "seed": seed, "threads": threads,
           **{k: w[k] for k in ("samples_per_prompt", "total_episodes", "rollout_batch_size", "num_mini_batches",
                                "ppo_epochs", "response_length", "temperature", "learning_rate", "kl_coef",
                                "cliprange", "adam_eps", "max_grad_norm", "max_prompt_length")}}
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def run_measured(cmd: list[str], log: Path, tag: str, env: dict, args) -> dict:
    """One trainer run under the CPU lock and the RSS wrapper, after waiting for a quiet machine."""
    with cpu_lock(args.cpu_lock):
        if args.busy_threshold < 1:
            wait_until_quiet(args.busy_threshold, args.max_wait)
        return measured(cmd, log, tag, env, args.quiet)


def window(xs: list, w: int) -> tuple:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2 * w:
        return None, None, None
    a, b = xs[:w], xs[-w:]
    se = (statistics.variance(a) / w + statistics.variance(b) / w) ** 0.5 if w > 1 else None
    return statistics.mean(a), statistics.mean(b), se


def read_ours(out_dir: Path, usage: dict) -> dict:
    m = json.loads((out_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    start, end, se = window([r["objective/score"] for r in rows], WORK["window"])
    return {
        "usage": usage,
        "episodes": m["episodes"],
        "updates": m["num_updates"],
        "optimizer_steps": m["optimizer_steps"],
        "episodes_per_s": m["episodes_per_second"],
        "train_s": m["train_runtime"],
        "peak_rss_mb": usage["peak_rss_mb"],
        "update_s_mean": statistics.mean(r["time/update"] for r in rows),
        "time_split_s": {"generation": sum(r["time/generation"] for r in rows),
                         "scoring (old/reference log-probs + reward)": sum(r["time/scoring"] for r in rows),
                         "training (epochs x mini-batches)": sum(r["time/training"] for r in rows)},
        "train_reward_start": start, "train_reward_end": end, "train_reward_gain_se": se,
        "kl_end_train": statistics.mean(r["objective/kl"] for r in rows[-WORK["window"]:]),
        "grad_norm_mean": statistics.mean(r.get("policy/grad_norm", float("nan")) for r in rows),
        "policy": str(out_dir),
    }


def read_trl(out_dir: Path, usage: dict) -> dict:
    data = json.loads(out_dir.with_suffix(".report.json").read_text())
    s, log = data["summary"], data["log"]
    rows = [r for r in log if "reward" in r]
    start, end, se = window([r["reward"] for r in rows], WORK["window"])
    split = s.get("time_split_s", {})
    return {
        "usage": usage,
        "episodes": s["episodes"],
        "updates": s["generations"],
        "optimizer_steps": s["optimizer_steps"],
        "episodes_per_s": s["episodes_per_s"],
        "train_s": s["train_s"],
        "peak_rss_mb": usage["peak_rss_mb"],
        "peak_rss_mb_self_reported": s["peak_rss_mb_self_reported"],
        "update_s_mean": s["train_s"] / s["generations"],
        "time_split_s": split,
        "train_reward_start": start, "train_reward_end": end, "train_reward_gain_se": se,
        # TRL logs the per-token mean of k1; x the mean completion length gives nats per response (approx.)
        "kl_end_train": statistics.mean(r["kl"] * r["completions/mean_length"] for r in rows[-WORK["window"]:]),
        "grad_norm_mean": statistics.mean(r["grad_norm"] for r in rows if "grad_norm" in r),
        "optimizer": f"{s['optimizer']} ({s['optim_arg']})",
        "policy": str(out_dir),
    }


def run_variant(name: str, kind: str, estimator: str, seed: int, rep: int, wd: Path, models: Path, env: dict,
                args) -> dict:
    runs = wd / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-seed{seed}-run{rep}"
    out_dir = runs / tag
    for p in (out_dir, out_dir.with_suffix(".report.json")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if kind == "trl":
        cfg = trl_config(wd / f"trl-config-seed{seed}-run{rep}.json", models, seed, out_dir, args.threads)
        cmd = [sys.executable, str(TRL_RUNNER), str(cfg)]
    elif kind == "dpo":
        recipe = wd / f"recipe-{name}-seed{seed}.yaml"
        write_dpo_recipe(recipe, models, seed, out_dir)
        cmd = [*rlhf_exe(), "dpo", str(recipe), "--output-dir", str(out_dir)]
    else:
        recipe = wd / f"recipe-{name}-seed{seed}.yaml"
        write_recipe(recipe, models, estimator, seed, out_dir)
        cmd = [*rlhf_exe(), "ppo", str(recipe), "--output-dir", str(out_dir)]
    say(f"{tag}: load avg {loadavg()}: {shlex.join(cmd)}")
    t0 = time.time()
    usage = run_measured(cmd, runs / f"{tag}.log", tag, env, args)
    r = {"trl": read_trl, "dpo": read_dpo}.get(kind, read_ours)(out_dir, usage)
    r.update(seed=seed, repeat=rep, command=shlex.join(cmd))
    other = usage.get("other_cpu_share")
    speed = f"{r['pairs_per_s']:.1f} pairs/s" if kind == "dpo" else f"{r['episodes_per_s']:.1f} episodes/s"
    say(f"{tag}: done in {time.time() - t0:.0f}s: {speed}, peak RSS "
        f"{r['peak_rss_mb']:.0f} MiB, training reward {fmt(r['train_reward_start'])} -> {fmt(r['train_reward_end'])}; "
        f"other processes took {fmt(None if other is None else 100 * other, '.0f', '%')} of the CPU")
    return r


def run_all(variants: list[dict], wd: Path, models: Path, env: dict, args) -> tuple[dict, dict]:
    """Every variant `repeats` times with the first seed (alternating order; a run disturbed by other processes is
    re-run), then once with each further seed. Returns (reported run per variant and seed, all runs)."""
    seeds = [WORK["seed"] + i for i in range(args.seeds)]
    every = {v["name"]: {s: [] for s in seeds} for v in variants}
    for rep in range(1, args.repeats + 1):
        order = variants if rep % 2 else list(reversed(variants))
        for v in order:
            for attempt in range(1 + args.max_retries):
                r = run_variant(v["name"], v["kind"], v["estimator"], seeds[0], rep, wd, models, env, args)
                r["attempt"] = attempt
                every[v["name"]][seeds[0]].append(r)
                other = r["usage"].get("other_cpu_share")
                if other is None or other < args.busy_threshold:
                    break
                say(f"{v['name']}: disturbed by other processes ({100 * other:.0f}%): running it again")
    for seed in seeds[1:]:
        for v in variants:
            every[v["name"]][seed].append(run_variant(v["name"], v["kind"], v["estimator"], seed, 1, wd, models,
                                                      env, args))
    # timings: the fastest run (the least disturbed); its policy is the one evaluated
    best = {n: {s: min(rs, key=lambda r: r["train_s"]) for s, rs in by_seed.items()} for n, by_seed in every.items()}
    return best, every


def evaluate(policies: dict[str, str], wd: Path, models: Path, env: dict, args) -> dict:
    cfg = {"threads": args.threads, "initial": str(models / "sft"), "reward_model": str(models / "reward"),
           "reward_file": str(REWARD_FILE), "penalty": WORK["missing_eos_penalty"], "prompts": str(TEST_PROMPTS),
           "n_prompts": args.eval_prompts, "max_prompt_length": WORK["max_prompt_length"], "seeds": args.eval_seeds,
           "batch_size": 64, "temperature": WORK["temperature"], "response_length": WORK["response_length"],
           "policies": {"initial": str(models / "sft"), **policies}, "out": str(wd / "eval.json")}
    path = wd / "eval-config.json"
    path.write_text(json.dumps(cfg, indent=1))
    say(f"evaluating {len(cfg['policies'])} policies: {args.eval_prompts} held-out prompts x {args.eval_seeds} "
        "sampling seeds each")
    t0 = time.time()
    with cpu_lock(args.cpu_lock):
        out = subprocess.run([sys.executable, __file__, "--eval-config", str(path)], env=env, cwd=REPO,
                             capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the evaluation failed:\n{out.stderr[-3000:]}")
    say(f"evaluation done in {time.time() - t0:.0f}s")
    return json.loads((wd / "eval.json").read_text())


def _per_prompt(ev: dict, name: str, metric: str) -> list[float]:
    """The mean over sampling seeds of each prompt's value."""
    rows = ev["policies"][name][metric]
    return [statistics.mean(col) for col in zip(*rows)]


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) / len(xs) ** 0.5


METRICS = ("gold", "reward", "score", "kl", "length", "eos")


def summarise_eval(ev: dict, names: list[str]) -> dict:
    """Per policy and metric: the mean, the seed-to-seed SD of the held-out mean, and the gain over the initial policy
    with its SE (paired by prompt: SD over prompts of the per-prompt gain / sqrt(prompts), the per-prompt values
    being means over the sampling seeds, so both the prompts' spread and the sampling noise are in it)."""
    out = {}
    init = {m: _per_prompt(ev, "initial", m) for m in METRICS}
    for name in ["initial", *names]:
        s = {}
        for m in METRICS:
            pp = _per_prompt(ev, name, m)
            seed_means = [statistics.mean(row) for row in ev["policies"][name][m]]
            s[m] = statistics.mean(pp)
            s[f"{m}_sd_of_mean_over_seeds"] = statistics.stdev(seed_means) if len(seed_means) > 1 else None
            if name != "initial":
                s[f"gain_{m}"], s[f"gain_{m}_se"] = _mean_se([a - b for a, b in zip(pp, init[m])])
        out[name] = s
    return out


def difference(ev: dict, a: str, b: str, metric: str) -> tuple[float, float]:
    """gain(a) - gain(b) = mean(a) - mean(b) (same initial policy) and its paired SE over prompts."""
    return _mean_se([x - y for x, y in zip(_per_prompt(ev, a, metric), _per_prompt(ev, b, metric))])


# ---------------------------------------------------------------------------------------------------------------
# the two parts
# ---------------------------------------------------------------------------------------------------------------
def part_trl(args, env: dict, models: Path, models_note: str) -> dict:
    wd = args.workdir / "trl"
    variants = [{"name": "trl", "kind": "trl", "estimator": "rloo"},
                {"name": "ours", "kind": "ours", "estimator": "rloo"}]
    best, every = run_all(variants, wd, models, env, args)
    seeds = list(best["ours"])
    policies = {f"{n}-seed{s}": best[n][s]["policy"] for n in best for s in seeds}
    ev = evaluate(policies, wd, models, env, args)
    (wd / "eval-per-prompt.json").write_text(json.dumps(ev))
    summary = summarise_eval(ev, list(policies))
    s0 = seeds[0]
    results = {n: {**best[n][s0], "eval": summary[f"{n}-seed{s0}"]} for n in best}
    comp = {"episodes_per_s": ratio(results["ours"]["episodes_per_s"], results["trl"]["episodes_per_s"]),
            "peak_rss": ratio(results["ours"]["peak_rss_mb"], results["trl"]["peak_rss_mb"])}
    for m in ("gold", "reward", "score", "kl"):
        d, se = difference(ev, f"ours-seed{s0}", f"trl-seed{s0}", m)
        comp[f"gain_{m}_difference"], comp[f"gain_{m}_difference_se"] = d, se
        comp[f"gain_{m}_difference_in_se"] = d / se if se else None
    spread = {}
    if len(seeds) > 1:
        for n in best:
            g = [summary[f"{n}-seed{s}"]["gain_gold"] for s in seeds]
            r = [summary[f"{n}-seed{s}"]["gain_reward"] for s in seeds]
            spread[n] = {"seeds": seeds, "gain_gold": g, "gain_reward": r,
                         "gain_gold_mean": statistics.mean(g), "gain_gold_sd": statistics.stdev(g),
                         "gain_reward_mean": statistics.mean(r), "gain_reward_sd": statistics.stdev(r)}
        d = spread["ours"]["gain_gold_mean"] - spread["trl"]["gain_gold_mean"]
        se = ((spread["ours"]["gain_gold_sd"] ** 2 + spread["trl"]["gain_gold_sd"] ** 2) / len(seeds)) ** 0.5
        comp.update(gain_gold_seeds_difference=d, gain_gold_seeds_difference_se=se,
                    gain_gold_seeds_difference_in_se=d / se if se else None)
    # the target: speed, and the gold gain not below TRL's by 2 SE of the difference or more (over training seeds
    # when there are several, else over prompts and sampling of the one run)
    if spread:
        d, se, basis = comp["gain_gold_seeds_difference"], comp["gain_gold_seeds_difference_se"], \
            f"mean over {len(seeds)} training seeds, SE from the seed-to-seed spread"
    else:
        d, se, basis = comp["gain_gold_difference"], comp["gain_gold_difference_se"], \
            "one run each, SE over held-out prompts and sampling seeds"
    speed_ok = comp["episodes_per_s"] >= 1.5
    gold_ok = d > -2 * se
    missed = []
    if not speed_ok:
        missed.append(f"speed {comp['episodes_per_s']:.2f}x < 1.5x")
    if not gold_ok:
        missed.append(f"gold gain {d:+.3f} is {-d / se:.1f} SE below TRL's")
    comp.update(target_basis=basis, target_gold_difference=d, target_gold_difference_se=se,
                target_parts={"speed >= 1.5x": speed_ok, "gold gain not below TRL's by 2 SE or more": gold_ok},
                target_met=not missed, target_verdict="YES" if not missed else "NO: " + "; ".join(missed))
    return {"part": "trl", "results": results, "comparison": comp, "seed_spread": spread, "eval_summary": summary,
            "runs": every, "models": str(models), "models_note": models_note,
            "recipes": {p.name: p.read_text() for p in sorted(wd.glob("recipe-*.yaml"))},
            "trl_configs": {p.name: json.loads(p.read_text()) for p in sorted(wd.glob("trl-config-seed*-run1.json"))},
            "notes": NOTES_TRL}


def part_methods(args, env: dict, models: Path, models_note: str) -> dict:
    wd = args.workdir / "methods"
    variants = [{"name": f"ours-{e}", "kind": "ours", "estimator": e} for e in ("gae", "rloo", "grpo")]
    if has_dpo(env):
        variants.append({"name": "ours-dpo", "kind": "dpo", "estimator": "dpo"})
    best, every = run_all(variants, wd, models, env, args)
    seeds = list(best[variants[0]["name"]])
    s0 = seeds[0]
    policies = {f"{n}-seed{s}": best[n][s]["policy"] for n in best for s in seeds}
    ev = evaluate(policies, wd, models, env, args)
    (wd / "eval-per-prompt.json").write_text(json.dumps(ev))
    summary = summarise_eval(ev, list(policies))
    results = {}
    for n in best:
        r = {**best[n][s0], "eval": summary[f"{n}-seed{s0}"]}
        r["gold_gain_per_train_s"] = r["eval"]["gain_gold"] / r["train_s"]
        if len(seeds) > 1:
            g = [summary[f"{n}-seed{s}"]["gain_gold"] for s in seeds]
            r["gain_gold_over_seeds"] = {"seeds": seeds, "gains": g, "mean": statistics.mean(g),
                                         "sd": statistics.stdev(g)}
        results[n] = r
    diffs = {}
    for n in best:
        if n != "ours-rloo":
            d, se = difference(ev, f"{n}-seed{s0}", f"ours-rloo-seed{s0}", "gold")
            diffs[n] = {"gain_gold_difference_vs_rloo": d, "se": se}
    dpo = {"included": True, "pairs": DPO_PAIRS, "recipe": "recipes/tiny/dpo.yaml"} if has_dpo(env) else \
        {"included": False, "why": "`rlhf dpo` is not in this checkout"}
    return {"part": "methods", "results": results, "differences": diffs, "eval_summary": summary, "runs": every,
            "dpo": dpo, "models": str(models), "models_note": models_note,
            "recipes": {p.name: p.read_text() for p in sorted(wd.glob("recipe-*.yaml"))}, "notes": NOTES_METHODS}


NOTES_TRL = [
    "episodes/s: completions generated / training time. Ours: metrics.json episodes_per_second (episodes / summed "
    "per-update times). TRL: completions scored by the reward function / wall time of trainer.train(). Model "
    "loading, evaluation and saving are outside both.",
    "peak RSS: ru_maxrss of the trainer process (its whole life), read by a wrapper via getrusage(RUSAGE_CHILDREN).",
    "held-out gains: the benchmark's own evaluation of the initial policy and of each trainer's final saved policy: "
    "one response per held-out prompt per sampling seed; gold = the tiny annotator, reward = what both trainers "
    "optimise (reward-model score - 1.0 without EOS), score = the raw reward-model score, KL = sum over the response "
    "of log pi - log pi_initial. Gain = after - before; SE paired by prompt (the per-prompt values are means over "
    "the sampling seeds). The difference of two trainers' gains is the difference of their after-means (same "
    "initial policy), with its own paired SE.",
    "training reward: mean reward of the first 4 updates (generations) and of the last 4, as each trainer logged it.",
]
NOTES_METHODS = [
    "ours-gae: recipes/tiny/ppo.yaml's PPO (value head on the policy trunk, vf_coef 0.1, whitened advantages, one "
    "response per prompt: 64 prompts per update); ours-rloo and ours-grpo: 16 prompts x 4 responses per update. All "
    "three: the same episodes, prompt file, reward function, lr, KL coefficient, batch shape, optimizer and seed.",
    "KL: held-out, the benchmark's evaluation (nats per response, to the initial policy). grpo's KL is k3 in its "
    "loss; gae and rloo put k1 in the reward.",
    "training s: our metrics.json train_runtime (summed update times; DPO: TRL's train_runtime of trainer.train()). "
    "gold gain per training second = held-out gold gain / training s.",
    f"ours-dpo: recipes/tiny/dpo.yaml (beta 0.5, lr 1e-3, one epoch over {DPO_PAIRS} of the annotator-labelled pairs "
    "the reward model learned from, 32 pairs per step) from the same SFT model; no reward model and no sampling in "
    "training, so its work is pairs, not episodes: compare it by gold gain per training second.",
]


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _table(names: list[str], heads: dict, rows: list[tuple[str, list[str]]]) -> str:
    width0 = max(len(r[0]) for r in rows) + 2
    widths = [max(len(heads[n]), *(len(r[1][i]) for r in rows)) + 2 for i, n in enumerate(names)]
    lines = ["".ljust(width0) + "".join(heads[n].rjust(w) for n, w in zip(names, widths))]
    lines += [label.ljust(width0) + "".join(c.rjust(w) for c, w in zip(cells, widths)) for label, cells in rows]
    return "\n".join(lines)


def _gain(r: dict, m: str, spec: str = "+.3f") -> str:
    e = r["eval"]
    return f"{e[f'gain_{m}']:{spec}} ± {e[f'gain_{m}_se']:.3f}"


def _share(r: dict, i: int) -> str:
    split = list(r["time_split_s"].values())
    return fmt(100 * split[i] / sum(split), ".0f", "%") if split and sum(split) else "-"


def _common_rows(res: dict, names: list[str]) -> list:
    R = res["results"]
    rows = []

    def row(label, fn):
        rows.append((label, [fn(n) for n in names]))

    row("episodes/s (training only)", lambda n: fmt(R[n]["episodes_per_s"], ".1f"))
    if any(R[n].get("pairs_per_s") for n in names):
        row("pairs/s (DPO, training only)", lambda n: fmt(R[n].get("pairs_per_s"), ".1f"))
    if any(len(_runs_of(res, n)) > 1 for n in names):
        row("  every run", lambda n: ", ".join(f"{r['episodes_per_s'] or r['pairs_per_s']:.1f}"
                                               for r in _runs_of(res, n)))
    row("training time (s)", lambda n: fmt(R[n]["train_s"], ".1f"))
    row("time per update (s)", lambda n: fmt(R[n]["update_s_mean"], ".2f"))
    for i, label in enumerate(("generation", "scoring", "training")):
        row(f"  {label} share", lambda n, i=i: _share(R[n], i))
    row("peak RSS (MiB)", lambda n: fmt(R[n]["peak_rss_mb"], ".0f"))
    return rows, row


def _runs_of(res: dict, n: str) -> list:
    runs = res["runs"][n]
    seed = res["results"][n]["seed"]
    return runs.get(str(seed), runs.get(seed, []))


def report(res: dict) -> str:
    w, R = res["work"], res["results"]
    head = [f"== {res['title']}, {res['date']}, {res['machine']['cpu_count']} CPU cores, "
            f"{res['machine']['threads']} threads, commit {res['versions']['rlhf_pipeline_commit']} ==",
            "versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"]["python_packages"].items()),
            f"models: {res['models_note']}",
            (f"work: {w['total_episodes']} episodes, {w['rollout_batch_size']} per update "
             f"(k {w['samples_per_prompt']}), {w['num_mini_batches']} mini-batches x {w['ppo_epochs']} epochs, "
             f"{w['response_length']} tokens, temperature {w['temperature']}, lr {w['learning_rate']} linear to 0, "
             f"beta {w['kl_coef']}, clip {w['cliprange']}, AdamW eps {w['adam_eps']}, max_grad_norm "
             f"{w['max_grad_norm']}, fp32, seed {w['seed']}; held-out evaluation {res['eval']['prompts']} prompts x "
             f"{res['eval']['seeds']} sampling seeds")]
    if res["part"] == "trl":
        names = ["trl", "ours"]
        heads = {"trl": f"TRL {res['versions']['python_packages'].get('trl')} RLOOTrainer", "ours": "ours (rloo)"}
        rows, row = _common_rows(res, names)
        c = res["comparison"]
        rows.insert(1, ("  ratio ours/TRL", ["1", fmt(c["episodes_per_s"], ".2f", "x")]))
        row("  ratio ours/TRL", lambda n: "1" if n == "trl" else fmt(c["peak_rss"], ".2f", "x"))
        row("held-out gold gain ± SE", lambda n: _gain(R[n], "gold"))
        row("  before -> after", lambda n: f"{R[n]['eval']['gold'] - R[n]['eval']['gain_gold']:.3f} -> "
                                           f"{R[n]['eval']['gold']:.3f}")
        row("  ours - TRL ± SE", lambda n: "" if n == "trl" else
            f"{c['gain_gold_difference']:+.3f} ± {c['gain_gold_difference_se']:.3f}")
        row("held-out reward gain ± SE", lambda n: _gain(R[n], "reward"))
        row("  ours - TRL ± SE", lambda n: "" if n == "trl" else
            f"{c['gain_reward_difference']:+.3f} ± {c['gain_reward_difference_se']:.3f}")
        row("held-out raw RM-score gain ± SE", lambda n: _gain(R[n], "score"))
        row("held-out KL to initial (nats)", lambda n: f"{R[n]['eval']['kl']:.2f}")
        row("held-out length / EOS rate", lambda n: f"{R[n]['eval']['length']:.1f} / {R[n]['eval']['eos']:.2f}")
        sp = res.get("seed_spread") or {}
        if sp:
            row(f"gold gain over {len(sp['ours']['seeds'])} seeds: mean (SD)",
                lambda n: f"{sp[n]['gain_gold_mean']:+.3f} ({sp[n]['gain_gold_sd']:.3f})")
            row("reward gain over seeds: mean (SD)",
                lambda n: f"{sp[n]['gain_reward_mean']:+.3f} ({sp[n]['gain_reward_sd']:.3f})")
            row("  ours - TRL (gold) ± SE", lambda n: "" if n == "trl" else
                f"{c['gain_gold_seeds_difference']:+.3f} ± {c['gain_gold_seeds_difference_se']:.3f}")
        row("training reward, first 4 -> last 4 updates",
            lambda n: f"{fmt(R[n]['train_reward_start'])} -> {fmt(R[n]['train_reward_end'])}")
        row("mean gradient norm (before clipping)", lambda n: fmt(R[n]["grad_norm_mean"], ".2f"))
        row("CPU cores used by the trainer", lambda n: fmt(R[n]["usage"].get("cpu_cores_used")))
        row("other processes' CPU share", lambda n: fmt(None if R[n]["usage"].get("other_cpu_share") is None
                                                        else 100 * R[n]["usage"]["other_cpu_share"], ".0f", "%"))
        row("load avg before the run", lambda n: "/".join(str(x) for x in R[n]["usage"]["load_before"]))
        row("target met", lambda n: "" if n == "trl" else c["target_verdict"])
        head.append(f"target: {res['target']} ({c['target_basis']})")
    else:
        names = list(R)
        heads = {n: n for n in names}
        rows, row = _common_rows(res, names)
        row("held-out gold gain ± SE", lambda n: _gain(R[n], "gold"))
        row("  minus rloo's ± SE", lambda n: "" if n == "ours-rloo" else
            f"{res['differences'][n]['gain_gold_difference_vs_rloo']:+.3f} ± {res['differences'][n]['se']:.3f}")
        row("held-out reward gain ± SE", lambda n: _gain(R[n], "reward"))
        row("held-out KL to initial (nats)", lambda n: f"{R[n]['eval']['kl']:.2f}")
        row("gold gain per training second", lambda n: fmt(R[n]["gold_gain_per_train_s"], ".4f"))
        if any("gain_gold_over_seeds" in R[n] for n in names):
            row("gold gain over seeds: mean (SD)", lambda n: f"{R[n]['gain_gold_over_seeds']['mean']:+.3f} "
                                                             f"({R[n]['gain_gold_over_seeds']['sd']:.3f})")
        row("other processes' CPU share", lambda n: fmt(None if R[n]["usage"].get("other_cpu_share") is None
                                                        else 100 * R[n]["usage"]["other_cpu_share"], ".0f", "%"))
        head.append(f"DPO: {'included' if res['dpo']['included'] else 'not included: ' + res['dpo']['why']}")
    notes = "\n".join(f"  - {n}" for n in res["notes"])
    return "\n".join(head) + "\n\n" + _table(names, heads, rows) + "\n\nWhat the figures mean:\n" + notes


# ---------------------------------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--eval-config":
        return eval_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", action="store_true",
                    help="part 2: ours gae vs rloo vs grpo vs dpo on the same work (writes methods.json)")
    ap.add_argument("--models", type=Path, default=None,
                    help="a directory with the tiny sft/ and reward/ models (default: runs/tiny, else built)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch: runs, recipes, logs")
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: results-dir/rloo_vs_trl.json or "
                                                           "methods.json)")
    add_timing_arguments(ap)
    ap.add_argument("--seeds", type=int, default=1,
                    help="training seeds (0, 1, ...): further seeds run once each and give the seed-to-seed spread "
                         "of the gains")
    ap.add_argument("--eval-seeds", type=int, default=4, help="sampling seeds of the held-out evaluation")
    ap.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts evaluated")
    ap.add_argument("--cpu-lock", type=Path, default=None,
                    help="take an exclusive flock on this file around each run and evaluation")
    ap.add_argument("--show", type=Path, default=None, help="print the table of a results JSON and exit")
    ap.add_argument("--quiet", action="store_true", help="do not echo the trainers' output")
    args = ap.parse_args()
    if args.show:
        print(report(json.loads(args.show.read_text())))
        return 0
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    models_env = bench_env(args.threads, Path("/nonexistent"))
    models, note = ensure_models(args, models_env)
    env = bench_env(args.threads, models / "reward")
    say(f"work dir {args.workdir}; models {models}; {os.cpu_count()} CPU cores, load avg {loadavg()}")
    res = part_methods(args, env, models, note) if args.methods else part_trl(args, env, models, note)
    res.update({
        "title": ("ours: PPO (gae) vs RLOO vs GRPO" if args.methods else "ours (rloo) vs TRL's RLOOTrainer"),
        "date": date,
        "elapsed_s": time.time() - started,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
                    "threads": args.threads, "load_avg_at_end": loadavg()},
        "versions": {"python_packages": {k: v for k, v in versions(sys.executable).items()},
                     "rlhf_pipeline_commit": git_commit()},
        "work": WORK,
        "target": TARGET if not args.methods else None,
        "eval": {"prompts": args.eval_prompts, "seeds": args.eval_seeds},
        "options": {k: str(v) for k, v in vars(args).items()},
        "command": shlex.join([sys.executable, *sys.argv]),
    })
    out = args.out or args.results_dir / ("methods.json" if args.methods else "rloo_vs_trl.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("\n" + report(json.loads(out.read_text())) + "\n", flush=True)
    say(f"done in {res['elapsed_s']:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
