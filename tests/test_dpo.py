"""`rlhf dpo` end to end on tiny models: outputs and metrics, LoRA, implicit prompts, bad recipes, dry runs, and the
held-out generation evaluation it shares with PPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING, REPO, run_cli, snapshot, weights, write_recipe

GOLD = {"function": "rlhf_pipeline.tiny.annotator:gold_score"}


def dpo_recipe(output_dir: Path, model: Path, data_dir: Path, **extra) -> dict:
    """2 optimizer steps of 4 pairs; 6 held-out prompts sampled (8 tokens) before and after."""
    recipe = {
        "stage": "dpo", "seed": 0, "output_dir": str(output_dir),
        "model": {"name_or_path": str(model)},
        "data": {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
                 "eval_split": "test", "max_train_samples": 8},
        "gold": GOLD,
        "generation": {"response_length": 8},
        "evaluation": {"prompts": 6, "batch_size": 4},
        "training": {**FAST_TRAINING, "max_steps": 2, "beta": 0.5},
    }
    recipe.update(extra)
    return recipe


def run_dpo(tmp_path: Path, recipe: dict, *flags: str):
    return run_cli("dpo", write_recipe(tmp_path / "dpo.yaml", recipe), *flags)


def test_dpo_trains_evaluates_and_keeps_a_finished_run(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    out = tmp_path / "dpo"
    recipe = dpo_recipe(out, tiny_model_dir, data_dir, reward={"model": str(tiny_reward_dir)})
    result = run_dpo(tmp_path, recipe)
    assert result.exit_code == 0, result.output

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_score_before", "eval_score_after", "eval_gold_before", "eval_gold_after", "eval_kl",
                "eval_response_length_before", "eval_response_length_after", "eval_eos_rate_before",
                "eval_eos_rate_after", "eval_rewards/accuracies", "eval_rewards/margins", "eval_loss",
                "train_runtime", "pairs_per_second", "train_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_kl_before"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its frozen copy
    assert abs(metrics["eval_kl"]) > 1e-4  # ... and leaves it (a 6-sample estimate: its sign may be either)
    assert 0 <= metrics["eval_rewards/accuracies"] <= 1 and 0 <= metrics["eval_gold_after"] <= 1
    assert 0 < metrics["eval_response_length_after"] <= 8
    assert metrics["train_steps"] == 2 and metrics["train_pairs"] == 8 and metrics["eval_pairs"] == 16
    assert metrics["eval_prompts"] == 6 and metrics["prompt"] == "explicit" and metrics["saved"] == "full"
    assert metrics["reference"] == "a frozen copy of the model"

    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in samples] == ["before"] * 6 + ["after"] * 6
    assert {"prompt", "response", "score", "gold"} <= set(samples[0])
    before = json.loads((out / "eval_before.json").read_text())
    assert before["gold"] == metrics["eval_gold_before"] and before["score"] == metrics["eval_score_before"]
    from test_stages import check_training_log

    rows = check_training_log(out, "dpo", metrics, has_eval=True, logging_steps=1)  # and dpo_curves.png
    assert rows[-1]["eval_rewards/accuracies"] == metrics["eval_rewards/accuracies"]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    changed = weights(out)
    assert any(not torch.equal(t, changed[k]) for k, t in weights(tiny_model_dir).items())

    documented = (REPO / "docs" / "dpo.md").read_text()
    assert not [k for k in metrics if f"`{k}`" not in documented], "docs/dpo.md does not define every metric"

    # a finished run is not replaced without --overwrite
    kept = snapshot(out)
    again = run_dpo(tmp_path, recipe)
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    assert snapshot(out) == kept


def test_dpo_ctrl_c_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data_dir):
    """Ctrl-C during step 3 of 4 saves checkpoint-3 and exits 130; --resume keeps the evaluation made before training
    and ends with the weights and metrics of a run never interrupted."""
    from test_runs import interrupt, same_log, same_weights

    def recipe_for(name):
        out = tmp_path / name
        recipe = dpo_recipe(out, tiny_model_dir, data_dir)
        recipe["training"].update(max_steps=4, save_steps=2)
        return write_recipe(tmp_path / f"{name}.yaml", recipe), out

    straight, straight_out = recipe_for("straight")
    assert run_cli("dpo", straight).exit_code == 0
    recipe, out = recipe_for("interrupted")
    stopped = interrupt("ctrl-c-at", 3, "dpo", recipe)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert f"resume with: rlhf dpo {recipe} --resume" in stopped.stderr
    before = (out / "eval_before.json").read_text()
    result = run_cli("dpo", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "eval_before.json").read_text() == before
    assert same_weights(straight_out, out)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight_out, out))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_gold_before", "eval_gold_after", "eval_kl"):
        assert b[key] == a[key], key
    assert same_log(straight_out, out)  # the resumed run's log.jsonl: the steps before and after, each once


def test_dpo_lora_reference_is_the_adapter_disabled(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "dpo"
    recipe = dpo_recipe(out, tiny_model_dir, data_dir, peft={"r": 4, "alpha": 8, "save": "adapter"})
    result = run_dpo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"] == "the policy with its adapter disabled" and metrics["saved"] == "adapter"
    assert metrics["num_trainable_parameters"] < metrics["num_parameters"] / 2
    assert metrics["eval_kl_before"] == pytest.approx(0.0, abs=1e-5)  # LoRA starts at zero: policy == reference
    assert abs(metrics["eval_kl"]) > 1e-4
    assert "eval_score_before" not in metrics and "eval_gold_before" in metrics  # no reward: no score

    # the saved adapter reloads onto its base, and its KL to the base is what the stage measured
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from rlhf_pipeline.held_out import evaluate_generation
    from rlhf_pipeline.recipe.schema import GenerationSection
    from rlhf_pipeline.stages.ppo import EVAL_SAMPLES_FILE

    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = _prompts(tokenizer, [json.loads(line)["prompt"] for line in
                                   (out / EVAL_SAMPLES_FILE).read_text().splitlines()[:6]])
    again = evaluate_generation(model, None, tokenizer, prompts, GenerationSection(response_length=8), _OneProcess(),
                                seed=100_003, batch_size=4)
    assert again["kl"] == pytest.approx(metrics["eval_kl"], rel=1e-4)
    assert again["response_length"] == metrics["eval_response_length_after"]


def test_dpo_implicit_prompt(tmp_path, tiny_model_dir, data_dir, tiny_world):
    out = tmp_path / "dpo"
    recipe = dpo_recipe(out, tiny_model_dir, data_dir, gold=None)
    recipe["data"] = {"files": str(data_dir / "prefs-implicit.jsonl"), "eval_size": 8, "max_train_samples": 8,
                      "implicit_prompt_end": ":"}
    result = run_dpo(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompt"] == "implicit" and metrics["eval_pairs"] == 8
    assert {"eval_gold_before", "eval_score_before"}.isdisjoint(metrics) and math.isfinite(metrics["eval_kl"])
    # the prompts sampled are the original ones (cut after the last ":"), not a prefix running into the responses
    originals = {r["prompt"] for r in tiny_world["preferences-train"]}
    sampled = [json.loads(line)["prompt"] for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert sampled and set(sampled) <= originals


@pytest.mark.parametrize("change, key, words", [
    (lambda r: r["training"].update(betta=0.1), "training.betta", "did you mean 'beta'?"),
    (lambda r: r["data"].pop("eval_split"), "data", "set `eval_split` or `eval_size`"),
    (lambda r: r["data"]["columns"].update(prompt="question"), "data.columns.prompt", "no column 'question'"),
])
def test_dpo_bad_recipe_exit_2_nothing_written(tmp_path, tiny_model_dir, data_dir, change, key, words):
    out = tmp_path / "dpo"
    recipe = dpo_recipe(out, tiny_model_dir, data_dir)
    recipe["data"]["columns"] = {}
    change(recipe)
    result = run_dpo(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert f"{key}: " in result.output and words in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_dpo_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "nested" / "dpo"
    result = run_cli("dpo", "recipes/tiny/dpo.yaml", "--output-dir", out, "--dry-run", "--set", "peft.r=8",
                     "--set", "training.gradient_accumulation_steps=2")
    assert result.exit_code == 0, result.output
    plan = result.stdout
    assert plan.startswith("dry run: nothing was written\n")
    assert "reference   the policy with its LoRA adapter disabled" in plan
    assert ("32 pairs per device (per_device_train_batch_size) x 1 process x 2 gradient accumulation steps = 64 "
            "pairs per optimizer step; 1 epoch") in plan
    assert "beta=0.5" in plan and "rlhf_pipeline.tiny.annotator:gold_score (evaluation only)" in plan
    assert not out.exists() and not out.parent.exists()


# ---------------------------------------------------------------------------------------------------------------
# the held-out evaluation shared with PPO
# ---------------------------------------------------------------------------------------------------------------
class _OneProcess:
    """What evaluate_generation asks of an Accelerator, for one CPU process."""

    process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")

    @staticmethod
    def autocast():
        from contextlib import nullcontext

        return nullcontext()

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def _prompts(tokenizer, texts):
    from rlhf_pipeline.ppo.modules import Prompts

    return Prompts(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])


def test_held_out_evaluation_is_seeded_and_reference_kinds_agree(tiny_model_dir, tiny_world):
    """The same seed gives the same samples and numbers (PPO's and DPO's before/after comparisons rest on it); a
    fresh LoRA adapter disabled and a frozen copy are the same reference (KL 0), and sampling does not disturb the
    caller's random stream."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.held_out import evaluate_generation
    from rlhf_pipeline.models import lora_config
    from rlhf_pipeline.ppo.modules import FunctionScorer
    from rlhf_pipeline.recipe.schema import GenerationSection, LoraSection
    from rlhf_pipeline.rewards import load_function

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = _prompts(tokenizer, [r["prompt"] for r in tiny_world["prompts-test"][:5]])
    gold = FunctionScorer(load_function(GOLD["function"]))
    kwargs = dict(seed=7, batch_size=2, gold=gold)
    generation = GenerationSection(response_length=6)

    state = torch.get_rng_state()
    first = evaluate_generation(policy, copy, tokenizer, prompts, generation, _OneProcess(), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate_generation(policy, copy, tokenizer, prompts, generation, _OneProcess(), **kwargs)
    assert first == second and len(first["samples"]) == 5 and "score" not in first
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          lora_config(LoraSection(r=2), "CAUSAL_LM", policy)).eval()
    adapter = evaluate_generation(lora, None, tokenizer, prompts, generation, _OneProcess(), **kwargs)
    assert [s["response"] for s in adapter["samples"]] == [s["response"] for s in first["samples"]]
    assert adapter["gold"] == first["gold"] and adapter["kl"] == pytest.approx(0.0, abs=1e-6)

    other = evaluate_generation(policy, copy, tokenizer, prompts, generation, _OneProcess(), **{**kwargs, "seed": 8})
    assert [s["response"] for s in other["samples"]] != [s["response"] for s in first["samples"]]


def test_loss_type_takes_one_name_or_a_list():
    """DPOConfig turns `loss_type: ipo` into ["ipo"]; the check accepts both forms and still rejects a number."""
    from rlhf_pipeline.recipe.training_fields import check_training

    assert check_training("dpo", {"loss_type": "ipo"}) == []
    assert check_training("dpo", {"loss_type": ["sigmoid", "sft"]}) == []
    assert [key for key, _ in check_training("dpo", {"loss_type": 3})] == ["loss_type"]
