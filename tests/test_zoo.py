"""Every stage on every model family a user brings (tests/zoo.py): GPT-2 with its real tokenizer, Llama, Qwen2,
GPT-NeoX, OPT, Gemma-2 (soft-capped logits) and a Qwen2-style instruct checkpoint with a chat template and a
generation_config.json of its own.

Each family runs sft -> reward -> ppo (gae, full) -> rloo (LoRA, saved as an adapter) -> grpo (LoRA, merged) -> dpo
(LoRA, saved as an adapter) -> eval -> push, and every PPO-family run is checked against what the libraries
themselves compute: the scores against the reward model's own forward on the sequence RewardTrainer builds, the
log-probabilities against the policy's own forward (soft-capping included), the saved model against the policy in
memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAINING, run_cli, write_jsonl, write_recipe
from zoo import FAMILIES, INSTRUCT_SAMPLING, build

PLAIN = tuple(f for f in FAMILIES if f != "instruct")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_world) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    texts = [r["text"] for r in tiny_world["corpus"]]
    return {family: build(family, root, texts) for family in FAMILIES}


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory, tiny_world) -> dict[str, dict[str, Path]]:
    """The tiny world's data, small, in plain text and in TRL's conversational format."""
    root = tmp_path_factory.mktemp("zoo-data")
    w = tiny_world

    def user(text):
        return [{"role": "user", "content": text.strip()}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    plain = {"sft": write_jsonl(root / "sft.jsonl", w["sft"][:32]),
             "prefs": write_jsonl(root / "prefs.jsonl", w["preferences-train"][:32]),
             "prefs-test": write_jsonl(root / "prefs-test.jsonl", w["preferences-test"][:8]),
             "prompts": write_jsonl(root / "prompts.jsonl", w["prompts-train"][:16]),
             "prompts-test": write_jsonl(root / "prompts-test.jsonl", w["prompts-test"][:8])}
    chat = {"sft": write_jsonl(root / "chat-sft.jsonl", [{"messages": user(r["prompt"]) + assistant(r["completion"])}
                                                        for r in w["sft"][:32]]),
            "prefs": write_jsonl(root / "chat-prefs.jsonl", [
                {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
                for r in w["preferences-train"][:32]]),
            "prefs-test": write_jsonl(root / "chat-prefs-test.jsonl", [
                {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
                for r in w["preferences-test"][:8]]),
            "prompts": write_jsonl(root / "chat-prompts.jsonl", [{"prompt": user(r["prompt"])}
                                                                 for r in w["prompts-train"][:16]]),
            "prompts-test": write_jsonl(root / "chat-prompts-test.jsonl", [{"prompt": user(r["prompt"])}
                                                                           for r in w["prompts-test"][:8]])}
    return {"plain": plain, "chat": chat}


def _split(files: dict[str, Path], train: str, test: str) -> dict:
    return {"files": {"train": str(files[train]), "test": str(files[test])}, "eval_split": "test"}


def _run(tmp_path: Path, name: str, recipe: dict) -> Path:
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    result = run_cli(recipe["stage"], path)
    assert result.exit_code == 0, f"{name}: {result.output}"
    return Path(recipe["output_dir"])


def ppo_settings(**changes) -> dict:
    settings = {"total_episodes": 8, "rollout_batch_size": 4, "num_mini_batches": 1, "ppo_epochs": 1,
                "learning_rate": 3.0e-3, "eval_prompts": 4, "eval_batch_size": 4, "sample_every": 1,
                "num_samples": 2}
    settings.update(changes)
    return settings


class ScoreLog:
    """Every (rollout, scores) the PPO trainer's scorers return, for checking them against the reward model."""

    def __init__(self, monkeypatch):
        from rlhf_pipeline.ppo import trainer

        self.calls: list[tuple] = []
        original = trainer.score

        def recording(scorer, rollout, where):
            scores = original(scorer, rollout, where)
            self.calls.append((scorer, rollout, scores.clone()))
            return scores

        monkeypatch.setattr(trainer, "score", recording)


def check_scores_equal_reward_model(log: ScoreLog, reward_dir: Path, tmp_path: Path) -> int:
    """Every reward-model score PPO used equals the reward model's own forward, one unpadded sequence at a time, on
    the token ids a real RewardTrainer builds from (prompt, response): chat template and appended EOS included."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhf_pipeline.ppo.modules import ModelScorer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    rows, expected = [], []
    for scorer, rollout, scores in log.calls:
        if not isinstance(scorer, ModelScorer):
            continue
        for i, response in enumerate(rollout.responses):
            if rollout.prompts.messages is not None:
                prompt, completion = rollout.prompts.messages[i], [{"role": "assistant", "content": response}]
            else:
                prompt, completion = rollout.prompts.texts[i], response
            rows.append({"prompt": prompt, "chosen": completion, "rejected": completion})
            expected.append(float(scores[i]))
    assert rows
    args = RewardConfig(output_dir=str(tmp_path / "rt"), report_to="none", bf16=False, max_length=None,
                        dataloader_pin_memory=False, use_cpu=True)
    built = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer).train_dataset["chosen_ids"]
    with torch.no_grad():
        own = [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in built]
    assert own == pytest.approx(expected, abs=1e-4)
    return len(rows)


def samples_as_trained(out: Path, family: str) -> None:
    """A user who loads the trained policy and calls `generate` with what it saved (generation_config.json) draws
    exactly what PPO's rollouts drew: the same tokens under the same seed (the zoo's PPO runs sample 6 tokens at
    temperature 0.7, the full softmax). A saved model loads the file itself; an adapter loads its base's, so the
    adapter's own is set as the model's generation config, as the README says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_pipeline.ppo.modules import left_pad, sample_rollout, seeded, stop_token_ids, truncate_after_eos
    from rlhf_pipeline.recipe.schema import GenerationSection

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    if (out / "adapter_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(out)
    prompts = _prompts(family, tokenizer)
    query, mask = left_pad(prompts.ids, tokenizer.pad_token_id)
    with seeded(5, torch.device("cpu")), torch.no_grad():
        theirs = model.generate(input_ids=query, attention_mask=mask)[:, query.shape[1]:]
    with seeded(5, torch.device("cpu")):
        ours = sample_rollout(model, tokenizer, prompts, GenerationSection(response_length=6, temperature=0.7),
                              torch.device("cpu"))
    stops = stop_token_ids(model, tokenizer)
    assert torch.equal(truncate_after_eos(theirs, stops, tokenizer.pad_token_id)[0], ours.response)


def dropout_settings(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {k: v for k, v in config.items() if "dropout" in k or "pdrop" in k or k == "layerdrop"}


def tokenizer_of(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def reload_equals_policy(out: Path, policy_logits: torch.Tensor, probe: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()(probe).logits
    assert torch.allclose(reloaded, policy_logits, atol=1e-5), (reloaded - policy_logits).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_on_every_family(family, zoo, zoo_data, tmp_path, monkeypatch, hub):
    from rlhf_pipeline import models

    checkpoint = zoo[family]
    chat = family == "instruct"
    files = zoo_data["chat" if chat else "plain"]
    training = dict(FAST_TRAINING, max_steps=2)
    runs = tmp_path / "runs"

    # SFT and a reward model, full fine-tuning
    sft = _run(tmp_path, "sft", {"stage": "sft", "seed": 0, "output_dir": str(runs / "sft"),
                                 "model": {"name_or_path": str(checkpoint)},
                                 "data": {"files": str(files["sft"]), "eval_size": 4}, "training": training})
    reward = _run(tmp_path, "reward", {"stage": "reward", "seed": 0, "output_dir": str(runs / "reward"),
                                       "model": {"name_or_path": str(sft)},
                                       "data": _split(files, "prefs", "prefs-test"), "training": training})

    # what each policy held in memory when it was saved, to compare with what reloads
    probe = torch.tensor([[3, 17, 42, 99, 7, 5]])
    saved_logits: list[torch.Tensor] = []
    original_save = models.save_model

    def save_and_remember(model, *args, **kwargs):
        with torch.no_grad():
            saved_logits.append(model(probe).logits.clone())
        return original_save(model, *args, **kwargs)

    monkeypatch.setattr(models, "save_model", save_and_remember)
    scores = ScoreLog(monkeypatch)

    def ppo(name, estimator, peft=None, **settings):
        recipe = {"stage": "ppo", "seed": 0, "output_dir": str(runs / name), "policy": {"name_or_path": str(sft)},
                  "reward": {"model": str(reward)}, "data": _split(files, "prompts", "prompts-test"),
                  "generation": {"response_length": 6, "samples_per_prompt": 1 if estimator == "gae" else 2},
                  "training": ppo_settings(advantage_estimator=estimator, **settings)}
        if peft:
            recipe["peft"] = peft
        return _run(tmp_path, name, recipe)

    def ratio_is_one(out: Path) -> None:
        """One epoch of one mini-batch: each update's step sees the rollout policy itself."""
        for row in (json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()):
            assert row["policy/ratio"] == pytest.approx(1.0, abs=1e-6) and row["policy/approx_kl"] == pytest.approx(0)

    # PPO with a critic (a value head on the policy), full fine-tuning
    out = ppo("ppo", "gae")
    ratio_is_one(out)
    reload_equals_policy(out, saved_logits[-1], probe)
    assert dropout_settings(out) == dropout_settings(sft)  # off while PPO ran, the checkpoint's own when saved
    saved_config = json.loads((out / "generation_config.json").read_text())
    assert {k: saved_config.get(k) for k in ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens")} == {
        "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6}
    stops = [tokenizer_of(sft).eos_token_id, *([tokenizer_of(sft).pad_token_id] if chat else [])]
    assert saved_config["eos_token_id"] == (stops if chat else stops[0])  # the instruct model's end of text too
    assert not {"repetition_penalty", "min_new_tokens", "no_repeat_ngram_size"} & set(saved_config)
    samples_as_trained(out, family)

    # RLOO with LoRA saved as an adapter, GRPO with LoRA merged: both reload to the policy that was trained
    for name, estimator, save in (("rloo", "rloo", "adapter"), ("grpo", "grpo", "merged")):
        out = ppo(name, estimator, peft={"r": 4, "alpha": 8, "save": save})
        assert (out / "adapter_config.json").is_file() == (save == "adapter")
        ratio_is_one(out)
        reload_equals_policy(out, saved_logits[-1], probe)
        samples_as_trained(out, family)
    # every score of the three runs: 8 episodes and two evaluations of 4 prompts each
    assert check_scores_equal_reward_model(scores, reward, tmp_path) == 3 * (8 + 4 + 4)

    # DPO with LoRA saved as an adapter
    dpo = _run(tmp_path, "dpo", {"stage": "dpo", "seed": 0, "output_dir": str(runs / "dpo"),
                                 "model": {"name_or_path": str(sft)}, "data": _split(files, "prefs", "prefs-test"),
                                 "peft": {"r": 4, "alpha": 8, "save": "adapter"}, "reward": {"model": str(reward)},
                                 "generation": {"response_length": 6}, "evaluation": {"prompts": 4},
                                 "training": training})
    assert (dpo / "adapter_config.json").is_file()

    # rlhf eval: the policies against the SFT model
    evaluation = _run(tmp_path, "eval", {
        "stage": "eval", "seed": 0, "output_dir": str(runs / "eval"),
        "policies": {"ppo": {"name_or_path": str(runs / "ppo")}, "rloo": {"name_or_path": str(runs / "rloo")},
                     "dpo": {"name_or_path": str(dpo)}},
        "baseline": {"name_or_path": str(sft)}, "reward": {"model": str(reward)},
        "data": _split(files, "prompts", "prompts-test"), "preferences": _split(files, "prefs", "prefs-test"),
        "generation": {"response_length": 6}, "num_prompts": 4})
    results = json.loads((evaluation / "eval.json").read_text())["metrics"]
    assert {"ppo", "rloo", "dpo"} <= {key.split("/")[0] for key in results} or results

    # push the PPO policy to the stand-in Hub
    result = run_cli("push", runs / "ppo", "--repo-id", f"tester/{family}-ppo")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in hub.uploaded(f"tester/{family}-ppo")


def test_every_stop_token_the_model_declares_ends_a_response(zoo):
    """A response ends at the tokenizer's EOS or at any other end-of-sequence id the model's generation config
    declares (an instruct model's end of turn), as TRL's GRPO trainer has it; here nearly every token is declared, so
    every response ends early, at one of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.ppo.modules import sample_rollout, seeded, stop_token_ids
    from rlhf_pipeline.recipe.schema import GenerationSection

    tokenizer = AutoTokenizer.from_pretrained(zoo["instruct"])
    model = AutoModelForCausalLM.from_pretrained(zoo["instruct"]).eval()
    prompts = _prompts("instruct", tokenizer)
    generation = GenerationSection(response_length=12, temperature=1.0)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    declared = [tokenizer.eos_token_id, *range(20, len(tokenizer))]
    model.generation_config.eos_token_id = declared
    with seeded(1, torch.device("cpu")):
        rollout = sample_rollout(model, tokenizer, prompts, generation, torch.device("cpu"))
    assert rollout.finished.all()
    for response, mask in zip(rollout.response, rollout.response_mask):
        length = int(mask.sum())
        assert length < 12 and int(response[length - 1]) in declared
        assert all(int(t) not in declared for t in response[: length - 1])


def test_instruct_sampling_fields_do_not_change_rollouts(zoo, zoo_data, tmp_path):
    """The same seed gives the same tokens whether or not the policy's generation_config.json carries sampling
    fields (INSTRUCT_SAMPLING: repetition_penalty, min_new_tokens, top_k, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_pipeline.ppo.modules import Prompts, sample_rollout, seeded
    from rlhf_pipeline.recipe.schema import GenerationSection

    tokenizer = AutoTokenizer.from_pretrained(zoo["instruct"])
    model = AutoModelForCausalLM.from_pretrained(zoo["instruct"]).eval()
    assert model.generation_config.repetition_penalty == INSTRUCT_SAMPLING["repetition_penalty"]
    texts = ["the plot was", "review of Kelto :", "my thoughts on", "critic notes", "the ending", "a western",
             "the cast", "my review"]
    messages = [[{"role": "user", "content": t}] for t in texts]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for m in messages]
    prompts = Prompts([tokenizer.decode(i) for i in ids], ids, messages)
    generation = GenerationSection(response_length=16, temperature=1.0)

    def sample():
        with seeded(7, torch.device("cpu")):
            return sample_rollout(model, tokenizer, prompts, generation, torch.device("cpu")).response

    with_fields = sample()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(sample(), with_fields)


def _prompts(family: str, tokenizer):
    from rlhf_pipeline.ppo.modules import Prompts

    texts = ["review of Kelto , a documentary by Serosen Claor :", "my thoughts on the satire Ancornor :",
             "critic notes for Belval :"]
    if family != "instruct":
        return Prompts(texts, tokenizer(texts)["input_ids"])
    messages = [[{"role": "user", "content": t}] for t in texts]
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for m in messages]
    return Prompts([tokenizer.decode(i) for i in ids], ids, messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_those_generate_sampled_from(family, zoo):
    """PPO's log-probabilities (the policy's, the LoRA-disabled reference's, the held-out evaluation's) equal
    log softmax(logits / T) of the very logits `generate` sampled each token from: the model's own forward, after
    what it does past its LM head (Gemma-2's soft-capping, which the bare head would skip)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline import models
    from rlhf_pipeline.ppo.core import logprobs_of, masked_sum
    from rlhf_pipeline.ppo.modules import (
        PolicyAndValue,
        Rollout,
        left_pad,
        own_generation_config,
        reference_logits,
        rollout_generation_config,
        seeded,
        sequence_logprobs,
        truncate_after_eos,
        trunk_of,
    )
    from rlhf_pipeline.recipe.schema import GenerationSection, LoraSection

    tokenizer = AutoTokenizer.from_pretrained(zoo[family])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(zoo[family]).eval()
    prompts = _prompts(family, tokenizer)
    generation = GenerationSection(response_length=8, temperature=0.7)
    config = rollout_generation_config(generation, tokenizer)
    query, query_mask = left_pad(prompts.ids, tokenizer.pad_token_id)
    with seeded(3, torch.device("cpu")), own_generation_config(policy, config), torch.no_grad():
        out = policy.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                              output_logits=True, return_dict_in_generate=True)
    response, mask, finished = truncate_after_eos(out.sequences[:, query.shape[1]:], tokenizer.eos_token_id,
                                                  tokenizer.pad_token_id)
    rollout = Rollout(query, query_mask, response, mask, finished, prompts)
    sampled_from = logprobs_of(torch.stack(out.logits, 1)[:, : response.shape[1]], response, 0.7)

    with torch.no_grad():
        logits, values = PolicyAndValue(policy)(rollout.input_ids, rollout.attention_mask, rollout.response_start)
        ours = logprobs_of(logits, response, 0.7)
        assert torch.allclose(ours * mask, sampled_from * mask, atol=1e-5), (ours - sampled_from).abs().max()
        summed = sequence_logprobs(policy, rollout, 0.7)
        assert torch.allclose(summed, masked_sum(sampled_from, mask, dim=1), atol=1e-4)
        lora = get_peft_model(policy, models.lora_config(LoraSection(r=2), "CAUSAL_LM", policy))
        reference = reference_logits(None, lora, rollout.input_ids, rollout.attention_mask, rollout.response_start)
        assert torch.allclose(logprobs_of(reference, response, 0.7) * mask, sampled_from * mask, atol=1e-5)
        if family == "gemma2":  # the bare LM head on the trunk's output misses the soft-capping
            trunk = trunk_of(policy)(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask)
            bare = policy.get_output_embeddings()(trunk.last_hidden_state[:, rollout.response_start - 1: -1])
            assert (logprobs_of(bare, response, 0.7) - sampled_from).abs().max() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_gelu_only_where_the_model_runs_gpt2s_gelu(family, zoo):
    """fuse_gelu swaps GPT-2's `gelu_new` modules for PyTorch's fused tanh GELU (the same function) and touches
    nothing in the other families, whose activations differ (exact erf GELU, SiLU, gelu_pytorch_tanh)."""
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.models import fuse_gelu

    model = AutoModelForCausalLM.from_pretrained(zoo[family]).eval()
    probe = torch.tensor([[3, 17, 42, 99, 7, 5]])
    with torch.no_grad():
        before = model(probe).logits
        replaced = fuse_gelu(model)
        after = model(probe).logits
    assert replaced == (2 if family == "gpt2" else 0)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("family", PLAIN)
def test_ppo_prompts_are_tokenized_as_trl_tokenizes_them(family, zoo):
    """A plain prompt starts with the BOS its tokenizer adds (Llama, Gemma, OPT), as SFTTrainer trained on it; a
    conversation is the chat template's tokens, ending with the assistant's turn header."""
    from transformers import AutoTokenizer

    from rlhf_pipeline.stages.ppo import tokenize_prompts

    tokenizer = AutoTokenizer.from_pretrained(zoo[family])
    text = "review of Kelto , a documentary by Serosen Claor :"
    prompts = tokenize_prompts(None, [text], tokenizer, 64, "training", "data.max_prompt_length")
    assert prompts.ids == [tokenizer(text=text)["input_ids"]]
    assert (prompts.ids[0][0] == tokenizer.bos_token_id) == (family in ("llama", "opt", "gemma2"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_on_an_sft_adapter_reloads_to_the_trained_model(family, zoo, zoo_data, tmp_path, monkeypatch):
    """SFT saved as a LoRA adapter, then PPO (rloo), DPO and a reward model, each with a LoRA of its own saved as an
    adapter: each saved adapter holds both deltas and reloads (AutoModelFor...from_pretrained, base fetched by name)
    to the model that was trained, not to the base plus its own adapter alone. GPT-2's Conv1D layers and Llama's
    linear ones."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_pipeline import models
    from rlhf_pipeline.stages import common, dpo
    from rlhf_pipeline.stages import reward as reward_stage

    files, training, runs = zoo_data["plain"], dict(FAST_TRAINING, max_steps=2, learning_rate=3e-2), tmp_path / "runs"
    lora = {"r": 4, "alpha": 8, "save": "adapter"}
    sft = _run(tmp_path, "sft", {"stage": "sft", "seed": 0, "output_dir": str(runs / "sft"),
                                 "model": {"name_or_path": str(zoo[family])}, "peft": lora,
                                 "data": {"files": str(files["sft"]), "eval_size": 4}, "training": training})
    assert (sft / "adapter_config.json").is_file()

    probe = torch.tensor([[3, 17, 42, 99, 7, 5]])
    trained: list[torch.Tensor] = []

    def remember(model):
        with torch.no_grad():
            trained.append(model.eval()(probe).logits.clone())

    def save_model(model, *args, **kwargs):
        remember(model)
        return original_save_model(model, *args, **kwargs)

    def save_trained(trainer, *args, **kwargs):
        remember(trainer.model)
        return original_save_trained(trainer, *args, **kwargs)

    original_save_model, original_save_trained = models.save_model, common.save_trained
    monkeypatch.setattr(models, "save_model", save_model)
    for stage in (dpo, reward_stage):
        monkeypatch.setattr(stage, "save_trained", save_trained)

    ppo = _run(tmp_path, "rloo", {
        "stage": "ppo", "seed": 0, "output_dir": str(runs / "rloo"), "policy": {"name_or_path": str(sft)},
        "reward": {"function": "rlhf_pipeline.tiny.annotator:gold_score"}, "peft": {**lora, "r": 2},
        "data": _split(files, "prompts", "prompts-test"),
        "generation": {"response_length": 6, "samples_per_prompt": 2},
        "training": ppo_settings(advantage_estimator="rloo", learning_rate=3e-2)})
    dpo_run = _run(tmp_path, "dpo", {"stage": "dpo", "seed": 0, "output_dir": str(runs / "dpo"),
                                     "model": {"name_or_path": str(sft)}, "peft": lora, "evaluation": {"prompts": 0},
                                     "data": _split(files, "prefs", "prefs-test"), "training": training})
    reward = _run(tmp_path, "reward", {"stage": "reward", "seed": 0, "output_dir": str(runs / "reward"),
                                       "model": {"name_or_path": str(sft)}, "peft": lora,
                                       "data": _split(files, "prefs", "prefs-test"), "training": training})
    with torch.no_grad():
        sft_only = AutoModelForCausalLM.from_pretrained(sft).eval()(probe).logits
        for out, logits, auto, extra in ((ppo, trained[0], AutoModelForCausalLM, {}),
                                         (dpo_run, trained[1], AutoModelForCausalLM, {}),
                                         (reward, trained[2], AutoModelForSequenceClassification, {"num_labels": 1})):
            config = json.loads((out / "adapter_config.json").read_text())
            assert Path(config["base_model_name_or_path"]) == zoo[family]  # the root base, which the Hub can name
            reloaded = auto.from_pretrained(out, **extra).eval()(probe).logits
            assert torch.allclose(reloaded, logits, atol=1e-5), (out.name, (reloaded - logits).abs().max())
        base = AutoModelForCausalLM.from_pretrained(zoo[family]).eval()(probe).logits
        assert not torch.allclose(sft_only, base, atol=1e-3)  # the SFT delta that a lost fold would drop
        ranks = {json.loads((out / "adapter_config.json").read_text())["r"] for out in (ppo, dpo_run, reward)}
        assert ranks == {4 + 2, 4 + 4}


def test_an_adapter_that_cannot_be_folded_is_refused_before_training(zoo, zoo_data, tmp_path):
    """A DoRA start with `peft.save: adapter` is refused by --dry-run and by the run, naming the key and what to do;
    `peft.save: merged` runs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = tmp_path / "dora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(zoo["llama"]),
                   LoraConfig(r=2, use_dora=True, target_modules="all-linear")).save_pretrained(start)
    AutoTokenizer.from_pretrained(zoo["llama"]).save_pretrained(start)
    recipe = {"stage": "dpo", "seed": 0, "output_dir": str(tmp_path / "dpo"), "model": {"name_or_path": str(start)},
              "peft": {"r": 2, "save": "adapter"}, "evaluation": {"prompts": 0},
              "data": _split(zoo_data["plain"], "prefs", "prefs-test"), "training": dict(FAST_TRAINING, max_steps=1)}
    path = write_recipe(tmp_path / "dpo.yaml", recipe)
    for flags in (["--dry-run"], []):
        result = run_cli("dpo", path, *flags)
        assert result.exit_code == 2, result.output
        assert "peft.save" in result.output and "DoRA" in result.output and "peft.save: merged" in result.output
        assert not (tmp_path / "dpo").exists()
    recipe["peft"]["save"] = "merged"
    _run(tmp_path, "dpo-merged", recipe)


def test_prompt_budget_leaves_room_for_the_chat_templates_end_of_turn(zoo, tmp_path):
    """A chat model with a short context as policy and reward model: every prompt PPO keeps leaves room, in the
    reward model's sequence (the chat template over prompt and response), for a whole response and the template's
    end of turn (`<|im_end|>` and a newline), so that no full-length response can overflow the reward model; and
    no prompt that fits is left out. The budget without the end of turn kept prompts one token too long."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.ppo.modules import ModelScorer
    from rlhf_pipeline.recipe.load import load_recipe
    from rlhf_pipeline.scoring import RewardModel
    from rlhf_pipeline.stages.ppo import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(zoo["instruct"])
    words = "the plot was clever and the cast was superb yet the ending felt rushed".split()
    rows = [{"prompt": [{"role": "user", "content": " ".join(words[:n])}]} for n in range(1, len(words) + 1)]
    lengths = [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for r in rows]
    response_length, end_of_turn = 12, 2
    context = lengths[len(rows) // 2] + response_length + end_of_turn  # the middle prompt fits exactly
    short = tmp_path / "short"
    config = AutoConfig.from_pretrained(zoo["instruct"], max_position_embeddings=context)
    AutoModelForCausalLM.from_pretrained(zoo["instruct"], config=config).save_pretrained(short)
    tokenizer.save_pretrained(short)
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    recipe = {"stage": "ppo", "output_dir": str(tmp_path / "out"), "policy": {"name_or_path": str(short)},
              "reward": {"model": str(short)}, "data": {"files": {"train": str(data), "test": str(data)},
                                                        "eval_split": "test"},
              "generation": {"response_length": response_length}}
    loaded = load_recipe(write_recipe(tmp_path / "ppo.yaml", recipe), expected_stage="ppo")
    reward = RewardModel(AutoModelForSequenceClassification.from_pretrained(short, num_labels=1).eval(), tokenizer)
    prompts, _ = load_prompts(loaded, tokenizer, context, scorers=(ModelScorer(reward),))
    assert sorted(len(ids) for ids in prompts.ids) == sorted(n for n in lengths if n <= lengths[len(rows) // 2])
    longest_response = " the" * response_length  # the most text a response can be, its EOS dropped
    assert len(tokenizer(longest_response, add_special_tokens=False)["input_ids"]) == response_length
    reward.score(prompts.messages, [[{"role": "assistant", "content": longest_response}]] * len(prompts))
