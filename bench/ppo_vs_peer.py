#!/usr/bin/env python
"""Benchmark: our PPO (`rlhf ppo`) against the peer (TRL 1.12.0's old PPOTrainer, ../shared/peer/run_peer.py).

Both trainers run on this machine, one after the other, from the same artifacts (policy, reward model, tokenizer,
prompts) with the same PPO numbers, and the benchmark prints episodes/s, peak RSS and score gain of each, with the
ratios ours / peer. See bench/README.md for what every figure means.

    .venv/bin/python bench/ppo_vs_peer.py --setting tiny          # ~2.5 min on 2 quiet cores (first run: +2-5 min)
    .venv/bin/python bench/ppo_vs_peer.py --setting gpt2-small    # ~5 min on 2 quiet cores (first run: +1 min)
    .venv/bin/python bench/ppo_vs_peer.py --setting all

Settings:
  tiny        the peer's default artifacts (1.19M-parameter GPT-2 policy and reward model, trained by the peer's
              prep), full fine-tuning, 1,024 episodes. Ours runs twice: value.mode separate (value model initialised
              from the reward model, the peer's setting) and shared (value head on the policy trunk).
              Target: ours >= 2x the peer's episodes/s at equal or better score gain.
  gpt2-small  random-init GPT-2-small-sized policy and reward model (12 layers, 12 heads, 768 wide, 128 positions,
              vocabulary padded to GPT-2's 50,257 -> 124M parameters each), a few updates. Ours: LoRA, value
              shared, reference = adapter disabled. Peer: full fine-tuning (policy, reference, value and reward:
              four full models). Target: ours peak RSS <= 0.4x the peer's. Scores are meaningless (random models).
              Ours runs a second time with training.eval_batch_size 16 (--small-eval-batch-variant): with the
              default (64) our peak comes from the held-out evaluation, not from training.

Each measured trainer runs in its own child of a tiny wrapper process; the wrapper reports
getrusage(RUSAGE_CHILDREN).ru_maxrss after the child exits, so the peak RSS covers that one trainer process only.

This script needs only the standard library and PyYAML; it runs in the project's venv (it calls the `rlhf` console
script next to its own interpreter). The peer runs in a virtual environment of its own, which this script creates
(torch==2.13.0 first so that the CPU wheel is taken, then trl==1.12.0 transformers accelerate datasets peft).
Nothing of the peer is copied: its script is run where it lies.
"""

from __future__ import annotations

import argparse
import datetime as _dt
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

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEER_SCRIPT = REPO.parent / "shared" / "peer" / "run_peer.py"
DEFAULT_WORKDIR = Path("/tmp/rlhf-bench")
DEFAULT_RESULTS = REPO / "bench" / "results"

PEER_PIP_STEPS = [["torch==2.13.0"], ["trl==1.12.0", "transformers", "accelerate", "datasets", "peft"]]
PEER_PREP_KEYS = ["seed", "n_reviews", "vocab_size", "n_layer", "n_embd", "n_head", "sft_steps", "rm_steps",
                  "prep_bs", "n_prompts", "n_eval"]
VERSION_PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"]

# The work both trainers do, per setting. `prep` = extra --prep-only args for the peer (none: its defaults).
SETTINGS = {
    "tiny": {
        "prep": [],
        "lora": False,
        "total_episodes": 1024,
        "rollout_batch_size": 32,
        "num_mini_batches": 4,
        "ppo_epochs": 4,
        "response_length": 24,
        "temperature": 0.7,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "missing_eos_penalty": 1.0,
        "learning_rate": 3e-5,  # the peer's default for full fine-tuning
        "window": 4,  # updates averaged for the training-score start / end
    },
    "gpt2-small": {
        # the peer's prep at GPT-2-small sizes with no training: it writes the tokenizer, the prompts and its
        # cache key (prep_info.json); the bench then puts its own 124M random-init models in place of the
        # peer's policy/ and reward/ (symbolic links into the bench's models/ dir)
        "prep": ["--n_layer", "12", "--n_embd", "768", "--n_head", "12", "--sft_steps", "0", "--rm_steps", "0"],
        "total_episodes": 64,
        "rollout_batch_size": 16,
        "num_mini_batches": 2,
        "ppo_epochs": 1,
        "response_length": 24,
        "temperature": 0.7,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "missing_eos_penalty": 1.0,
        "learning_rate": 3e-5,  # peer, full fine-tuning (its default)
        "lora_learning_rate": 3e-4,  # ours, LoRA (the peer's LoRA default)
        "window": 1,
        # ours only; the peer runs full fine-tuning (policy, reference copy, value model, reward model)
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]},
    },
}

TARGETS = {
    "tiny": "ours >= 2x the peer's episodes/s at equal or better score gain, where the score gain is the held-out gain "
            "(penalized: mean score on the held-out prompts after training minus before, 1.0 subtracted for a "
            "response without EOS) and 'equal or better' means not below the peer's by 2 SE of the difference or more "
            "(one draw of 64 prompts per trainer and phase is noisy); the training gain is reported beside it",
    "gpt2-small": "ours peak RSS <= 0.4x the peer's (ours LoRA + shared value vs the peer's four full models)",
}

# Runs a command as its only child and reports that child's peak RSS (ru_maxrss of RUSAGE_CHILDREN: the largest
# RSS among the waited-for descendants, i.e. the trainer process; the wrapper itself is not counted).
WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.time()
rc = subprocess.call(cmd)
wall = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024.0, "user_s": ru.ru_utime,
               "sys_s": ru.ru_stime}, f)
sys.exit(rc)
"""

# Builds the gpt2-small models (run with the peer venv's python: same transformers as the peer that loads them).
BUILD_SMALL = r"""
import json, sys, torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
tok_dir, out_dir, vocab, seed, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(tok_dir)
kw = dict(vocab_size=max(vocab, len(tok)), n_positions=128, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
          pad_token_id=tok.pad_token_id)
torch.manual_seed(seed)
policy = GPT2LMHeadModel(GPT2Config(**kw))
policy.generation_config.pad_token_id = tok.pad_token_id
policy.generation_config.eos_token_id = tok.eos_token_id
policy.generation_config.bos_token_id = tok.bos_token_id
policy.save_pretrained(out_dir + "/policy")
torch.manual_seed(seed + 1)
reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **kw))
reward.save_pretrained(out_dir + "/reward")
tok.save_pretrained(out_dir + "/reward")  # our reward loader reads the tokenizer from the reward model's dir
info = {"vocab_size": kw["vocab_size"], "tokenizer_size": len(tok),
        "policy_params": sum(p.numel() for p in policy.parameters()),
        "reward_params": sum(p.numel() for p in reward.parameters()), "seed": seed}
with open(out_dir + "/models.json", "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
"""

# Sampling noise of the held-out score: the 64-prompt mean score of a policy, re-sampled with n seeds (the same
# sampling settings as training; score = reward model at the last real token, minus the missing-EOS penalty).
EVAL_NOISE = r"""
import json, statistics, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
tok = AutoTokenizer.from_pretrained(cfg["tokenizer"])
rm = AutoModelForSequenceClassification.from_pretrained(cfg["reward"]).eval()
prompts = json.load(open(cfg["prompts"]))["eval"]
ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
L = max(len(x) for x in ids)
q = torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids])
qm = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
out = {}
for label, path in cfg["policies"].items():
    pol = AutoModelForCausalLM.from_pretrained(path).eval()
    means, raw_means, eos_rates = [], [], []
    for seed in range(cfg["seeds"]):
        torch.manual_seed(1000 + seed)
        with torch.no_grad():
            seq = pol.generate(input_ids=q, attention_mask=qm, do_sample=True, temperature=cfg["temperature"],
                               top_k=0, top_p=1.0, max_new_tokens=cfg["response_length"],
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            resp = seq[:, L:]
            is_eos = resp == tok.eos_token_id
            has = is_eos.any(1)
            first = torch.where(has, is_eos.int().argmax(1), torch.full_like(has, resp.shape[1] - 1, dtype=torch.long))
            keep = torch.arange(resp.shape[1])[None] <= first[:, None]
            resp = torch.where(keep, resp, torch.full_like(resp, tok.pad_token_id))
            full = torch.cat([q, resp], 1)
            mask = torch.cat([qm, keep.long()], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            h = rm.base_model(input_ids=full, attention_mask=mask, position_ids=pos).last_hidden_state
            score = rm.score(h[torch.arange(len(ids)), L + first]).squeeze(-1)
        raw_means.append(score.mean().item())
        means.append((score - cfg["penalty"] * (~has).float()).mean().item())
        eos_rates.append(has.float().mean().item())
    out[label] = {"mean": statistics.mean(means), "sd_of_mean": statistics.stdev(means),
                  "raw_mean": statistics.mean(raw_means), "raw_sd_of_mean": statistics.stdev(raw_means),
                  "eos_rate": statistics.mean(eos_rates), "seeds": cfg["seeds"], "prompts": len(ids)}
print(json.dumps(out))
"""

VERSIONS = r"""
import json, importlib.metadata as m, sys
out = {"python": sys.version.split()[0]}
for p in sys.argv[1:]:
    try:
        out[p] = m.version(p)
    except m.PackageNotFoundError:
        out[p] = None
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
        "TQDM_MININTERVAL": "15", "PYTHONUNBUFFERED": "1",
    })
    env.pop("VIRTUAL_ENV", None)
    return env


def stream(cmd: list[str], log_path: Path, tag: str, env: dict[str, str], quiet: bool = False) -> int:
    """Run cmd, copy its output to log_path and (unless quiet) to the console, prefixed by tag."""
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env, cwd=REPO, bufsize=1) as proc:
        for line in proc.stdout:  # universal newlines: tqdm's \r updates come out as lines
            log.write(line)
            line = line.rstrip()
            if line and not quiet:
                print(f"    [{tag}] {line[:200]}", flush=True)
        return proc.wait()


def cpu_busy_seconds() -> float | None:
    """CPU-seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def busy_fraction(seconds: float = 5.0) -> float | None:
    """Share of all cores busy over the next `seconds` (0 = idle machine, 1 = all cores busy)."""
    a = cpu_busy_seconds()
    time.sleep(seconds)
    b = cpu_busy_seconds()
    return None if a is None or b is None else (b - a) / (seconds * (os.cpu_count() or 1))


def wait_until_quiet(threshold: float, max_wait: float) -> float | None:
    """Wait (at most max_wait s) until other processes use less than `threshold` of the cores."""
    t0 = time.time()
    while True:
        busy = busy_fraction()
        if busy is None or busy < threshold or time.time() - t0 >= max_wait:
            if busy is not None and busy >= threshold:
                say(f"machine still {100 * busy:.0f}% busy after waiting {time.time() - t0:.0f}s: running anyway")
            return busy
        say(f"machine {100 * busy:.0f}% busy (other processes): waiting for it to calm down")
        time.sleep(10)


def measured(cmd: list[str], log_path: Path, tag: str, env: dict[str, str], quiet: bool) -> dict:
    """Run cmd under the RSS wrapper; return the wrapper's report (rc, wall_s, peak_rss_mb, ...) plus how much CPU
    other processes took meanwhile (other_cpu_share: their CPU-seconds / (wall x cores); 0 = undisturbed)."""
    report = log_path.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    load_before = loadavg()
    busy0 = cpu_busy_seconds()
    rc = stream([sys.executable, "-c", WRAPPER, str(report), *cmd], log_path, tag, env, quiet)
    busy1 = cpu_busy_seconds()
    if not report.exists():
        raise SystemExit(f"{tag}: the wrapper wrote no report (exit {rc}); see {log_path}")
    out = json.loads(report.read_text())
    out.update(load_before=load_before, load_after=loadavg(), log=str(log_path))
    out["cpu_cores_used"] = (out["user_s"] + out["sys_s"]) / out["wall_s"] if out["wall_s"] else None
    if busy0 is not None and busy1 is not None and out["wall_s"]:
        other = max(0.0, (busy1 - busy0) - out["user_s"] - out["sys_s"])
        out["other_cpu_share"] = other / (out["wall_s"] * (os.cpu_count() or 1))
    else:
        out["other_cpu_share"] = None
    if out["rc"] != 0:
        tail = "".join(log_path.read_text().splitlines(True)[-30:])
        raise SystemExit(f"{tag} failed (exit {out['rc']}); last lines of {log_path}:\n{tail}")
    return out


def versions(python: str) -> dict:
    out = subprocess.run([python, "-c", VERSIONS, *VERSION_PACKAGES], capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def se_of_gain(start: list, end: list):
    """SE of mean(end) - mean(start) from the update-to-update spread of the per-update batch means at each end."""
    if len(start) < 2 or len(end) < 2:
        return None
    return (statistics.variance(start) / len(start) + statistics.variance(end) / len(end)) ** 0.5


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                           check=False)
    if out.returncode:
        return None
    return out.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------------------------
# the peer's environment and artifacts
# ---------------------------------------------------------------------------------------------------------------
def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(venv: Path, env: dict[str, str]) -> str:
    """Reuse the peer venv if it imports trl 1.12.0 and torch; otherwise (re)create it. Returns how."""
    check = ("import torch, transformers, accelerate, datasets, peft, trl; "
             "assert trl.__version__ == '1.12.0', trl.__version__")
    py = peer_python(venv)
    ok = py.exists() and subprocess.run([str(py), "-c", check], capture_output=True, env=env,
                                        check=False).returncode == 0
    if ok:
        say(f"peer venv: reusing {venv}")
        return "reused"
    say(f"peer venv: creating {venv} (torch==2.13.0 first, then trl==1.12.0 ...; a few minutes)")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "venv-peer-setup.log"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    steps = [[base_python, "-m", "venv", str(venv)]]
    steps += [[str(py), "-m", "pip", "install", *pkgs] for pkgs in PEER_PIP_STEPS]
    with open(log, "w") as handle:
        for cmd in steps:
            handle.write(f"$ {shlex.join(cmd)}\n")
            handle.flush()
            rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
            if rc:
                raise SystemExit(f"creating the peer venv failed at `{shlex.join(cmd)}`; see {log}")
    out = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"the peer venv at {venv} does not import trl 1.12.0: {out.stderr[-800:]}")
    return "created"


def ensure_artifacts(setting: str, spec: dict, peer_dir: Path, py: Path, script: Path, env: dict[str, str],
                     rebuild: bool, quiet: bool) -> tuple[dict, dict]:
    """Build the peer's artifacts once (its --prep-only); return (prep_args, prep_info)."""
    art = peer_dir / "artifacts"
    info_path = art / "prep_info.json"
    if rebuild and art.exists():
        shutil.rmtree(art)
    if info_path.exists():
        say(f"{setting}: reusing the peer's artifacts in {art} (--rebuild-artifacts to build them again)")
    else:
        peer_dir.mkdir(parents=True, exist_ok=True)
        if art.exists():
            shutil.rmtree(art)  # an interrupted prep (prep_info.json is written last)
        cmd = [str(py), str(script), "--workdir", str(peer_dir), "--prep-only", *spec["prep"]]
        say(f"{setting}: building the artifacts with the peer's prep: {shlex.join(cmd)}")
        t0 = time.time()
        rc = stream(cmd, peer_dir / "prep.log", "peer prep", env, quiet)
        if rc or not info_path.exists():
            raise SystemExit(f"the peer's prep failed (exit {rc}); see {peer_dir / 'prep.log'}")
        say(f"{setting}: artifacts built in {time.time() - t0:.0f}s")
    info = json.loads(info_path.read_text())
    return info["args"], info


def install_small_models(bench_dir: Path, art: Path, py: Path, vocab: int, seed: int, threads: int,
                         env: dict[str, str]) -> dict:
    """Our own random-init GPT-2-small policy and reward model, put in place of the peer's prep models."""
    models = bench_dir / "models"
    info_path = models / "models.json"
    want_vocab = vocab
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("vocab_size") != max(want_vocab, info.get("tokenizer_size", 0)) or info.get("seed") != seed:
            shutil.rmtree(models)
    if not info_path.exists():
        if models.exists():
            shutil.rmtree(models)
        models.mkdir(parents=True)
        say("gpt2-small: building the random-init 124M policy and reward model")
        out = subprocess.run([str(py), "-c", BUILD_SMALL, str(art / "tokenizer"), str(models), str(vocab), str(seed),
                              str(threads)], capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            raise SystemExit(f"building the gpt2-small models failed:\n{out.stderr[-2000:]}")
    info = json.loads(info_path.read_text())
    for name in ("policy", "reward"):
        target = art / name
        if target.is_symlink() and target.resolve() == (models / name).resolve():
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)  # the peer's own random init of the same sizes (vocabulary: the tokenizer's)
        target.symlink_to(models / name, target_is_directory=True)
    (art / "BENCH_MODELS.txt").write_text(
        f"policy/ and reward/ here are links to {models} (built by bench/ppo_vs_peer.py): random-init GPT-2-small "
        f"models, vocabulary {info['vocab_size']}; the peer's prep_info.json is left as its prep wrote it.\n")
    return info


# ---------------------------------------------------------------------------------------------------------------
# our inputs: data files, a reward dir with a tokenizer, recipes
# ---------------------------------------------------------------------------------------------------------------
def prepare_ours(setting: str, spec: dict, bench_dir: Path, art: Path, small_models: Path | None) -> dict:
    prompts = json.loads((art / "prompts.json").read_text())
    data = bench_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "eval"):
        path = data / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[split]))
        files[split] = str(path)
    if small_models is not None:
        policy, reward = small_models / "policy", small_models / "reward"
    else:
        policy, reward = art / "policy", art / "reward"
        if not (reward / "tokenizer_config.json").exists():
            # our reward loader reads the tokenizer from the reward model's dir: a bench-local copy with it added;
            # the peer's artifacts are never modified
            local = bench_dir / "reward-with-tokenizer"
            if local.exists():
                shutil.rmtree(local)
            shutil.copytree(reward, local)
            for f in (art / "tokenizer").iterdir():
                shutil.copy2(f, local / f.name)
            reward = local
    return {"files": files, "policy": str(policy), "tokenizer": str(art / "tokenizer"), "reward": str(reward),
            "n_train": len(prompts["train"]), "n_eval": len(prompts["eval"])}


def write_recipe(path: Path, spec: dict, inputs: dict, variant: dict, seed: int, output_dir: Path) -> None:
    import yaml

    lora = spec["lora"] if isinstance(spec["lora"], dict) else None
    recipe = {
        "stage": "ppo",
        "seed": seed,
        "output_dir": str(output_dir),
        "policy": {"name_or_path": inputs["policy"], "dtype": "float32"},
        "tokenizer": {"name_or_path": inputs["tokenizer"]},
        "reward": {"model": inputs["reward"], "dtype": "float32"},
        "value": {"mode": variant["mode"]},
        "data": {"files": {"train": inputs["files"]["train"], "eval": inputs["files"]["eval"]},
                 "eval_split": "eval"},
        "generation": {"response_length": spec["response_length"], "temperature": spec["temperature"]},
        "training": {
            "total_episodes": spec["total_episodes"],
            "rollout_batch_size": spec["rollout_batch_size"],
            "num_mini_batches": spec["num_mini_batches"],
            "ppo_epochs": spec["ppo_epochs"],
            "learning_rate": spec["lora_learning_rate"] if lora else spec["learning_rate"],
            "kl_coef": spec["kl_coef"],
            "kl_estimator": spec["kl_estimator"],
            "missing_eos_penalty": spec["missing_eos_penalty"],
            # the peer's optimizer: AdamW eps 1e-8 (TRL's default) and no gradient clipping (its PPO ignores
            # max_grad_norm), so that both trainers take the same kind of steps
            "adam_eps": 1e-8,
            "max_grad_norm": None,
            "mixed_precision": "no",
            "eval_prompts": inputs["n_eval"],
            "report_to": "none",
        },
    }
    if lora:
        recipe["peft"] = dict(lora)
    for key, value in variant.get("overrides", {}).items():  # e.g. training.eval_batch_size
        section, name = key.split(".")
        recipe[section][name] = value
    header = ("# Written by bench/ppo_vs_peer.py: our PPO on the peer's artifacts, with the peer's PPO numbers.\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def peer_command(py: Path, script: Path, peer_dir: Path, prep_args: dict, spec: dict, threads: int,
                 out: Path) -> list[str]:
    cmd = [str(py), str(script), "--workdir", str(peer_dir), "--out", str(out), "--threads", str(threads)]
    for key in PEER_PREP_KEYS:  # the same prep args as the cache key: the peer reuses the artifacts, builds nothing
        cmd += [f"--{key}", str(prep_args[key])]
    cmd += ["--total_episodes", str(spec["total_episodes"]),
            "--per_device_train_batch_size", str(spec["rollout_batch_size"]),
            "--gradient_accumulation_steps", "1",
            "--num_mini_batches", str(spec["num_mini_batches"]),
            "--num_ppo_epochs", str(spec["ppo_epochs"]),
            "--local_rollout_forward_batch_size", str(spec["rollout_batch_size"]),
            "--response_length", str(spec["response_length"]),
            "--learning_rate", str(spec["learning_rate"]),
            "--kl_coef", str(spec["kl_coef"]),
            "--kl_estimator", spec["kl_estimator"],
            "--temperature", str(spec["temperature"]),
            "--missing_eos_penalty", str(spec["missing_eos_penalty"]),
            "--window", str(spec["window"])]
    return cmd


def rlhf_command(recipe: Path, output_dir: Path) -> list[str]:
    exe = Path(sys.executable).parent / "rlhf"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf_pipeline"]
    return [*head, "ppo", str(recipe), "--output-dir", str(output_dir)]


def run_peer(cmd: list[str], out: Path, peer_dir: Path, spec: dict, env: dict, log: Path, quiet: bool) -> dict:
    info = peer_dir / "artifacts" / "prep_info.json"
    stamp = info.stat().st_mtime
    out.unlink(missing_ok=True)
    usage = measured(cmd, log, "peer", env, quiet)
    if info.stat().st_mtime != stamp:
        raise SystemExit("the peer rebuilt its artifacts during the measured run (its cache key did not match): "
                         "the peak RSS would include its prep; this is a bug in the bench")
    data = json.loads(out.read_text())
    s, rows = data["summary"], data["log"]
    p = spec["missing_eos_penalty"]
    w = spec["window"]
    batch = spec["rollout_batch_size"]
    # TRL logs objective/scores WITH the missing-EOS penalty; val/num_eos_tokens counts responses holding EOS
    raw_rows = [r["objective/scores"] + p * (1 - r["val/num_eos_tokens"] / batch) for r in rows
                if "val/num_eos_tokens" in r]
    upd = [r["update_s"] for r in rows]
    other = s["wall_s"] - s["gen_s"] - s["score_s"] - s["ref_fwd_s"]
    return {
        "usage": usage,
        "episodes": s["episodes"],
        "updates": s["updates"],
        "episodes_per_s": s["episodes_per_s"],
        "train_wall_s": s["wall_s"],
        "peak_rss_mb": usage["peak_rss_mb"],
        "peak_rss_mb_self_reported": s["peak_rss_mb"],
        "update_s_mean": mean(upd),
        "update_s_median": statistics.median(upd) if upd else None,
        "update_s_after_first_mean": mean(upd[1:]) if len(upd) > 1 else None,
        "time_split_s": {"generation": s["gen_s"], "scoring (reference + value + reward forward)":
                         s["score_s"] + s["ref_fwd_s"], "training and the rest": other},
        "eval_penalized_before": s["eval_score_before"],
        "eval_penalized_after": s["eval_score_after"],
        "eval_raw_before": s["eval_score_before"] + p * (1 - s["eval_eos_frac_before"]),
        "eval_raw_after": s["eval_score_after"] + p * (1 - s["eval_eos_frac_after"]),
        "eval_eos_before": s["eval_eos_frac_before"],
        "eval_eos_after": s["eval_eos_frac_after"],
        "train_penalized_start": s["score_start"],
        "train_penalized_end": s["score_end"],
        "gain_train_penalized_se": se_of_gain([r["objective/scores"] for r in rows[:w]],
                                              [r["objective/scores"] for r in rows[-w:]]),
        "train_raw_start": mean(raw_rows[:w]) if raw_rows else None,
        "train_raw_end": mean(raw_rows[-w:]) if raw_rows else None,
        "kl_end": s["kl_end"],
        "trainable_params": s["trainable_params"],
        "policy_params": s["policy_params"],
        "out_json": str(out),
    }


def run_ours(cmd: list[str], output_dir: Path, spec: dict, env: dict, log: Path, tag: str, quiet: bool) -> dict:
    if output_dir.exists():
        shutil.rmtree(output_dir)
    usage = measured(cmd, log, tag, env, quiet)
    m = json.loads((output_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    p = spec["missing_eos_penalty"]
    w = spec["window"]
    upd = [r["time/update"] for r in rows]
    split = {"generation": sum(r["time/generation"] for r in rows),
             "scoring (policy/value + reference + reward forward)": sum(r["time/scoring"] for r in rows),
             "training": sum(r["time/training"] for r in rows)}
    return {
        "usage": usage,
        "episodes": m["episodes"],
        "updates": m["num_updates"],
        "episodes_per_s": m["episodes_per_second"],
        "train_wall_s": m["train_runtime"],
        "peak_rss_mb": usage["peak_rss_mb"],
        "update_s_mean": mean(upd),
        "update_s_median": statistics.median(upd) if upd else None,
        "update_s_after_first_mean": mean(upd[1:]) if len(upd) > 1 else None,
        "time_split_s": split,
        # our eval_score_* are raw reward-model scores; the penalized form uses the same formula as the peer's
        "eval_raw_before": m["eval_score_before"],
        "eval_raw_after": m["eval_score_after"],
        "eval_penalized_before": m["eval_score_before"] - p * (1 - m["eval_eos_rate_before"]),
        "eval_penalized_after": m["eval_score_after"] - p * (1 - m["eval_eos_rate_after"]),
        "eval_eos_before": m["eval_eos_rate_before"],
        "eval_eos_after": m["eval_eos_rate_after"],
        "train_penalized_start": mean(r["objective/score_used"] for r in rows[:w]),
        "train_penalized_end": mean(r["objective/score_used"] for r in rows[-w:]),
        "gain_train_penalized_se": se_of_gain([r["objective/score_used"] for r in rows[:w]],
                                              [r["objective/score_used"] for r in rows[-w:]]),
        "train_raw_start": mean(r["objective/score"] for r in rows[:w]),
        "train_raw_end": mean(r["objective/score"] for r in rows[-w:]),
        "kl_end": mean(r["objective/kl"] for r in rows[-w:]),
        "optimizer_steps": m["optimizer_steps"],
        "output_dir": str(output_dir),
    }


def add_gains(r: dict) -> None:
    for kind in ("eval_penalized", "eval_raw", "train_penalized", "train_raw"):
        a, b = r.get(f"{kind}_after" if kind.startswith("eval") else f"{kind}_end"), \
            r.get(f"{kind}_before" if kind.startswith("eval") else f"{kind}_start")
        r[f"gain_{kind}"] = a - b if a is not None and b is not None else None


# ---------------------------------------------------------------------------------------------------------------
# one setting
# ---------------------------------------------------------------------------------------------------------------
def run_setting(setting: str, args, env: dict) -> dict:
    spec = dict(SETTINGS[setting])
    if setting == "gpt2-small":
        spec["ppo_epochs"] = args.small_ppo_epochs
        variants = [{"name": f"ours-{m}", "mode": m} for m in args.small_value_modes]
        if args.small_eval_batch_variant:
            # our evaluate() holds full-vocabulary logits of policy and reference for a whole eval batch: the same
            # run with smaller eval batches shows how much of our peak that is
            variants += [{"name": f"ours-{m}-evalbatch{args.small_eval_batch_variant}", "mode": m,
                          "overrides": {"training.eval_batch_size": args.small_eval_batch_variant}}
                         for m in args.small_value_modes]
    else:
        variants = [{"name": f"ours-{m}", "mode": m} for m in args.value_modes]
    spec["variants"] = variants
    started = time.time()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    script = args.peer_script.resolve()
    py = peer_python(args.peer_venv)
    bench_dir = args.workdir / setting
    peer_dir = bench_dir / "peer"
    runs = bench_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    prep_args, prep_info = ensure_artifacts(setting, spec, peer_dir, py, script, env, args.rebuild_artifacts,
                                            args.quiet)
    art = peer_dir / "artifacts"
    small = None
    if setting == "gpt2-small":
        small = install_small_models(bench_dir, art, py, args.small_vocab, prep_args["seed"], args.threads, env)
    inputs = prepare_ours(setting, spec, bench_dir, art, bench_dir / "models" if small else None)
    seed = prep_args["seed"]

    commands, results, repeats = {}, {}, {"peer": [], **{v["name"]: [] for v in variants}}
    peer_out = runs / "peer.json"
    commands["peer"] = peer_command(py, script, peer_dir, prep_args, spec, args.threads, peer_out)
    for v in variants:
        recipe = bench_dir / f"recipe-{v['name']}.yaml"
        out_dir = runs / v["name"]
        write_recipe(recipe, spec, inputs, v, seed, out_dir)
        commands[v["name"]] = rlhf_command(recipe, out_dir)

    for rep in range(args.repeats):
        order = list(commands) if rep % 2 == 0 else list(reversed(commands))
        for name in order:
            for attempt in range(1 + args.max_retries):
                if args.busy_threshold < 1:
                    wait_until_quiet(args.busy_threshold, args.max_wait)
                say(f"{setting}: {name}, run {rep + 1}/{args.repeats}"
                    f"{f' (retry {attempt})' if attempt else ''}, load avg {loadavg()}: {shlex.join(commands[name])}")
                t0 = time.time()
                if name == "peer":
                    r = run_peer(commands[name], peer_out, peer_dir, spec, env, runs / "peer.log", args.quiet)
                else:
                    r = run_ours(commands[name], runs / name, spec, env, runs / f"{name}.log", name, args.quiet)
                add_gains(r)
                r["repeat"], r["attempt"] = rep + 1, attempt
                repeats[name].append(r)
                other = r["usage"]["other_cpu_share"]
                say(f"{setting}: {name} done in {time.time() - t0:.0f}s: {r['episodes_per_s']:.2f} episodes/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MiB, held-out gain (penalized) {r['gain_eval_penalized']:+.3f}; "
                    f"other processes took {fmt(None if other is None else 100 * other, '.0f', '%')} of the CPU")
                if other is None or other < args.busy_threshold:
                    break
                if attempt < args.max_retries:
                    say(f"{setting}: {name} was disturbed by other processes: running it again")
    for name, reps in repeats.items():
        # timings: the fastest run (the least disturbed by other load); every run is kept in the JSON
        results[name] = max(reps, key=lambda r: r["episodes_per_s"])

    # a single run is one trajectory: ours again with other seeds shows how far gains move from seed to seed (the
    # peer's seed also rebuilds its artifacts, so only ours can be re-seeded on the same models)
    seed_spread = {}
    if setting == "tiny" and args.our_seeds:
        for v in variants:
            gains = {"seeds": [seed], "gain_train_penalized": [results[v["name"]]["gain_train_penalized"]],
                     "gain_eval_penalized": [results[v["name"]]["gain_eval_penalized"]]}
            for extra in range(1, args.our_seeds + 1):
                name = f"{v['name']}-seed{seed + extra}"
                recipe, out_dir = bench_dir / f"recipe-{name}.yaml", runs / name
                write_recipe(recipe, spec, inputs, v, seed + extra, out_dir)
                say(f"{setting}: {v['name']} with seed {seed + extra} (gains only)")
                r = run_ours(rlhf_command(recipe, out_dir), out_dir, spec, env, runs / f"{name}.log", name, args.quiet)
                add_gains(r)
                gains["seeds"].append(seed + extra)
                for kind in ("gain_train_penalized", "gain_eval_penalized"):
                    gains[kind].append(r[kind])
            for kind in ("gain_train_penalized", "gain_eval_penalized"):
                gains[f"{kind}_mean"] = statistics.mean(gains[kind])
                gains[f"{kind}_sd"] = statistics.stdev(gains[kind])
            seed_spread[v["name"]] = gains

    noise = None
    if setting == "tiny" and args.noise_seeds > 1:
        say(f"{setting}: sampling noise of the held-out score ({args.noise_seeds} seeds x {inputs['n_eval']} prompts)")
        cfg = {"threads": args.threads, "tokenizer": inputs["tokenizer"], "reward": inputs["reward"],
               "prompts": str(art / "prompts.json"), "seeds": args.noise_seeds,
               "temperature": spec["temperature"], "response_length": spec["response_length"],
               "penalty": spec["missing_eos_penalty"],
               "policies": {"initial": inputs["policy"],
                            **{v["name"]: str(runs / v["name"]) for v in variants}}}
        out = subprocess.run([sys.executable, "-c", EVAL_NOISE, json.dumps(cfg)], capture_output=True, text=True,
                             env=env, cwd=REPO, check=False)
        if out.returncode:
            say(f"{setting}: the noise estimate failed (left out): {out.stderr[-500:]}")
        else:
            noise = json.loads(out.stdout.strip().splitlines()[-1])

    peer = results["peer"]
    comparisons = {}
    for v in variants:
        ours = results[v["name"]]
        c = {"episodes_per_s": ratio(ours["episodes_per_s"], peer["episodes_per_s"]),
             "peak_rss": ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),
             "update_s": ratio(ours["update_s_mean"], peer["update_s_mean"])}
        for kind in ("eval_penalized", "eval_raw", "train_penalized", "train_raw"):
            c[f"gain_{kind}"] = ratio(ours[f"gain_{kind}"], peer[f"gain_{kind}"])
            c[f"gain_{kind}_difference"] = (ours[f"gain_{kind}"] - peer[f"gain_{kind}"]
                                            if ours[f"gain_{kind}"] is not None and peer[f"gain_{kind}"] is not None
                                            else None)
        if noise:
            # SE of one trainer's held-out gain: before and after are independent 64-prompt means; the peer's final
            # policy is not saved, so its spread is taken to be that of ours
            sd0, sd1 = noise["initial"]["sd_of_mean"], noise[v["name"]]["sd_of_mean"]
            se_gain = (sd0 ** 2 + sd1 ** 2) ** 0.5
            c["gain_eval_penalized_se"] = se_gain
            c["gain_eval_penalized_difference_se"] = se_gain * 2 ** 0.5
            c["gain_eval_penalized_difference_in_se"] = c["gain_eval_penalized_difference"] / (se_gain * 2 ** 0.5)
        spread = seed_spread.get(v["name"])
        if spread:
            # one run of each trainer: the difference of two single runs varies by sqrt(2) x the seed-to-seed SD
            # (ours' SD, taken for the peer's too)
            for kind in ("gain_train_penalized", "gain_eval_penalized"):
                c[f"{kind}_difference_in_seed_sd"] = c[f"{kind}_difference"] / (spread[f"{kind}_sd"] * 2 ** 0.5)
        if ours.get("gain_train_penalized_se") is not None and peer.get("gain_train_penalized_se") is not None:
            c["gain_train_penalized_difference_se"] = (ours["gain_train_penalized_se"] ** 2
                                                       + peer["gain_train_penalized_se"] ** 2) ** 0.5
            c["gain_train_penalized_difference_in_se"] = (c["gain_train_penalized_difference"]
                                                          / c["gain_train_penalized_difference_se"])
        if setting == "tiny":
            # the score gain of the target is the held-out gain; being one draw per trainer and phase, "equal or
            # better" allows for its noise: not below the peer's by 2 SE of the difference or more
            held_out_ok = (c["gain_eval_penalized_difference"] > -2 * c["gain_eval_penalized_difference_se"]
                           if "gain_eval_penalized_difference_se" in c else c["gain_eval_penalized_difference"] >= 0)
            c["target_parts"] = {"speed >= 2x": c["episodes_per_s"] >= 2.0,
                                 "held-out gain (penalized) not below the peer's by 2 SE or more": held_out_ok,
                                 "held-out gain (penalized) >= peer's (single draws, reported)":
                                     c["gain_eval_penalized_difference"] >= 0,
                                 "training gain (penalized) >= peer's (reported)":
                                     c["gain_train_penalized_difference"] >= 0}
            missed = []
            if c["episodes_per_s"] < 2.0:
                missed.append(f"speed {c['episodes_per_s']:.2f}x < 2x")
            if not held_out_ok:
                difference = c["gain_eval_penalized_difference"]
                missed.append(f"held-out gain {difference:+.2f}, 2 SE or more below the peer's")
            c["target_met"] = not missed
            c["target_verdict"] = "YES" if not missed else "no: " + "; ".join(missed)
        else:
            c["target_met"] = bool(c["peak_rss"] <= 0.4)
            c["target_verdict"] = "YES" if c["target_met"] else f"no: RSS {c['peak_rss']:.2f}x > 0.4x"
        comparisons[v["name"]] = c

    return {
        "setting": setting,
        "date": date,
        "elapsed_s": time.time() - started,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
                    "threads": args.threads, "load_avg_at_end": loadavg()},
        "versions": {"ours": versions(sys.executable), "peer": versions(str(py)), "rlhf_pipeline_commit": git_commit()},
        "work": {k: v for k, v in spec.items() if k not in ("prep",)},
        "peer_prep": {"command_extra_args": spec["prep"], "prep_info": prep_info},
        "small_models": small,
        "inputs": inputs,
        "commands": {k: shlex.join(v) for k, v in commands.items()},
        "recipes": {v["name"]: (bench_dir / f"recipe-{v['name']}.yaml").read_text() for v in variants},
        "target": TARGETS[setting],
        "results": results,
        "repeats": repeats,
        "comparisons": comparisons,
        "eval_noise": noise,
        "seed_spread": seed_spread,
        "notes": NOTES[setting],
    }


NOTES = {
    "tiny": [
        ("episodes/s: episodes / training time (the peer: wall time of trainer.train(); ours: sum of per-update times, "
        "metrics.json episodes_per_second); model loading and the before/after evaluations are excluded for both."),
        ("peak RSS: ru_maxrss of the trainer process (whole process: loading, evaluation, training, saving), measured "
        "by a wrapper process via getrusage(RUSAGE_CHILDREN)."),
        ("held-out gain (penalized): mean score on the 64 held-out prompts after minus before training, one sample per "
        "prompt, score = reward-model score minus 1.0 for a response without EOS (the peer's own eval_score_*; ours: "
        "eval_score_* - 1.0 * (1 - eval_eos_rate_*)). A single draw per trainer: see its SE."),
        ("held-out gain (raw): the same without the missing-EOS penalty (ours: eval_score_*; the peer: eval_score_* + "
        "1.0 * (1 - eval_eos_frac_*))."),
        ("training gain (penalized): mean of the last 4 updates' batch score minus mean of the first 4 (the peer: "
        "score_end - score_start from objective/scores; ours: objective/score_used from log.jsonl)."),
        ("training gain (raw): the same without the penalty (ours: objective/score; the peer: objective/scores + 1.0 * "
        "(1 - val/num_eos_tokens / batch))."),
        ("Matched to the peer beyond the PPO numbers: AdamW eps 1e-8 and no gradient clipping (ours sets adam_eps "
        "1e-8 and max_grad_norm null; our defaults are 1e-5 and 1.0). Not matched: score position (ours: the last "
        "real token; TRL: one step past EOS), evaluation sampling seeds."),
    ],
    "gpt2-small": [
        "Random-init models: the score gains are meaningless here and are not compared.",
        ("Ours: LoRA (r 16, alpha 32, c_attn/c_proj/c_fc), value head on the policy trunk, reference = adapter "
        "disabled, lr 3e-4. Peer: full fine-tuning with a reference copy, a value model and the reward model (four "
        "full models), lr 3e-5."),
        ("time per update: mean of the per-update wall times (the peer: update_s; ours: time/update). The first update "
        "includes warm-up; update_s_after_first_mean leaves it out."),
        "peak RSS: ru_maxrss of the trainer process via a wrapper process (getrusage(RUSAGE_CHILDREN)).",
        ("ours-shared-evalbatch16: the same run with training.eval_batch_size 16 instead of the default 64 (our "
         "held-out evaluation holds full-vocabulary logits of policy and reference for a whole evaluation batch)."),
    ],
}


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def fmt(x, spec=".2f", suffix=""):
    if x is None:
        return "-"
    return f"{x:{spec}}{suffix}"


def table(res: dict) -> str:
    setting, results, comps = res["setting"], res["results"], res["comparisons"]
    names = list(results)
    heads = {"peer": "peer (TRL 1.12)", **{n: n for n in names if n != "peer"}}
    rows: list[tuple[str, list[str]]] = []

    def row(label, fn):
        rows.append((label, [fn(n) for n in names]))

    def rat(key):
        return lambda n: "1" if n == "peer" else fmt(comps[n][key], ".2f", "x")

    row("episodes/s", lambda n: fmt(results[n]["episodes_per_s"]))
    row("  ratio ours/peer", rat("episodes_per_s"))
    row("peak RSS (MiB)", lambda n: fmt(results[n]["peak_rss_mb"], ".0f"))
    row("  ratio ours/peer", rat("peak_rss"))
    row("time per update (s), mean", lambda n: fmt(results[n]["update_s_mean"]))
    row("  after the first update", lambda n: fmt(results[n]["update_s_after_first_mean"]))
    row("  ratio ours/peer", rat("update_s"))
    split_keys = ("generation", "scoring", "training")
    for i, label in enumerate(split_keys):
        row(f"  {label} share of train time", lambda n, i=i: _share(results[n], i))
    row("training time (s)", lambda n: fmt(results[n]["train_wall_s"], ".1f"))
    row("process wall time (s)", lambda n: fmt(results[n]["usage"]["wall_s"], ".1f"))
    if setting == "tiny":
        spread = res.get("seed_spread") or {}
        for kind, label in (("eval_penalized", "held-out gain, penalized"), ("eval_raw", "held-out gain, raw"),
                            ("train_penalized", "training gain, penalized"), ("train_raw", "training gain, raw")):
            b, a = (f"{kind}_before", f"{kind}_after") if kind.startswith("eval") else (f"{kind}_start",
                                                                                          f"{kind}_end")
            row(label, lambda n, kind=kind: fmt(results[n][f"gain_{kind}"], "+.3f"))
            row("  before -> after", lambda n, a=a, b=b: f"{fmt(results[n][b], '.3f')} -> {fmt(results[n][a], '.3f')}")
            row("  ratio ours/peer", rat(f"gain_{kind}"))
            if kind == "eval_penalized" and res.get("eval_noise"):
                row("  SE of a held-out gain (sampling)",
                    lambda n: "" if n == "peer" else fmt(comps[n].get("gain_eval_penalized_se"), ".3f"))
                row("  ours - peer, in SE of the difference",
                    lambda n: "" if n == "peer" else fmt(comps[n].get("gain_eval_penalized_difference_in_se"), "+.1f"))
            if kind == "train_penalized":
                row("  SE of the training gain (update-to-update spread)",
                    lambda n: fmt(results[n].get("gain_train_penalized_se"), ".3f"))
                row("  ours - peer, in SE of the difference",
                    lambda n: "" if n == "peer" else fmt(comps[n].get("gain_train_penalized_difference_in_se"), "+.1f"))
            if kind in ("eval_penalized", "train_penalized") and spread:
                key = f"gain_{kind}"
                row(f"  over {len(next(iter(spread.values()))['seeds'])} seeds of ours: mean (SD)",
                    lambda n, key=key: "" if n not in spread else
                    f"{spread[n][key + '_mean']:+.3f} ({spread[n][key + '_sd']:.3f})")
                row("  ours - peer, in seed-to-seed SD of a difference",
                    lambda n, key=key: "" if n not in spread else fmt(comps[n].get(f"{key}_difference_in_seed_sd"),
                                                                       "+.1f"))
        row("held-out EOS rate before -> after",
            lambda n: f"{fmt(results[n]['eval_eos_before'])} -> {fmt(results[n]['eval_eos_after'])}")
        row("KL at the end (last 4 updates)", lambda n: fmt(results[n]["kl_end"]))
    row("CPU cores used by the trainer", lambda n: fmt(results[n]["usage"].get("cpu_cores_used")))
    row("other processes' CPU share", lambda n: fmt(None if results[n]["usage"].get("other_cpu_share") is None
                                                    else 100 * results[n]["usage"]["other_cpu_share"], ".0f", "%"))
    row("load avg before run (1/5/15 min)", lambda n: "/".join(str(x) for x in results[n]["usage"]["load_before"]))
    if any(len(res["repeats"][n]) > 1 for n in names):
        row("episodes/s of every run", lambda n: ",".join(f"{r['episodes_per_s']:.1f}" for r in res["repeats"][n]))
    row("target met", lambda n: "" if n == "peer" else comps[n]["target_verdict"])
    width0 = max(len(r[0]) for r in rows) + 2
    widths = [max(len(heads[n]), *(len(r[1][i]) for r in rows)) + 2 for i, n in enumerate(names)]
    lines = ["".ljust(width0) + "".join(heads[n].rjust(w) for n, w in zip(names, widths))]
    for label, cells in rows:
        lines.append(label.ljust(width0) + "".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _share(r: dict, i: int) -> str:
    split = list(r["time_split_s"].values())
    total = sum(split)
    return fmt(100 * split[i] / total, ".0f", "%") if total else "-"


def report(res: dict) -> str:
    s = res["setting"]
    w = res["work"]
    head = [(f"== {s}: ours vs the peer (TRL {res['versions']['peer'].get('trl')} PPOTrainer), {res['date']}, "
            f"{res['machine']['cpu_count']} CPU cores, {res['machine']['threads']} threads =="),
            (f"work: {w['total_episodes']} episodes, rollout batch {w['rollout_batch_size']}, {w['num_mini_batches']} "
            f"mini-batches, {w['ppo_epochs']} PPO epochs, {w['response_length']} response tokens, temperature "
            f"{w['temperature']}, kl_coef {w['kl_coef']} ({w['kl_estimator']}), missing-EOS penalty "
            f"{w['missing_eos_penalty']}, fp32")]
    if s == "gpt2-small" and res.get("small_models"):
        m = res["small_models"]
        head.append(f"models: random-init GPT-2 small, {m['policy_params'] / 1e6:.1f}M parameters (policy), "
                    f"vocabulary {m['vocab_size']} (tokenizer {m['tokenizer_size']})")
    head.append(f"target: {res['target']}")
    notes = "\n".join(f"  - {n}" for n in res["notes"])
    return "\n".join(head) + "\n\n" + table(res) + "\n\nWhat the figures mean:\n" + notes


# ---------------------------------------------------------------------------------------------------------------
def add_timing_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a timed comparison on a shared machine (both benchmarks): threads, repeats, quiet-machine
    checks."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each trainer this many times (alternating order); the fastest run is reported")
    ap.add_argument("--busy-threshold", type=float, default=0.2,
                    help="before each run, wait until other processes use less than this share of the cores; "
                         "re-run a trainer if they took more during its run (1 disables both)")
    ap.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a quiet machine before a run")
    ap.add_argument("--max-retries", type=int, default=2, help="re-runs of a trainer disturbed by other processes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["tiny", "gpt2-small", "all"], default="tiny")
    ap.add_argument("--peer-script", type=Path, default=DEFAULT_PEER_SCRIPT,
                    help="the peer's run_peer.py (default: ../shared/peer/run_peer.py beside the checkout)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help="all scratch: the peer venv, artifacts, runs (default /tmp/rlhf-bench)")
    ap.add_argument("--peer-venv", type=Path, default=None, help="default: WORKDIR/venv-peer")
    ap.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS,
                    help="where <setting>.json is written (default bench/results)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON path (only with a single --setting)")
    add_timing_arguments(ap)
    ap.add_argument("--value-modes", default="separate,shared", help="tiny: our value modes to run")
    ap.add_argument("--small-value-modes", default="shared", help="gpt2-small: our value modes to run")
    ap.add_argument("--small-eval-batch-variant", type=int, default=16,
                    help="gpt2-small: also run ours with training.eval_batch_size N (0: don't)")
    ap.add_argument("--small-ppo-epochs", type=int, default=1, help="gpt2-small: PPO epochs per update")
    ap.add_argument("--small-vocab", type=int, default=50257,
                    help="gpt2-small: vocabulary size of the random models (50257: GPT-2's, 124M parameters; the "
                         "peer's tokenizer uses the first 3000 ids); 0: the tokenizer's size")
    ap.add_argument("--our-seeds", type=int, default=0,
                    help="tiny: also run ours with this many other seeds, to show how far the gains move from seed to "
                         "seed (one run each, gains only)")
    ap.add_argument("--noise-seeds", type=int, default=16,
                    help="tiny: re-sample the held-out score this many times (initial policy and our final ones) to "
                         "estimate its sampling noise; 0 disables")
    ap.add_argument("--rebuild-artifacts", action="store_true", help="run the peer's prep again")
    ap.add_argument("--show", type=Path, default=None, help="print the table of a results JSON and exit")
    ap.add_argument("--quiet", action="store_true", help="do not echo the trainers' output")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.peer_venv = (args.peer_venv or args.workdir / "venv-peer").absolute()
    args.value_modes = [m for m in args.value_modes.split(",") if m]
    args.small_value_modes = [m for m in args.small_value_modes.split(",") if m]
    for m in args.value_modes + args.small_value_modes:
        if m not in ("separate", "shared"):
            ap.error(f"value mode {m!r}: separate or shared")
    if args.show:
        print(report(json.loads(args.show.read_text())))
        return 0
    settings = ["tiny", "gpt2-small"] if args.setting == "all" else [args.setting]
    if args.out and len(settings) > 1:
        ap.error("--out needs a single --setting")

    if not args.peer_script.is_file():
        print(f"SKIPPED: the peer script is not at {args.peer_script} (it lies in ../shared/peer/ beside the "
              "checkout; pass --peer-script PATH). Nothing was run.", flush=True)
        return 0
    env = child_env(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    say(f"work dir {args.workdir}; peer script {args.peer_script}; {os.cpu_count()} CPU cores, load avg {loadavg()}")
    ensure_peer_venv(args.peer_venv, env)
    reports = []
    for setting in settings:
        say(f"=== setting {setting} ===")
        res = run_setting(setting, args, env)
        out = args.out or args.results_dir / f"{setting}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        text = report(res)
        reports.append(text)
        print("\n" + text + "\n", flush=True)
        say(f"{setting}: done in {res['elapsed_s']:.0f}s; results in {out}")
    if len(reports) > 1:
        print("\n\n".join(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
