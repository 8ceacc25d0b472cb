"""Each stage trains a few steps on the tiny fixtures: exit code 0, finite metrics, changed weights, and a
pickle-free output directory that loads with the Auto classes."""

from __future__ import annotations

import gzip
import json
import math
import os
import stat
from pathlib import Path

import datasets  # noqa: F401  (imported before any CliRunner call: see test_bad_recipes.py)
import pytest
import torch
import transformers  # noqa: F401
import yaml
from conftest import FAST_TRAINING, HH_RLHF, REPO, run_cli, stage_recipe, write_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_pipeline.recipe.load import load_recipe

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def run_stage(stage: str, tmp_path: Path, model, data: dict, **extra) -> tuple[Path, dict]:
    """Write the recipe, run `rlhf STAGE recipe.yaml`, check what every finished run has; return (out, metrics)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / f"{stage}.yaml", stage_recipe(stage, out, model, data, **extra))
    result = run_cli(stage, recipe)
    assert result.exit_code == 0, result.output
    return out, check_run_dir(out, stage, has_eval=bool(data.get("eval_size") or data.get("eval_split")))


def check_run_dir(out: Path, stage: str, has_eval: bool = True) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_loss", "final_train_loss"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["train_runtime"] is not None and metrics["train_runtime"] > 0
    assert metrics["train_steps"] == FAST_TRAINING["max_steps"]
    if has_eval:
        assert math.isfinite(metrics["eval_loss"]), metrics
    else:
        assert "eval_loss" not in metrics

    names = {p.name for p in out.iterdir()}
    assert TOKENIZER_FILES <= names, names
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors' own save leaves 0600
    assert {"recipe.resolved.yaml", "metrics.json"} <= names
    assert "training_args.bin" not in names
    pickles = [p for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, pickles
    assert not [n for n in names if n.startswith("checkpoint-")], names
    assert not [n for n in names if n.endswith(".tmp")], names

    text = (out / "recipe.resolved.yaml").read_text()
    assert "\nprovenance:\n" in text
    resolved = yaml.safe_load(text)
    assert resolved["stage"] == stage and resolved["seed"] == 0
    assert resolved["output_dir"] == str(out)
    versions = resolved["provenance"]["versions"]
    for library in ("torch", "transformers", "trl", "peft", "datasets", "rlhf-pipeline"):
        assert versions[library], library
    assert resolved["provenance"]["command"].startswith("rlhf")
    assert load_recipe(out / "recipe.resolved.yaml").recipe.output_dir == str(out)  # it loads again
    check_training_log(out, stage, metrics, has_eval, resolved["training"].get("logging_steps", 10))
    return metrics


# What each Trainer stage logs at every logging step besides step, epoch, loss, grad_norm and learning_rate.
STAGE_LOG_KEYS = {
    "pretrain": set(),
    "sft": {"num_tokens", "mean_token_accuracy", "entropy"},
    "reward": {"num_tokens", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"},
    "dpo": {"num_tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "mean_token_accuracy", "entropy"},
}


def check_training_log(out: Path, stage: str, metrics: dict, has_eval: bool, logging_steps: int) -> list[dict]:
    """log.jsonl of a finished Trainer stage: a row of numbers every `logging_steps` steps with the loss, grad norm,
    learning rate and the stage's own figures; the evaluation after training as the last row; every key defined in
    docs/training-logs.md; and its curves drawn in `<stage>_curves.png`. Returns the rows."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(logging_steps, metrics["train_steps"] + 1, logging_steps))
    for row in train:
        assert {"step", "epoch", "loss", "grad_norm", "learning_rate", *STAGE_LOG_KEYS[stage]} <= set(row), row
    assert train[-1]["loss"] == metrics["final_train_loss"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r.values())
    assert not [r for r in rows if "train_loss" in r]  # the Trainer's end-of-session summary is metrics.json's
    if has_eval:
        last = rows[-1]
        assert last["step"] == metrics["train_steps"] and last["eval_loss"] == metrics["eval_loss"]
    else:
        assert not [r for r in rows if "eval_loss" in r]
    documented = (REPO / "docs" / "training-logs.md").read_text()
    undefined = {k for r in rows for k in r if f"`{k}`" not in documented
                 and not (k.startswith("eval_") and f"`{k.removeprefix('eval_')}`" in documented)}
    assert not undefined, f"docs/training-logs.md does not define {undefined}"
    assert (out / f"{stage}_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def check_full_model(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json"} <= names, names
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def block_matrices(names) -> set[str]:
    """The attention and MLP weight matrices of the transformer blocks."""
    matrices = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    return {n for n in names if (n.startswith("h.") or ".h." in n) and n.endswith(matrices)}


class TrainerSpy:
    """Records the trainer a stage builds (its datasets and collator show what the stage really trains on)."""

    def __init__(self, monkeypatch, stage_module: str):
        import importlib

        module = importlib.import_module(f"rlhf_pipeline.stages.{stage_module}")
        original = module.train_and_evaluate
        self.trainer = None

        def spy(trainer, *args, **kwargs):
            self.trainer = trainer
            return original(trainer, *args, **kwargs)

        monkeypatch.setattr(module, "train_and_evaluate", spy)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model's tokenizer with a 128-token context, so every tiny preference pair fits in one sequence."""
    from rlhf_pipeline.models import init_gpt2
    from rlhf_pipeline.recipe.schema import GPT2Architecture

    root = tmp_path_factory.mktemp("wide-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=128), tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


# ---------------------------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [None, "<pad>"], ids=["gpt2-convention", "distinct-pad"])
def test_pretrain_from_scratch(tmp_path, data_dir, tiny_world, pad):
    train = {"vocab_size": 350, **({"pad_token": pad} if pad else {})}
    recipe = stage_recipe("pretrain", tmp_path / "out", "unused", {"files": str(data_dir / "text.jsonl"),
                                                                    "eval_size": 40, "block_size": 32},
                          tokenizer={"train": train})
    recipe["model"] = {"init": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    out = tmp_path / "out"
    result = run_cli("pretrain", write_recipe(tmp_path / "pretrain.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = check_run_dir(out, "pretrain")
    check_full_model(out)
    assert math.isfinite(metrics["eval_perplexity"])
    assert metrics["block_size"] == 32 and metrics["train_blocks"] > 0

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) == metrics["vocab_size"] == model.config.vocab_size
    assert 300 <= len(tokenizer) <= 350
    endoftext = "<|endoftext|>"
    if pad is None:  # GPT-2's convention: one special token, serving as EOS, BOS, UNK and pad
        assert tokenizer.all_special_tokens == [endoftext]
        assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == tokenizer.pad_token == endoftext
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.bos_token_id
    else:
        assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == endoftext
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert endoftext not in tokenizer.decode(tokenizer("a film")["input_ids"])  # no BOS/EOS added, as GPT-2
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.n_positions) == (2, 2, 32, 64)
    text = tiny_world["corpus"][0]["text"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE round-trips
    # trained: LayerNorms start at exactly weight 1, bias 0
    assert not torch.equal(model.transformer.ln_f.weight, torch.ones_like(model.transformer.ln_f.weight))
    assert not torch.equal(model.transformer.h[0].ln_1.bias, torch.zeros_like(model.transformer.h[0].ln_1.bias))
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_pretrain_continues_from_a_checkpoint(tmp_path, tiny_model_dir, data_dir):
    out, metrics = run_stage("pretrain", tmp_path, tiny_model_dir, {"files": str(data_dir / "text.jsonl"),
                                                                      "max_train_samples": 200})
    check_full_model(out)
    before = state(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    after = state(AutoModelForCausalLM.from_pretrained(out))
    moved = changed(before, after)
    assert block_matrices(before) <= moved, block_matrices(before) - moved
    assert metrics["block_size"] == 64  # the model's context length
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


# ---------------------------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------------------------
def test_sft_prompt_completion_trains_on_the_completion_only(tmp_path, tiny_model_dir, data_dir, tiny_world,
                                                            monkeypatch):
    spy = TrainerSpy(monkeypatch, "sft")
    out, metrics = run_stage("sft", tmp_path, tiny_model_dir, {"files": str(data_dir / "sft.jsonl"), "eval_size": 8})
    check_full_model(out)
    assert metrics["data_format"] == "prompt-completion" and metrics["saved"] == "full"
    assert math.isfinite(metrics["eval_perplexity"])
    moved = changed(state(AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
                    state(AutoModelForCausalLM.from_pretrained(out)))
    assert block_matrices(moved) and "transformer.wte.weight" in moved

    # the loss covers the completion only: the prompt's labels are -100, in the data and in the collated batch
    trainer = spy.trainer
    assert len(trainer.train_dataset) == 56 and len(trainer.eval_dataset) == 8
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = {r["prompt"] for r in tiny_world["sft"]}
    for example in trainer.train_dataset.select(range(4)):
        labels, ids = example["labels"], example["input_ids"]
        prompt_len = next(i for i, label in enumerate(labels) if label != -100)
        assert prompt_len > 0
        assert tokenizer.decode(ids[:prompt_len]) in prompts
        assert labels[prompt_len:] == ids[prompt_len:]
        batch = trainer.data_collator([example])
        assert (batch["labels"][0][:prompt_len] == -100).all()
        assert batch["labels"][0][prompt_len:].tolist() == ids[prompt_len:]


@pytest.mark.parametrize("source", ["mapped-column", "text-file"])
def test_sft_plain_text(tmp_path, tiny_model_dir, data_dir, source, monkeypatch):
    spy = TrainerSpy(monkeypatch, "sft")
    if source == "mapped-column":
        data = {"files": str(data_dir / "sft.jsonl"), "columns": {"text": "completion"}, "eval_size": 0.125}
    else:
        data = {"files": str(data_dir / "text.jsonl"), "max_train_samples": 64}
    out, metrics = run_stage("sft", tmp_path, tiny_model_dir, data)
    check_full_model(out)
    assert metrics["data_format"] == "language-modelling"
    example = spy.trainer.train_dataset[0]
    assert example["labels"] == example["input_ids"]  # every token counts
    assert len(spy.trainer.train_dataset) == (56 if source == "mapped-column" else 64)
    assert changed(state(AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
                   state(AutoModelForCausalLM.from_pretrained(out)))


@pytest.mark.parametrize("template_from", ["inline", "file"])
def test_sft_conversational_with_chat_template(tmp_path, tiny_model_dir, data_dir, template_from):
    template = CHAT_TEMPLATE
    if template_from == "file":
        (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
        template = str(tmp_path / "chat.jinja")
    out, metrics = run_stage("sft", tmp_path, tiny_model_dir, {"files": str(data_dir / "chat.jsonl"), "eval_size": 8},
                             tokenizer={"chat_template": template})
    check_full_model(out)
    assert metrics["data_format"] == "conversational"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE  # saved with the model
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<user> hi\n<assistant> "
    assert changed(state(AutoModelForCausalLM.from_pretrained(tiny_model_dir)),
                   state(AutoModelForCausalLM.from_pretrained(out)))


def test_sft_conversational_without_template_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                              {"files": str(data_dir / "chat.jsonl")}))
    result = run_cli("sft", recipe)
    assert result.exit_code == 2
    assert ("tokenizer.chat_template: the data is conversational but the tokenizer has no chat template; set one: "
            "`tokenizer.chat_template: chatml` (built in)") in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_sft_conversational_with_built_in_chatml(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """`chat_template: chatml`: ChatML's markers become special tokens (one id each; the model gains two embedding
    rows), `<|im_end|>` is EOS, and the saved tokenizer carries all of it to the later stages."""
    spy = TrainerSpy(monkeypatch, "sft")
    out, metrics = run_stage("sft", tmp_path, tiny_model_dir, {"files": str(data_dir / "chat.jsonl"), "eval_size": 8},
                             tokenizer={"chat_template": "chatml"})
    assert metrics["data_format"] == "conversational"
    tokenizer = AutoTokenizer.from_pretrained(out)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert {start, end} == {len(base), len(base) + 1} and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"  # GPT-2's pad, now distinct from EOS
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == len(base) + 2
    assert model.config.eos_token_id == end and model.generation_config.eos_token_id == end
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the plot was fine ."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthe plot was fine .<|im_end|>\n"
    example = spy.trainer.train_dataset[0]["input_ids"]  # (cut at the tiny model's 64 positions)
    assert example[0] == start and end in example and tokenizer.decode(example).startswith("<|im_start|>user\n")


def test_lora_that_would_leave_new_tokens_untrained_is_refused(tmp_path, tiny_model_dir, data_dir):
    """ChatML's markers get new embedding rows, which LoRA would never train: refused before the weights load, with
    what to do; LoRA from a model that already has them (a full fine-tune with ChatML) runs."""
    data = {"files": str(data_dir / "chat.jsonl"), "eval_size": 8}
    out = tmp_path / "refused"
    recipe = write_recipe(tmp_path / "lora.yaml", stage_recipe("sft", out, tiny_model_dir, data,
                                                               tokenizer={"chat_template": "chatml"}, peft={"r": 4}))
    result = run_cli("sft", recipe)
    assert result.exit_code == 2, result.output
    assert ("peft: the tokenizer has tokens the model has no embedding for (<|im_start|>, <|im_end|>); with LoRA "
            "their new embedding rows would never train") in result.output
    assert "without `peft:`" in result.output and "Traceback" not in result.output and not out.exists()
    with_markers, _ = run_stage("sft", tmp_path / "full", tiny_model_dir, data, tokenizer={"chat_template": "chatml"})
    _, metrics = run_stage("sft", tmp_path / "lora", with_markers, data, peft={"r": 4})
    assert metrics["saved"] == "merged"


def test_sft_packing(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    spy = TrainerSpy(monkeypatch, "sft")
    training = {**FAST_TRAINING, "packing": True}
    out, _ = run_stage("sft", tmp_path, tiny_model_dir, {"files": str(data_dir / "sft.jsonl"), "eval_size": 8},
                       training=training)
    check_full_model(out)
    packed = spy.trainer.train_dataset
    assert len(packed) < 56  # 56 demonstrations packed into fewer sequences of up to 64 tokens
    assert max(len(ids) for ids in packed["input_ids"]) == 64
    assert yaml.safe_load((out / "recipe.resolved.yaml").read_text())["training"]["packing"] is True


def test_sft_lora_merged(tmp_path, tiny_model_dir, data_dir):
    out, metrics = run_stage("sft", tmp_path, tiny_model_dir, {"files": str(data_dir / "sft.jsonl"), "eval_size": 8},
                             peft={"r": 4, "alpha": 8, "dropout": 0.0})
    check_full_model(out)
    assert metrics["saved"] == "merged"
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    before = state(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    after = state(AutoModelForCausalLM.from_pretrained(out))
    moved = changed(before, after)
    assert block_matrices(before) <= moved, block_matrices(before) - moved  # adapters on every linear layer, merged
    # only the adapted matrices move: embeddings, LayerNorms and biases are frozen under LoRA
    assert moved <= block_matrices(before), moved - block_matrices(before)


def test_sft_lora_adapter(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """An adapter whose base is a local directory given relative to the working directory still loads elsewhere."""
    base = os.path.relpath(tiny_model_dir)
    out, metrics = run_stage("sft", tmp_path, base, {"files": str(data_dir / "sft.jsonl"), "eval_size": 8},
                             peft={"r": 4, "target_modules": ["c_attn"], "save": "adapter"})
    assert metrics["saved"] == "adapter"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
    assert "model.safetensors" not in names
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["target_modules"] == ["c_attn"]
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == tiny_model_dir.resolve()
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))

    monkeypatch.chdir(tmp_path)  # away from where the relative base path was written
    model = AutoModelForCausalLM.from_pretrained(out)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert hasattr(model, "peft_config")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_model(ids).logits)  # the adapter is applied
    # a later stage can start from the adapter directory: it trains the base model with the adapter merged in
    from peft import PeftModel

    expected = state(PeftModel.from_pretrained(base_model, str(out)).merge_and_unload())
    base_weights = state(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    still = {**FAST_TRAINING, "learning_rate": 1e-12}  # three steps that leave the weights as they started
    for stage, data, auto_class in (
        ("sft", {"files": str(data_dir / "sft.jsonl")}, AutoModelForCausalLM),
        ("reward", {"files": str(data_dir / "prefs.jsonl"), "eval_size": 8}, AutoModelForSequenceClassification),
    ):
        later, _ = run_stage(stage, tmp_path / stage, out, data, training=still)
        check_full_model(later)
        weights = state(auto_class.from_pretrained(later))
        name = "transformer.h.0.attn.c_attn.weight"
        assert torch.allclose(weights[name], expected[name], atol=1e-6), stage
        assert not torch.allclose(weights[name], base_weights[name], atol=1e-6), stage


# ---------------------------------------------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------------------------------------------
def check_reward_model(out: Path, metrics: dict, held_out: int) -> None:
    check_full_model(out)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert math.isfinite(metrics["eval_margin"])
    assert metrics["eval_num_pairs"] == held_out
    assert metrics["eval_scoring_agrees"] is True  # our per-pair scores give RewardTrainer's accuracy and margin
    pairs = [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == held_out and (out / "reward_scores.png").stat().st_size > 0
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()), info  # the trained score head was saved
    assert model.config.num_labels == 1
    assert model.score.weight.shape[0] == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


@pytest.mark.parametrize("prompt", ["explicit", "implicit"])
def test_reward(tmp_path, wide_model_dir, data_dir, prompt):
    data_file = "prefs.jsonl" if prompt == "explicit" else "prefs-implicit.jsonl"
    out, metrics = run_stage("reward", tmp_path, wide_model_dir, {"files": str(data_dir / data_file), "eval_size": 8})
    assert metrics["prompt"] == prompt and metrics["saved"] == "full"
    assert metrics["train_pairs"] == 56 and metrics["eval_pairs_too_long"] == 0
    check_reward_model(out, metrics, held_out=8)
    base = state(AutoModelForCausalLM.from_pretrained(wide_model_dir).transformer)
    trained = state(AutoModelForSequenceClassification.from_pretrained(out).transformer)
    assert block_matrices(base) <= changed(base, trained)


def test_reward_lora_saved_model_scores_like_the_evaluated_one(tmp_path, wide_model_dir, data_dir):
    from rlhf_pipeline.scoring import preference_metrics, score_sequences

    data = {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
            "eval_split": "test"}
    out, metrics = run_stage("reward", tmp_path, wide_model_dir, data, peft={"r": 4})
    assert metrics["saved"] == "merged"
    check_reward_model(out, metrics, held_out=16)
    assert not (out / "adapter_config.json").exists()

    # score the held-out pairs with the saved model, tokenized as RewardTrainer does: prompt + response + EOS
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (data_dir / "prefs-test.jsonl").read_text().splitlines()]
    ids = {side: [tokenizer(r["prompt"] + r[side] + tokenizer.eos_token)["input_ids"] for r in rows]
           for side in ("chosen", "rejected")}
    scores = {side: score_sequences(model, seqs, tokenizer.pad_token_id) for side, seqs in ids.items()}
    mine = preference_metrics(scores["chosen"], scores["rejected"])
    assert mine["accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert mine["margin"] == pytest.approx(metrics["eval_margin"], abs=1e-4)


def test_reward_metrics_are_trls_and_agree_with_the_per_pair_scores(tmp_path, wide_model_dir, data_dir):
    """Held-out pairs that do not fill the last evaluation batch: RewardTrainer averages per batch, so its accuracy
    is not the plain per-pair mean; the per-pair scores averaged the same way give TRL's numbers exactly."""
    from rlhf_pipeline.stages.reward import batch_means

    data = {"files": {"train": str(data_dir / "prefs.jsonl"), "test": str(data_dir / "prefs-test.jsonl")},
            "eval_split": "test"}
    out, metrics = run_stage("reward", tmp_path, wide_model_dir, data,
                             training={**FAST_TRAINING, "per_device_eval_batch_size": 3})  # 16 pairs: 5 x 3 + 1
    check_reward_model(out, metrics, held_out=16)
    pairs = [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]
    import torch

    margins = torch.tensor([p["margin"] for p in pairs], dtype=torch.float64)
    assert metrics["eval_accuracy"] == pytest.approx(batch_means((margins > 0).double(), 3), abs=1e-6)
    assert metrics["eval_margin"] == pytest.approx(batch_means(margins, 3), abs=1e-4)
    assert metrics["eval_ties"] == int((margins == 0).sum())
    assert {"eval_mean_reward", "eval_min_reward", "eval_max_reward"} <= set(metrics)  # TRL's own, kept


def test_reward_disagreement_is_reported(capsys):
    import torch

    from rlhf_pipeline.stages.reward import batch_means, check_agreement

    assert batch_means(torch.tensor([1.0, 0.0, 1.0]), 2) == pytest.approx(0.75)  # (0.5 + 1) / 2, not 2/3
    chosen, rejected = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 1.0])  # margins 1, 2, -0.5
    metrics = {"eval_accuracy": 0.5, "eval_margin": (1.5 - 0.5) / 2}  # batches [1, 2] and [-0.5]
    check_agreement(metrics, chosen, rejected, batch_size=2)
    assert metrics["eval_scoring_agrees"] is True
    metrics = {"eval_accuracy": 0.75, "eval_margin": 0.5}  # as if TRL pooled another position
    check_agreement(metrics, chosen, rejected, batch_size=2)
    assert metrics["eval_scoring_agrees"] is False
    assert "RewardTrainer's eval_accuracy 0.750000 differs" in capsys.readouterr().err


def test_reward_reports_pairs_too_long(tmp_path, tiny_model_dir, data_dir):
    """With a 64-token context some tiny pairs do not fit; RewardTrainer drops them, and the metrics say so."""
    _, metrics = run_stage("reward", tmp_path, tiny_model_dir, {"files": str(data_dir / "prefs.jsonl"),
                                                                  "eval_size": 16})
    assert metrics["eval_pairs_too_long"] > 0
    assert metrics["eval_num_pairs"] + metrics["eval_pairs_too_long"] == 16
    assert metrics["train_pairs"] + metrics["train_pairs_too_long"] == 48


def test_reward_every_pair_too_long_is_a_user_error(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("reward", out, tiny_model_dir,
                                                            {"files": str(data_dir / "prefs.jsonl"), "eval_size": 8},
                                                            training={**FAST_TRAINING, "max_length": 8}))
    result = run_cli("reward", recipe)
    assert result.exit_code == 2, result.output
    assert "training.max_length: every train pair is longer than max_length (8 tokens)" in result.output
    assert not out.exists()


def test_reward_on_anthropic_hh_rlhf(tmp_path):
    """The real data format (implicit prompt: whole dialogues), on a tiny model trained here on its text."""
    if not HH_RLHF.is_file():
        pytest.skip(f"Anthropic HH-RLHF sample not found at {HH_RLHF}")
    from rlhf_pipeline.models import init_gpt2, train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture

    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as handle:
        rows = [json.loads(next(handle)) for _ in range(300)]
    texts = [r[side] for r in rows for side in ("chosen", "rejected")]
    tokenizer = train_bpe_tokenizer([texts], BpeTraining(vocab_size=1000))
    base = tmp_path / "hh-base"
    torch.manual_seed(0)
    init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=512), tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)

    data = {"files": str(HH_RLHF), "eval_size": 16, "max_train_samples": 64}
    training = {**FAST_TRAINING, "per_device_train_batch_size": 2}
    out, metrics = run_stage("reward", tmp_path, base, data, training=training)
    assert metrics["prompt"] == "implicit"
    assert metrics["train_pairs"] + metrics["train_pairs_too_long"] == 64
    held_out = 16 - metrics["eval_pairs_too_long"]
    assert held_out >= 8
    check_reward_model(out, metrics, held_out=held_out)


def test_sft_reports_to_tensorboard(tmp_path, tiny_model_dir, data_dir):
    """training.report_to goes through to transformers' trackers for the TRL-backed stages."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    recipe = stage_recipe("sft", out, tiny_model_dir, {"files": str(data_dir / "sft.jsonl")},
                          training={**FAST_TRAINING, "report_to": "tensorboard"})
    result = run_cli("sft", write_recipe(tmp_path / "sft.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert list(out.rglob("events.out.tfevents.*"))
