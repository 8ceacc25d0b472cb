"""Real preference data: Anthropic HH-RLHF (harmless-base test split, in ../shared when present), read by the gpt2-hh
recipes themselves (`extends` them; only the model, the data source and the sizes change), on a tiny model with
GPT-2's conventions (byte-level BPE, `<|endoftext|>` as EOS and pad). Skips cleanly without ../shared."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import FAST_TRAINING, HH_RLHF, REPO, run_cli, write_recipe

pytestmark = pytest.mark.skipif(not HH_RLHF.is_file(), reason=f"Anthropic HH-RLHF sample not found at {HH_RLHF}")
ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="module")
def hh_base(tmp_path_factory):
    """A 2-layer GPT-2 with a 512-token context and a BPE vocabulary trained on the dialogues (pad = EOS)."""
    from rlhf_pipeline.models import init_gpt2, train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture

    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(400)]
    tokenizer = train_bpe_tokenizer([[r[side] for r in rows for side in ("chosen", "rejected")]],
                                    BpeTraining(vocab_size=1000))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    root = tmp_path_factory.mktemp("hh-base")
    torch.manual_seed(0)
    init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=512), tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def hh_runs(tmp_path_factory, hh_base):
    """`rlhf reward` then `rlhf ppo` with recipes that extend recipes/gpt2-hh/{reward,ppo}.yaml."""
    root = tmp_path_factory.mktemp("hh")
    data = {"dataset": None, "files": str(HH_RLHF), "train_split": "train", "eval_split": None}
    reward = write_recipe(root / "reward.yaml", {
        "extends": str(REPO / "recipes" / "gpt2-hh" / "reward.yaml"),
        "output_dir": str(root / "reward"),
        "model": {"name_or_path": str(hh_base)},
        "data": {**data, "eval_size": 16, "max_train_samples": 48},
        "training": {**FAST_TRAINING, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "eval_strategy": "no"},
    })
    result = run_cli("reward", reward)
    assert result.exit_code == 0, result.output
    ppo = write_recipe(root / "ppo.yaml", {
        "extends": str(REPO / "recipes" / "gpt2-hh" / "ppo.yaml"),
        "output_dir": str(root / "ppo"),
        "policy": {"name_or_path": str(hh_base)},
        "reward": {"model": str(root / "reward")},
        "data": {**data, "eval_size": 8, "max_train_samples": 64},
        "generation": {"response_length": 16},
        "training": {"total_episodes": 8, "rollout_batch_size": 4, "num_mini_batches": 2, "ppo_epochs": 1,
                     "gradient_accumulation_steps": 1, "forward_batch_size": None, "mixed_precision": "no",
                     "save_every": None, "eval_prompts": 4, "eval_batch_size": 4, "sample_every": 1,
                     "num_samples": 4, "learning_rate": 1e-3},
    })
    result = run_cli("ppo", ppo)
    assert result.exit_code == 0, result.output
    return root, result.output


def test_reward_stage_reads_hh_dialogues(hh_runs):
    root, _ = hh_runs
    metrics = json.loads((root / "reward" / "metrics.json").read_text())
    assert metrics["prompt"] == "implicit"
    assert metrics["train_pairs"] + metrics["train_pairs_too_long"] == 48
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_num_pairs"] > 0
    assert metrics["eval_scoring_agrees"] is True  # pad = EOS: our scorer pools where RewardTrainer's forward did


def test_ppo_prompts_end_at_the_last_assistant_turn(hh_runs):
    """The gpt2-hh recipe's `implicit_prompt_end`: each prompt is the dialogues' shared prefix up to and including
    the last "\\n\\nAssistant:", so the policy writes the whole final answer (TRL's bare shared prefix would run into
    it whenever both answers begin with the same words)."""
    root, _ = hh_runs
    samples = [json.loads(line) for line in (root / "ppo" / "samples.jsonl").read_text().splitlines()]
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        dialogues = [json.loads(line) for line in handle]
    by_prompt = {}
    for row in dialogues:
        for prompt in {row["chosen"][: row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)]}:
            by_prompt.setdefault(prompt, row)
    assert samples
    for sample in samples:
        prompt = sample["prompt"]
        assert prompt.startswith("\n\nHuman:") and prompt.endswith(ASSISTANT), prompt[-80:]
        row = by_prompt[prompt]  # the prompt is exactly a dialogue cut after its last assistant marker
        assert row["chosen"].startswith(prompt) and row["rejected"].startswith(prompt)
        assert ASSISTANT not in row["chosen"][len(prompt):] and ASSISTANT not in row["rejected"][len(prompt):]


def test_ppo_scores_hh_responses_as_the_reward_model_does(hh_runs):
    """The scores PPO logged equal the reward model's own forward pass on `prompt + response + EOS`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _ = hh_runs
    model = AutoModelForSequenceClassification.from_pretrained(root / "reward").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "reward")
    samples = [json.loads(line) for line in (root / "ppo" / "samples.jsonl").read_text().splitlines()]
    for sample in samples:
        ids = tokenizer(sample["prompt"] + sample["response"] + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert sample["score"] == pytest.approx(expected, abs=1e-4), sample
