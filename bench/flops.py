#!/usr/bin/env python
"""Model FLOP/s of our PPO against this machine's measured matmul rate.

    .venv/bin/python bench/flops.py                               # CPU, fp32, 2 threads (~4 min on 2 quiet cores)
    python3 bench/flops.py --device cuda --dtype bf16             # one GPU, bf16 autocast (bench/gpu_check.sh)

Three parts, one JSON (`--out`, default bench/results/flops_<device>.json):

1. **Matmul rate.** Square and GPT-2-shaped matrix products at the given dtype, best of `--matmul-repeats`, in
   TFLOP/s. The machine's limit is the best rate of the large square products (on a GPU the nominal dense bf16 peak
   of an H100 / H200, 989 TFLOP/s, is printed beside it).
2. **GPT-2-small PPO.** Our own trainer (rlhf_pipeline.stages.ppo's `build` and `make_trainer`, the objects `rlhf
   ppo` trains with) on random-init 124M GPT-2 models (12 x 768, vocabulary 50,257, 128 positions) and the tiny
   world's prompts; full fine-tuning, `value.mode: shared`, a frozen reference copy, a random-init reward model. The
   trainer's own per-phase times (`time/generation`, `time/scoring`, `time/training` in its log rows) against the
   model FLOPs of each phase, counted with ModelShape.forward_flops from the shapes that ran (below). The first
   update is a warm-up and the last one is profiled; both are left out of the figures.
3. **Profile.** The training phase (the PPO epochs) of that last update under torch.profiler: the top operators by
   self time and the same time sorted into kinds of work (LM-head matmuls, block matmuls, attention, vocabulary-sized
   element-wise work, optimizer, ...).

Model FLOPs of a phase (2 per multiply-accumulate; matmuls and attention only, as forward_flops counts them), over
the padded shapes the passes run on:
  generation  HF generate with the KV cache: one pass over the left-padded prompt (logits at its last position
              only), then one cached step per further token, attending to every position so far;
  scoring     no-grad causal passes over prompt + response: the policy (logits at the response positions, plus the
              shared value head) and the reference (logits at the response positions); the reward model over the
              sequences it was given (its own tokenizer's, recorded by a hook), score head at every position;
  training    3 x the forward of the trained model (policy trunk, logits at the response positions, value head)
              over every row of every PPO epoch (backward = 2 x forward).

No network: the tokenizer is trained here on the tiny world's corpus (recipes/tiny/data, 1,024 tokens); the models'
vocabulary is GPT-2's 50,257 (ids past the tokenizer's decode to nothing, as in bench/ppo_vs_peer.py's gpt2-small).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python3 bench/flops.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from rlhf_pipeline.model_shape import ModelShape  # noqa: E402  (torch-free)

NOMINAL_BF16_DENSE_TFLOPS = {"H100": 989.4, "H200": 989.4}  # NVIDIA's dense bf16 tensor-core peak (SXM)
PROMPTS = {"train": REPO / "recipes/tiny/data/prompts-train.jsonl.gz",
           "test": REPO / "recipes/tiny/data/prompts-test.jsonl.gz"}
CORPUS = REPO / "recipes/tiny/data/corpus.jsonl.gz"

# The PPO work per device: (rollout batch, mini-batches, PPO epochs, response length, updates incl. warm-up and the
# profiled one). A CPU run takes ~3 minutes on 2 cores; a GPU gets larger batches.
PPO_DEFAULTS = {
    "cpu": {"rollout_batch_size": 16, "num_mini_batches": 2, "ppo_epochs": 1, "response_length": 24, "updates": 6},
    "cuda": {"rollout_batch_size": 256, "num_mini_batches": 2, "ppo_epochs": 2, "response_length": 24, "updates": 8},
}
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 128, "vocab_size": 50257}
SMOKE_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 50257}


# ---------------------------------------------------------------------------------------------------------------
# FLOP accounting (pure: shapes in, FLOPs out; tests/test_bench_flops.py checks them by hand)
# ---------------------------------------------------------------------------------------------------------------
def causal_pass_flops(shape: ModelShape, rows: int, length: int, head: str = "lm",
                      head_positions: int | None = None) -> float:
    """A no-cache causal pass over `rows` sequences of `length` tokens, the head read at `head_positions` per row
    (default: all)."""
    head_tokens = None if head_positions is None else rows * head_positions
    return shape.forward_flops(rows * length, (length + 1) / 2, head=head, head_tokens=head_tokens)


def generation_flops(shape: ModelShape, rows: int, prompt_length: int, steps: int) -> float:
    """HF generate with the KV cache making `steps` tokens for `rows` left-padded prompts of `prompt_length`: a pass
    over the prompt with logits at its last position only (`logits_to_keep=1`), then steps - 1 cached passes; the one
    that feeds token j (j = 1 .. steps - 1) sits at position prompt_length + j and attends to that many keys."""
    if steps <= 0:
        return 0.0
    total = causal_pass_flops(shape, rows, prompt_length, "lm", head_positions=1)
    for j in range(1, steps):
        total += shape.forward_flops(rows, prompt_length + j, head="lm")
    return total


def policy_value_flops(shape: ModelShape, rows: int, prompt_length: int, response_length: int,
                       value_mode: str = "shared", value_shape: ModelShape | None = None) -> float:
    """One forward of PolicyAndValue: the policy trunk over prompt + response, logits at the response positions, and
    the value function there (shared: a linear head on the policy's hidden state; separate: a model of its own with
    a score head at the response positions; none: no critic)."""
    length = prompt_length + response_length
    total = causal_pass_flops(shape, rows, length, "lm", head_positions=response_length)
    if value_mode == "shared":
        total += shape.head_flops(rows * response_length, "score")
    elif value_mode == "separate":
        total += causal_pass_flops(value_shape or shape, rows, length, "score", head_positions=response_length)
    return total


def scoring_flops(shape: ModelShape, rows: int, prompt_length: int, response_length: int,
                  reward_shape: ModelShape | None = None, reward_batches: list | tuple = (),
                  value_mode: str = "shared", reference: bool = True) -> float:
    """The no-grad passes of an update: policy and value (old log-probs, old values), the reference (its log-probs),
    and the reward model over each batch [(rows, length), ...] it was given (score head at every position, as
    GPT2ForSequenceClassification computes it)."""
    total = policy_value_flops(shape, rows, prompt_length, response_length, value_mode)
    if reference:
        total += causal_pass_flops(shape, rows, prompt_length + response_length, "lm", head_positions=response_length)
    for batch_rows, length in reward_batches:
        total += causal_pass_flops(reward_shape or shape, batch_rows, length, "score")
    return total


def training_flops(shape: ModelShape, rows_trained: int, prompt_length: int, response_length: int,
                   value_mode: str = "shared") -> float:
    """The PPO epochs: every row of every epoch through a forward and a backward (2 x forward) of what is trained."""
    return 3 * policy_value_flops(shape, rows_trained, prompt_length, response_length, value_mode)


def update_flops(shape: ModelShape, record: dict, value_mode: str = "shared",
                 reward_shape: ModelShape | None = None) -> dict[str, float]:
    """Model FLOPs of each phase of one update, from what `record_shapes` saw."""
    rows, prompt, response = record["rows"], record["prompt_length"], record["response_length"]
    flops = {
        "generation": generation_flops(shape, rows, prompt, response),
        "scoring": scoring_flops(shape, rows, prompt, response, reward_shape, record["reward_batches"], value_mode),
        "training": training_flops(shape, record["rows_trained"], prompt, response, value_mode),
    }
    flops["update"] = sum(flops.values())
    return flops


# ---------------------------------------------------------------------------------------------------------------
# 1. matmul rate
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(m: int, k: int, n: int, dtype, device: str, repeats: int, min_seconds: float) -> float:
    """Best TFLOP/s of [m, k] @ [k, n] over `repeats` samples, each a loop at least `min_seconds` long."""
    import torch

    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up (kernel choice, page faults)
    _sync(device)
    t = time.perf_counter()
    torch.mm(a, b, out=out)
    _sync(device)
    inner = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * m * k * n / best / 1e12


def matmul_benchmark(device: str, dtype, shape: ModelShape, tokens: int, repeats: int,
                     squares: list[int]) -> dict:
    d, f, v = shape.n_embd, shape.mlp_width, shape.vocab_size
    min_seconds = 0.2 if device == "cpu" else 0.05
    rows = []
    for s in squares:
        rows.append({"kind": "square", "name": f"{s} x {s} x {s}", "mnk": [s, s, s],
                     "tflops": matmul_rate(s, s, s, dtype, device, repeats, min_seconds)})
    gpt2 = [("attention in (c_attn)", tokens, d, 3 * d), ("attention out (c_proj)", tokens, d, d),
            ("MLP up (c_fc)", tokens, d, f), ("MLP down (c_proj)", tokens, f, d),
            ("LM head forward", tokens, d, v), ("LM head backward, input grad", tokens, v, d),
            ("LM head backward, weight grad", v, tokens, d)]
    padded = -(-v // 64) * 64
    if padded != v:  # the same with the vocabulary padded to a multiple of 64 (GPU kernels favour aligned sizes)
        gpt2 += [(f"LM head forward, vocabulary padded to {padded}", tokens, d, padded),
                 (f"LM head input grad, vocabulary padded to {padded}", tokens, padded, d)]
    for name, m, k, n in gpt2:
        rows.append({"kind": "gpt2", "name": f"{name}: [{m} x {k}] @ [{k} x {n}]", "mnk": [m, k, n],
                     "tflops": matmul_rate(m, k, n, dtype, device, repeats, min_seconds)})
    limit = max(r["tflops"] for r in rows if r["kind"] == "square")
    return {"rows": rows, "limit_tflops": limit, "repeats": repeats, "gpt2_tokens": tokens}


# ---------------------------------------------------------------------------------------------------------------
# 2. the PPO run
# ---------------------------------------------------------------------------------------------------------------
def build_artifacts(workdir: Path, model: dict, seed: int = 0) -> dict:
    """Tokenizer (BPE on the tiny corpus), random-init policy and reward model, saved once per model config."""
    import gzip

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhf_pipeline.models import train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining

    key = {**model, "seed": seed, "tokenizer_vocab": 1024}
    root = workdir / "models"
    info_path = root / "models.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("key") == key:
        return json.loads(info_path.read_text())
    say(f"building the tokenizer and random-init models in {root}")
    texts = [json.loads(line)["text"] for line in gzip.open(CORPUS, "rt", encoding="utf-8")]
    tokenizer = train_bpe_tokenizer(iter([texts]), BpeTraining(vocab_size=1024))
    config = dict(vocab_size=max(model["vocab_size"], len(tokenizer)), n_positions=model["n_positions"],
                  n_embd=model["n_embd"], n_layer=model["n_layer"], n_head=model["n_head"], resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(GPT2Config(**config))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **config))
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")  # our reward loader reads the tokenizer from the reward model's dir
    info = {"key": key, "policy": str(root / "policy"), "reward": str(root / "reward"),
            "vocab_size": config["vocab_size"], "tokenizer_size": len(tokenizer),
            "policy_parameters": sum(p.numel() for p in policy.parameters()),
            "reward_parameters": sum(p.numel() for p in reward.parameters())}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def ppo_recipe(artifacts: dict, work: dict, device: str, dtype: str, output_dir: Path) -> dict:
    bf16 = dtype == "bf16"
    return {
        "stage": "ppo",
        "seed": 0,
        "output_dir": str(output_dir),
        "policy": {"name_or_path": artifacts["policy"], "dtype": "float32"},
        "reward": {"model": artifacts["reward"], "dtype": "bfloat16" if bf16 and device == "cuda" else "float32"},
        "value": {"mode": "shared"},
        "data": {"files": {"train": str(PROMPTS["train"]), "test": str(PROMPTS["test"])}, "eval_split": "test"},
        "generation": {"response_length": work["response_length"], "temperature": 0.7},
        "training": {
            "total_episodes": work["updates"] * work["rollout_batch_size"],
            "rollout_batch_size": work["rollout_batch_size"],
            "num_mini_batches": work["num_mini_batches"],
            "ppo_epochs": work["ppo_epochs"],
            "learning_rate": 1.0e-5,
            "kl_coef": 0.05,
            "mixed_precision": "bf16" if bf16 else "no",
            "eval_prompts": 8,
            "num_samples": 0,
            "report_to": "none",
        },
    }


def run_ppo(args, work: dict, model: dict, threads: int) -> dict:
    import torch
    import yaml
    from accelerate import Accelerator
    from transformers import set_seed

    from rlhf_pipeline.recipe.load import load_recipe
    from rlhf_pipeline.stages.ppo import build, make_trainer

    workdir = Path(args.workdir)
    artifacts = build_artifacts(workdir, model)
    output_dir = workdir / "run"
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    recipe = ppo_recipe(artifacts, work, args.device, args.dtype, output_dir)
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(recipe_path, expected_stage="ppo")
    accelerator = Accelerator(mixed_precision=loaded.recipe.training.mixed_precision, cpu=args.device == "cpu")
    set_seed(0)
    setup = build(loaded, accelerator.device)
    trainer = make_trainer(loaded, setup, accelerator)
    shape = ModelShape.from_config(setup.model.policy.config.to_dict())
    reward_model = setup.scorer.reward_model.model
    reward_shape = ModelShape.from_config(reward_model.config.to_dict())

    rows: list[dict] = []
    records: list[dict] = []
    trainer.on_log = rows.append

    original_sample = trainer.sample

    def sample(prompts):  # the rollout's padded shapes, one record per update
        rollout = original_sample(prompts)
        records.append({"rows": int(rollout.query.shape[0]), "prompt_length": int(rollout.query.shape[1]),
                        "response_length": int(rollout.response.shape[1]),
                        "real_prompt_tokens": int(rollout.query_mask.sum()),
                        "real_response_tokens": int(rollout.response_mask.sum()), "reward_batches": []})
        return rollout

    trainer.sample = sample

    def reward_hook(_module, positional, keywords):  # the reward model's batches (its own tokenizer's lengths)
        ids = keywords.get("input_ids", positional[0] if positional else None)
        records[-1]["reward_batches"].append([int(ids.shape[0]), int(ids.shape[1])])

    handle = reward_model.register_forward_pre_hook(reward_hook, with_kwargs=True)

    num_updates = trainer.plan.num_updates
    profile: dict = {}
    original_optimise = trainer._optimise

    def optimise(*a, **k):  # the last update's PPO epochs run under the profiler
        if trainer.state.update != num_updates - 1 or args.no_profile:
            return original_optimise(*a, **k)
        result, profile_out = profiled(lambda: original_optimise(*a, **k), args.device, shape, args.top)
        profile.update(profile_out)
        return result

    trainer._optimise = optimise
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    say(f"PPO: {num_updates} updates of {work['rollout_batch_size']} episodes ({trainer.plan.describe()})")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    handle.remove()
    peak_gpu = torch.cuda.max_memory_allocated() if args.device == "cuda" else None

    steps_before = 0
    per_update = []
    for row, record in zip(rows, records):
        steps = row["train/optimizer_steps"] - steps_before
        steps_before = row["train/optimizer_steps"]
        record["rows_trained"] = steps * trainer.plan.local_mini_batch_size
        flops = update_flops(shape, record, "shared", reward_shape)
        per_update.append({"update": row["train/update"], **record, "optimizer_steps": steps,
                           "seconds": {p: row[f"time/{p}"] for p in ("generation", "scoring", "training", "update")},
                           "flops": flops})
    timed = per_update[1:-1] if len(per_update) > 2 else per_update
    phases = {}
    for phase in ("generation", "scoring", "training", "update"):
        seconds = sum(u["seconds"][phase] for u in timed)
        flops = sum(u["flops"][phase] for u in timed)
        rate = flops / seconds / 1e12 if seconds else None
        phases[phase] = {"seconds": seconds, "flops": flops, "tflops_per_s": rate}
    episodes = sum(u["rows"] for u in timed)
    real = sum(u["real_prompt_tokens"] + u["real_response_tokens"] for u in timed)
    padded = sum(u["rows"] * (u["prompt_length"] + u["response_length"]) for u in timed)
    return {
        "model": {**model, "parameters_policy": artifacts["policy_parameters"],
                  "parameters_reward": artifacts["reward_parameters"], "tokenizer_size": artifacts["tokenizer_size"],
                  "shape": shape.__dict__},
        "work": work,
        "value_mode": "shared",
        "full_fine_tuning": True,
        "mixed_precision": loaded.recipe.training.mixed_precision,
        "recipe": recipe,
        "plan": trainer.plan.describe(),
        "timed_updates": [u["update"] for u in timed],
        "phases": phases,
        "episodes_per_second": episodes / phases["update"]["seconds"] if phases["update"]["seconds"] else None,
        "real_token_share": real / padded if padded else None,
        "wall_seconds_train": wall,
        "peak_gpu_memory_bytes": peak_gpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "updates": per_update,
        "profile": profile,
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. profile of the training phase
# ---------------------------------------------------------------------------------------------------------------
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def kind_of(name: str, shapes, vocab: int, width: int) -> str:
    """The kind of work an operator is, for the profile's summary (by its name and its inputs' shapes)."""
    shapes = [s for s in (shapes or []) if isinstance(s, list)]
    has_vocab = any(vocab in s for s in shapes)
    embedding_sized = any(s in ([vocab, width], [width, vocab]) for s in shapes)
    if name in MATMULS:
        return "LM-head matmuls (forward and backward)" if has_vocab else "block matmuls (attention and MLP weights)"
    low = name.lower()
    if "attention" in low or "flash" in low or "sdpa" in low or "_efficient" in low:
        return "attention (scaled dot-product, forward and backward)"
    if "adam" in low:
        return "optimizer (fused AdamW)"
    if ("norm" in low and "layer_norm" not in low) or low.startswith("aten::_foreach"):
        return "gradient clipping (norms)"
    if embedding_sized:
        return "the tied embedding's [vocabulary x width] gradient (zero-fill, sum of its two parts)"
    if has_vocab:
        return "[tokens x vocabulary] element-wise (log-probabilities, their backward, casts)"
    if "layer_norm" in low:
        return "layer norm (forward and backward)"
    if "gelu" in low:
        return "GELU (forward and backward)"
    if low.startswith("aten::") or low.startswith("autograd"):
        return "other tensor ops (copies, adds, masks, embedding)"
    return "other"


def profiled(fn, device: str, shape: ModelShape, top: int):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    t = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        result = fn()
        _sync(device)
    wall = time.perf_counter() - t
    on_device = device == "cuda"

    def self_us(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    def operators(averages):  # the operators themselves: a kernel's own row would count its time twice on a GPU
        return [e for e in averages if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]

    events = operators(prof.key_averages())
    total = sum(self_us(e) for e in events)
    ops = sorted(events, key=self_us, reverse=True)[:top]
    kinds: dict[str, float] = {}
    for e in operators(prof.key_averages(group_by_input_shape=True)):
        kind = kind_of(e.key, e.input_shapes, shape.vocab_size, shape.n_embd)
        kinds[kind] = kinds.get(kind, 0.0) + self_us(e)
    out = {
        "clock": "self CUDA time (kernels, by the operator that launched them)" if on_device else "self CPU time",
        "wall_seconds": wall,
        "ops_self_seconds": total / 1e6,
        "busy_share": total / 1e6 / wall if wall else None,
        "top_ops": [{"op": e.key, "self_seconds": self_us(e) / 1e6, "share": self_us(e) / total if total else None,
                     "calls": e.count} for e in ops],
        "kinds": [{"kind": k, "self_seconds": v / 1e6, "share": v / total if total else None}
                  for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])],
    }
    return result, out


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"[flops] {message}", flush=True)


def environment(device: str, threads: int) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for package in ("transformers", "accelerate", "peft", "trl"):
        try:
            from importlib.metadata import version

            env[package] = version(package)
        except Exception:  # noqa: BLE001
            env[package] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, check=False).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def nominal_peak(gpu_name: str | None) -> float | None:
    for key, value in NOMINAL_BF16_DENSE_TFLOPS.items():
        if gpu_name and key in gpu_name:
            return value
    return None


def report(result: dict) -> str:
    lines = []
    env, mm = result["environment"], result.get("matmul")
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    lines.append(f"machine: {where}; torch {env['torch']}; dtype {result['dtype']}")
    if mm:
        lines.append("")
        lines.append(f"{'matmul':<80}TFLOP/s")
        for r in mm["rows"]:
            lines.append(f"  {r['name']:<78}{r['tflops']:8.3f}")
        lines.append(f"  machine limit (best large square): {mm['limit_tflops']:.3f} TFLOP/s")
        if result.get("nominal_peak_tflops"):
            lines.append(f"  nominal dense bf16 peak of this GPU (for reference): {result['nominal_peak_tflops']} "
                         "TFLOP/s")
    ppo = result.get("ppo")
    if ppo:
        limit = mm["limit_tflops"] if mm else None
        peak = result.get("nominal_peak_tflops")
        m = ppo["model"]
        lines.append("")
        lines.append(f"PPO: GPT-2 {m['n_layer']} x {m['n_embd']}, vocabulary {m['vocab_size']}, "
                     f"{m['parameters_policy'] / 1e6:.1f}M parameters; full fine-tuning, value {ppo['value_mode']}, "
                     f"{ppo['mixed_precision']} mixed precision; {ppo['plan']}")
        lines.append(f"updates timed: {ppo['timed_updates']} (first = warm-up, last = profiled: left out); "
                     f"real tokens {100 * ppo['real_token_share']:.0f} % of the padded shapes")
        head = f"  {'phase':<11}{'time (s)':>10}{'model FLOPs':>14}{'GFLOP/s':>11}{'of matmul':>11}"
        lines.append(head + (f"{'of peak':>9}" if peak else ""))
        for phase, p in ppo["phases"].items():
            rate = p["tflops_per_s"] or 0.0
            line = (f"  {phase:<11}{p['seconds']:>10.2f}{p['flops']:>14.3e}{rate * 1e3:>11.1f}"
                    f"{(f'{100 * rate / limit:.1f} %' if limit else '-'):>11}")
            if peak:
                line += f"{100 * rate / peak:>7.1f} %"
            lines.append(line)
        lines.append(f"  episodes/s {ppo['episodes_per_second']:.2f}; peak RSS {ppo['peak_rss_mb']:.0f} MiB"
                     + (f"; peak GPU memory (max_memory_allocated) {ppo['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
                        if ppo.get("peak_gpu_memory_bytes") else ""))
        prof = ppo.get("profile")
        if prof:
            lines.append("")
            lines.append(f"profile of one training phase ({prof['clock']}; wall {prof['wall_seconds']:.2f} s under the "
                         f"profiler, operators' self time {prof['ops_self_seconds']:.2f} s = "
                         f"{100 * (prof.get('busy_share') or 0):.0f} % of it)")
            for k in prof["kinds"]:
                lines.append(f"  {100 * k['share']:5.1f} %  {k['self_seconds']:7.3f} s  {k['kind']}")
            lines.append("  top operators by self time:")
            for op in prof["top_ops"]:
                lines.append(f"  {100 * op['share']:5.1f} %  {op['self_seconds']:7.3f} s  {op['calls']:6d} x  "
                             f"{op['op']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="matmul dtype; for PPO, bf16 means training.mixed_precision: bf16 (autocast)")
    ap.add_argument("--out", help="JSON file (default bench/results/flops_<device>.json)")
    ap.add_argument("--workdir", default=None, help="models and the run (default /tmp/rlhf-flops-<device>)")
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--matmul-sizes", default=None, help="square sizes, comma-separated (default: by device)")
    ap.add_argument("--rollout-batch-size", type=int)
    ap.add_argument("--mini-batches", type=int)
    ap.add_argument("--ppo-epochs", type=int)
    ap.add_argument("--response-length", type=int)
    ap.add_argument("--updates", type=int, help="PPO updates, the warm-up and the profiled one included (>= 3)")
    ap.add_argument("--top", type=int, default=15, help="operators listed from the profile")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--skip-matmul", action="store_true")
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer, 64-wide model and small sizes: checks the "
                                                          "script's paths in well under a minute, measures nothing")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = dict(SMOKE_MODEL if args.smoke else GPT2_SMALL)
    work = dict(PPO_DEFAULTS[args.device])
    if args.smoke:
        work.update(rollout_batch_size=8, num_mini_batches=2, ppo_epochs=1, response_length=8, updates=3)
    for key, value in (("rollout_batch_size", args.rollout_batch_size), ("num_mini_batches", args.mini_batches),
                       ("ppo_epochs", args.ppo_epochs), ("response_length", args.response_length),
                       ("updates", args.updates)):
        if value is not None:
            work[key] = value
    out = Path(args.out or REPO / "bench" / "results" / f"flops_{args.device}.json")
    args.workdir = args.workdir or f"/tmp/rlhf-flops-{args.device}{'-smoke' if args.smoke else ''}"
    shape = ModelShape(model["n_layer"], model["n_embd"], model["n_head"], model["vocab_size"], model["n_positions"])

    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
                    "dtype": args.dtype, "smoke": args.smoke, "environment": environment(args.device, args.threads)}
    result["nominal_peak_tflops"] = (nominal_peak(result["environment"].get("gpu"))
                                     if args.device == "cuda" and args.dtype == "bf16" else None)
    if not args.skip_matmul:
        if args.matmul_sizes:
            squares = [int(s) for s in args.matmul_sizes.split(",")]
        else:
            squares = {"cpu": [1024, 2048, 4096], "cuda": [4096, 8192, 16384]}[args.device]
            squares = [256, 512] if args.smoke else squares
        tokens = 512 if args.device == "cpu" else 8192
        say(f"matmul rate: {args.dtype} on {args.device}, squares {squares}, GPT-2 shapes at {tokens} tokens")
        result["matmul"] = matmul_benchmark(args.device, dtype, shape, tokens, args.matmul_repeats, squares)
    if not args.skip_ppo:
        if work["updates"] < 3:
            raise SystemExit("--updates: at least 3 (a warm-up, one timed, one profiled)")
        result["ppo"] = run_ppo(args, work, model, args.threads)
        limit = result.get("matmul", {}).get("limit_tflops")
        for p in result["ppo"]["phases"].values():
            rate = p["tflops_per_s"]
            p["fraction_of_matmul_rate"] = rate / limit if limit and rate else None
            peak = result["nominal_peak_tflops"]
            p["fraction_of_nominal_peak"] = rate / peak if peak and rate else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result), flush=True)
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
