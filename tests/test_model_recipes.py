"""recipes/qwen2.5-0.5b-hh: a modern instruct checkpoint on HH-RLHF in TRL's conversational format.

Offline, the files validate and dry-run as shipped, and `rlhf plan` plans them from Qwen2.5-0.5B-Instruct's
config.json placed in a Hugging Face cache as a download would (tests/assets/qwen2.5-0.5b-instruct). Their own
settings then run end to end (`extends`: only the model, the data source and the sizes change) on the zoo's tiny
Qwen2 chat checkpoint, with real HH-RLHF dialogues from ../shared turned into TRL's conversational format.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST_TRAINING, HH_RLHF, REPO, run_cli, write_jsonl, write_recipe

RECIPES = REPO / "recipes" / "qwen2.5-0.5b-hh"
MODEL_ID = "Qwen/Qwen2.5-0.5B-Instruct"
STAGES = ("sft", "reward", "ppo", "dpo")


def test_recipes_validate_and_dry_run_as_shipped():
    result = run_cli("recipe", "validate", RECIPES.relative_to(REPO))
    assert result.exit_code == 0, result.output
    for stage in STAGES:
        result = run_cli(stage, RECIPES.relative_to(REPO) / f"{stage}.yaml", "--dry-run")
        assert result.exit_code == 0, result.output
        assert "trl-lib/hh-rlhf-helpful-base" in result.output
    assert (RECIPES / "README.md").is_file()
    for name in (*STAGES, "pipeline"):
        header = (RECIPES / f"{name}.yaml").read_text().splitlines()[0]
        assert header.startswith("# Qwen2.5-0.5B-Instruct on Anthropic HH-RLHF"), name


@pytest.fixture
def cached_config(tmp_path, monkeypatch):
    """Qwen2.5-0.5B-Instruct's config.json in a fresh Hugging Face cache, laid out as a download leaves it."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "assets" / "qwen2.5-0.5b-instruct" / "config.json", snapshot / "config.json")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_plan_reads_the_model_from_the_cache(cached_config):
    """Every stage planned on a 24 GB card from the cached config, as the recipes' headers say: Qwen2.5-0.5B's exact
    parameter count (tied embeddings counted once), plus a one-output score head (896) for the reward model and a
    value head with its bias (897) for the PPO policy; each fits."""
    causal_lm = 494_032_768
    expected = {"sft": {"model": causal_lm}, "reward": {"model": causal_lm + 896},
                "ppo": {"policy": causal_lm + 897, "reference": causal_lm, "reward": causal_lm + 896},
                "dpo": {"policy": causal_lm, "reference": causal_lm, "reward": causal_lm + 896}}
    for stage in STAGES:
        result = run_cli("plan", RECIPES.relative_to(REPO) / f"{stage}.yaml", "--device-memory", "24GB", "--json")
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert {m["role"]: m["parameters"] for m in plan["models"]} == expected[stage]
        assert plan["fits"] is True and not plan["refusals"], stage
    result = run_cli("plan", RECIPES.relative_to(REPO) / "pipeline.yaml", "--device-memory", "24GB")
    assert result.exit_code == 0, result.output


def hh_conversations(limit: int) -> list[dict]:
    """HH-RLHF dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...") as TRL's conversational preference rows: the turns
    both dialogues share as `prompt` messages, the last assistant turn of each as `chosen` / `rejected`."""
    rows = []
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        for line in handle:
            pair = json.loads(line)
            turns = {side: _turns(pair[side]) for side in ("chosen", "rejected")}
            chosen, rejected = turns["chosen"], turns["rejected"]
            if not chosen or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" \
                    or rejected[-1]["role"] != "assistant" or chosen[-1] == rejected[-1]:
                continue
            rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
            if len(rows) == limit:
                break
    return rows


def _turns(dialogue: str) -> list[dict]:
    import re

    parts = re.split(r"\n\n(Human|Assistant): ", dialogue)
    return [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2])]


@pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"Anthropic HH-RLHF sample not found at {HH_RLHF}")
def test_the_recipes_settings_run_on_a_tiny_chat_model(tmp_path, tiny_world):
    from zoo import build

    texts = [r["text"] for r in tiny_world["corpus"]]
    rows = hh_conversations(40)
    assert len(rows) == 40
    model = build("instruct", tmp_path, texts + [m["content"] for r in rows for m in r["prompt"]])
    train = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    test = write_jsonl(tmp_path / "test.jsonl", rows[32:])
    data = {"dataset": None, "files": {"train": str(train), "test": str(test)}, "max_eval_samples": None}
    small = {**FAST_TRAINING, "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
             "eval_strategy": "no", "bf16": False, "activation_checkpointing": False, "max_length": 256}
    runs = tmp_path / "runs"

    def run(stage: str, **changes) -> Path:
        recipe = write_recipe(tmp_path / f"{stage}.yaml", {"extends": str(RECIPES / f"{stage}.yaml"),
                                                            "output_dir": str(runs / stage), **changes})
        result = run_cli(stage, recipe)
        assert result.exit_code == 0, f"{stage}: {result.output}"
        return runs / stage

    sft = run("sft", model={"name_or_path": str(model)}, data=data, training=small)
    resolved = (sft / "recipe.resolved.yaml").read_text()
    assert "completion: chosen" in resolved
    reward = run("reward", model={"name_or_path": str(sft)}, data=data, training=small)
    ppo = run("ppo", policy={"name_or_path": str(sft)}, reward={"model": str(reward)},
              data={**data, "max_prompt_length": 200}, generation={"response_length": 8},
              training={"total_episodes": 4, "rollout_batch_size": 4, "num_mini_batches": 1, "ppo_epochs": 1,
                        "gradient_accumulation_steps": 1, "forward_batch_size": None, "mixed_precision": "no",
                        "gradient_checkpointing": False, "save_every": None, "eval_prompts": 4,
                        "sample_every": 1, "learning_rate": 1e-3})
    sample = json.loads((ppo / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|im_start|>system") and sample["prompt"].endswith("<|im_start|>assistant\n")
    saved = json.loads((ppo / "generation_config.json").read_text())
    assert saved["temperature"] == 0.7 and saved["top_k"] == 0 and "repetition_penalty" not in saved
    run("dpo", model={"name_or_path": str(sft)}, reward={"model": str(reward)}, data=data,
        generation={"response_length": 8}, evaluation={"prompts": 4, "batch_size": 4, "max_prompt_length": 200},
        training={**small, "save_steps": 100})
