"""The one scoring rule: a (prompt, response) is scored on the token sequence TRL's RewardTrainer builds from it,
through the reward model's own forward pass — under GPT-2's convention (pad = EOS) and with a distinct pad token,
for responses that finished with EOS and responses cut off at the length limit."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.ppo.modules import ModelScorer, Prompts, Rollout, left_pad
from rlhf_pipeline.scoring import RewardModel, reward_input_ids

PROMPTS = ["review of Kalo Mar , a drama by Fin Tor :", "my thoughts on the western Vilu :"]
RESPONSES = [" the acting was superb .", " the plot felt dull but the score was lovely ."]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["pad=eos", "pad<>eos"])
def reward_dir(request, tmp_path_factory, tiny_world):
    """A small GPT-2 reward model (random score head, seeded) with GPT-2's tokenizer convention or a distinct pad."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_pipeline.models import init_gpt2, train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture

    pad = None if request.param == "pad=eos" else "<pad>"
    tokenizer = train_bpe_tokenizer([[r["text"] for r in tiny_world["corpus"]]], BpeTraining(vocab_size=400,
                                                                                               pad_token=pad))
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (pad is None)
    root = tmp_path_factory.mktemp(f"reward-{request.param}")
    torch.manual_seed(0)
    init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=64), tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(root, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root)
    return root


def load(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    return model, tokenizer


def reward_trainer_ids(tmp_path, model, tokenizer, rows: list[dict]) -> list[list[int]]:
    """The `chosen_ids` a real RewardTrainer builds from `rows` (prompt, chosen, rejected)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(tmp_path / "rt"), report_to="none", bf16=False, max_length=None,
                        dataloader_pin_memory=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset["chosen_ids"]


def own_forward(model, ids: list[int]) -> float:
    """The reward model's logit for one unpadded sequence: no batching, no padding, its own pooling."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def rollout_of(tokenizer, prompts: list[str], responses: list[str], finished: list[bool]) -> Rollout:
    """A rollout as PPO holds it: left-padded prompt ids; response ids ending with EOS when finished (cut off at the
    length limit, without EOS, otherwise), padded after; texts decoded without special tokens."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    query, query_mask = left_pad(ids, tokenizer.pad_token_id)
    bodies = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if f else [])
              for r, f in zip(responses, finished)]
    width = max(len(b) for b in bodies) + 2
    response = torch.full((len(bodies), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(bodies), width))
    for row, body in enumerate(bodies):
        response[row, : len(body)] = torch.tensor(body)
        mask[row, : len(body)] = 1
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout(query, query_mask, response, mask, torch.tensor(finished), Prompts(prompts, ids), texts)


def test_reward_input_ids_are_what_reward_trainer_builds(tmp_path, reward_dir):
    model, tokenizer = load(reward_dir)
    rows = [{"prompt": p, "chosen": r, "rejected": " meh ."} for p, r in zip(PROMPTS, RESPONSES)]
    rows.append({"prompt": PROMPTS[0], "chosen": RESPONSES[0] + tokenizer.eos_token, "rejected": " no ."})
    built = reward_trainer_ids(tmp_path, model, tokenizer, rows)
    assert [reward_input_ids(tokenizer, r["prompt"], r["chosen"]) for r in rows] == built
    assert built[-1] == built[0]  # an EOS already there is not doubled
    assert built[0][-1] == tokenizer.eos_token_id


def test_reward_input_ids_conversational(tmp_path, reward_dir):
    model, tokenizer = load(reward_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": r}],
             "rejected": [{"role": "assistant", "content": "meh"}]} for p, r in zip(PROMPTS, RESPONSES)]
    built = reward_trainer_ids(tmp_path, model, tokenizer, rows)
    assert [reward_input_ids(tokenizer, r["prompt"], r["chosen"]) for r in rows] == built


def test_reward_input_ids_conversational_chatml(tmp_path, reward_dir):
    """The built-in ChatML template: the reward path scores the sequence RewardTrainer trains on, markers as one id
    each."""
    from rlhf_pipeline.models import CHATML, add_chatml_tokens, align_special_tokens

    model, tokenizer = load(reward_dir)
    tokenizer.chat_template = CHATML
    add_chatml_tokens(tokenizer)
    align_special_tokens(model, tokenizer)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": r}],
             "rejected": [{"role": "assistant", "content": "meh"}]} for p, r in zip(PROMPTS, RESPONSES)]
    built = reward_trainer_ids(tmp_path, model, tokenizer, rows)
    ours = [reward_input_ids(tokenizer, r["prompt"], r["chosen"]) for r in rows]
    assert ours == built
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ours[0].count(start) == 2 and ours[0].count(end) == 2 and end == tokenizer.eos_token_id
    assert tokenizer.decode(ours[0]) == f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n" \
                                        f"{RESPONSES[0]}<|im_end|>\n"


def test_ppo_scores_are_the_reward_models_own_forward(tmp_path, reward_dir):
    """Finished and unfinished responses, batched and padded as PPO holds them, score what the reward model's own
    forward gives on the sequence RewardTrainer builds from the same texts (to 1e-5)."""
    model, tokenizer = load(reward_dir)
    prompts = PROMPTS * 2
    responses = RESPONSES * 2
    finished = [True, True, False, False]
    rollout = rollout_of(tokenizer, prompts, responses, finished)
    assert rollout.responses == responses  # special tokens dropped, text intact

    rows = [{"prompt": p, "chosen": r, "rejected": " meh ."} for p, r in zip(prompts, responses)]
    expected = [own_forward(model, ids) for ids in reward_trainer_ids(tmp_path, model, tokenizer, rows)]
    scores = ModelScorer(RewardModel(model, tokenizer, batch_size=3))(rollout)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    # GPT-2's classifier pools at the last token that is not the pad id: under pad = EOS that is the token before
    # the EOS RewardTrainer appends; with a distinct pad it is the EOS itself
    ids = reward_input_ids(tokenizer, prompts[0], responses[0])
    pooled_at = len(ids) - (2 if tokenizer.pad_token_id == tokenizer.eos_token_id else 1)
    with torch.no_grad():
        hidden = model.transformer(input_ids=torch.tensor([ids])).last_hidden_state
        assert float(model.score(hidden[0, pooled_at])) == pytest.approx(expected[0], abs=1e-5)


def test_ppo_scores_conversational_prompts_through_the_chat_template(tmp_path, reward_dir):
    model, tokenizer = load(reward_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    rollout = rollout_of(tokenizer, texts, RESPONSES, [True, False])
    rollout.prompts.messages = messages
    rows = [{"prompt": m, "chosen": [{"role": "assistant", "content": r}],
             "rejected": [{"role": "assistant", "content": "meh"}]} for m, r in zip(messages, RESPONSES)]
    expected = [own_forward(model, ids) for ids in reward_trainer_ids(tmp_path, model, tokenizer, rows)]
    assert ModelScorer(RewardModel(model, tokenizer))(rollout).tolist() == pytest.approx(expected, abs=1e-5)


def test_a_pair_longer_than_the_reward_models_context_is_a_clear_error(reward_dir):
    from rlhf_pipeline.errors import UserError

    model, tokenizer = load(reward_dir)
    with pytest.raises(UserError, match="longer than its context \\(64 tokens\\)"):
        RewardModel(model, tokenizer).score(["word " * 80], [" ."])


def test_eval_reward_accuracy_reads_the_same_sequences(reward_dir):
    """`rlhf eval` scores preference pairs with the same rule (its accuracy equals scoring each pair by hand)."""
    from datasets import Dataset

    from rlhf_pipeline.scoring import preference_metrics
    from rlhf_pipeline.stages.evaluation import evaluate_reward_model

    model, tokenizer = load(reward_dir)
    rows = [{"prompt": p, "chosen": r, "rejected": " the plot felt dull ."} for p, r in zip(PROMPTS, RESPONSES)]
    metrics, scores = evaluate_reward_model(RewardModel(model, tokenizer), Dataset.from_list(rows))
    chosen = [own_forward(model, reward_input_ids(tokenizer, r["prompt"], r["chosen"])) for r in rows]
    rejected = [own_forward(model, reward_input_ids(tokenizer, r["prompt"], r["rejected"])) for r in rows]
    assert scores["chosen"] == pytest.approx(chosen, abs=1e-5)
    assert scores["rejected"] == pytest.approx(rejected, abs=1e-5)
    expected = preference_metrics(torch.tensor(chosen), torch.tensor(rejected))
    assert metrics["reward_accuracy"] == expected["accuracy"]
