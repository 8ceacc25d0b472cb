#!/usr/bin/env python
"""TRL's own RLOOTrainer on the work bench/rloo_vs_trl.py gives both trainers (run by the bench, one process per run).

    python bench/trl_rloo_run.py CONFIG.json

CONFIG (written by the bench): policy, train_prompts, reward_function (a file.py:function), output_dir, out (this
script's JSON report), seed, threads, samples_per_prompt, total_episodes, rollout_batch_size, num_mini_batches,
ppo_epochs, response_length, temperature, learning_rate, kl_coef, cliprange, adam_eps, max_grad_norm,
max_prompt_length.

The prompts are those `rlhf ppo` trains on, in the order it takes them: the same file, the same filter (prompts of
1 .. max_prompt_length tokens), and our seeded per-epoch permutation (`PPOTrainer._permutation`) laid out as the
dataset, with `shuffle_dataset=False`; TRL's RepeatSampler then walks it in order, each prompt `num_generations`
times in a row, `rollout_batch_size / k` prompts per generation: the same groups in the same updates as ours.

Timed: `trainer.train()` only (model loading, saving and the bench's evaluation are outside). Episodes: the
completions the reward function scored (each generated completion is scored exactly once).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import resource
import sys
import time
from pathlib import Path


def load_function(spec: str):
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("bench_reward_module", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["bench_reward_module"] = module
    module_spec.loader.exec_module(module)
    return module, getattr(module, name)


def our_prompt_stream(texts: list[str], seed: int, count: int) -> list[str]:
    """The first `count` prompts in the order `rlhf ppo` takes them (PPOTrainer._prompt_batch / _permutation)."""
    out, epoch = [], 0
    while len(out) < count:
        order = list(range(len(texts)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += [texts[i] for i in order]
        epoch += 1
    return out[:count]


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    module, reward = load_function(cfg["reward_function"])  # loads the reward model (not timed)
    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    with gzip.open(cfg["train_prompts"], "rt") if cfg["train_prompts"].endswith(".gz") else \
            open(cfg["train_prompts"]) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    texts = [r["prompt"] for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [t for t, s in zip(texts, ids) if 0 < len(s) <= cfg["max_prompt_length"]]
    k = cfg["samples_per_prompt"]
    batch, minis, epochs = cfg["rollout_batch_size"], cfg["num_mini_batches"], cfg["ppo_epochs"]
    updates = cfg["total_episodes"] // batch
    stream = our_prompt_stream(kept, cfg["seed"], updates * batch // k)
    dataset = Dataset.from_dict({"prompt": stream})

    args = RLOOConfig(
        output_dir=cfg["output_dir"],
        # the batch shape: one generation of `batch` completions (batch / k prompts), split into `minis`
        # optimizer steps of batch / minis completions, the whole generation reused `epochs` times
        per_device_train_batch_size=batch // minis,
        gradient_accumulation_steps=1,
        steps_per_generation=minis,
        num_iterations=epochs,
        num_generations=k,
        max_steps=updates * minis * epochs,
        shuffle_dataset=False,  # the dataset is already in our order (above)
        # sampling
        max_completion_length=cfg["response_length"],
        temperature=cfg["temperature"],
        top_k=0,
        top_p=1.0,
        # objective
        beta=cfg["kl_coef"],
        epsilon=cfg["cliprange"],
        normalize_advantages=False,
        # optimizer: AdamW, linear decay to 0, no warm-up
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        adam_epsilon=cfg["adam_eps"],
        weight_decay=0.0,
        max_grad_norm=cfg["max_grad_norm"] if cfg["max_grad_norm"] is not None else 0.0,
        # fp32 on the CPU, transformers' generate, as ours
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        model_init_kwargs={"dtype": "float32"},
        disable_dropout=True,
        seed=cfg["seed"],
        report_to="none",
        save_strategy="no",
        logging_steps=minis * epochs,  # one log row per generation (= one of our updates)
        dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = RLOOTrainer(model=cfg["policy"], reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    # where the time goes, by wrapping two of the trainer's methods (one call each per generation):
    # _generate (sampling) inside _generate_and_score_completions (+ old/reference log-probs and the reward)
    spent = {"generate": 0.0, "generate_and_score": 0.0}

    def timed(key, method):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    module.CALLS.update(batches=0, completions=0)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    episodes = module.CALLS["completions"]
    trainer.save_model(cfg["output_dir"])
    tokenizer.save_pretrained(cfg["output_dir"])
    summary = {
        "episodes": episodes,
        "generations": module.CALLS["batches"],
        "optimizer_steps": trainer.state.global_step,
        "train_s": train_s,
        "episodes_per_s": episodes / train_s,
        "peak_rss_mb_self_reported": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "time_split_s": {"generation": spent["generate"],
                         "scoring (old/reference log-probs + reward)": spent["generate_and_score"] - spent["generate"],
                         "training and the rest": train_s - spent["generate_and_score"]},
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "optim_arg": str(args.optim),
        "prompts_kept": len(kept),
        "prompts_in_file": len(texts),
        "prompts_used": len(stream),
        "first_prompts": stream[:4],
    }
    Path(cfg["out"]).write_text(json.dumps({"summary": summary, "log": trainer.state.log_history,
                                            "args": {k: str(v) for k, v in args.to_dict().items()}}, indent=1))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
