"""Score (prompt, response) pairs with a reward model exactly where it learned, and the pairwise metrics.

The one rule every score follows (the reward stage's accuracy, PPO's reward and gold, `rlhf eval`): a pair is scored
on the token sequence that TRL's `RewardTrainer` builds from it — `prompt + response` with EOS appended (plain
text), or the chat template over the messages (conversational) — through the reward model's own forward pass and
pooling. GPT-2's sequence classifier pools at the last token that is not the pad id, so with GPT-2's pad = EOS it
reads the token *before* the appended EOS, and with a distinct pad it reads the EOS: either way the position it was
trained on. Reading the hidden state at a position of our choosing (e.g. the EOS of a finished response) would score
where the model never learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def reward_input_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any, response: Any) -> list[int]:
    """The token ids `RewardTrainer` trains on for (prompt, response): the same steps in the same order (explicit
    prompt joined to the response; EOS appended to plain text that lacks it; the tokenizer called on text, or the
    chat template applied to messages). `tests/test_scoring.py` holds it to a real RewardTrainer's output."""
    if isinstance(response, list):  # conversational: a list of messages
        messages = list(prompt or []) + response
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = (prompt or "") + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


def sequence_overhead(tokenizer: PreTrainedTokenizerBase, conversational: bool) -> int:
    """How many tokens the sequence `reward_input_ids` builds adds to the prompt's tokens (as the policy's prompts
    are tokenized: `stages.ppo.tokenize_prompts`) and the response's own: the EOS appended to plain text, or what a
    chat template writes after the assistant's message (ChatML: `<|im_end|>` and a newline). Measured on a probe."""
    if conversational:
        prompt: Any = [{"role": "user", "content": "Hi"}]
        response: Any = [{"role": "assistant", "content": "Hello there"}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        response_ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    else:
        prompt, response = "Hi", " hello there"
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return max(len(reward_input_ids(tokenizer, prompt, response)) - len(prompt_ids) - len(response_ids), 0)


def score_sequences(model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_token_id: int,
                    batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """The reward model's own output for each token sequence (right-padded as RewardTrainer's collator pads,
    batched by length); float32 on the CPU."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.empty(len(sequences), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            batch = order[start : start + batch_size]
            longest = max(len(sequences[i]) for i in batch)
            input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = sequences[index]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores[batch] = logits[:, 0].float().cpu()
    model.train(was_training)
    return scores


class RewardModel:
    """A one-output sequence classifier and its own tokenizer, scoring (prompt, response) pairs by the rule above."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64):
        from rlhf_pipeline.stages.common import context_length

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.context = context_length(model, cap=None)
        # the classifier finds the last real token by the pad id: it must be the tokenizer's
        model.config.pad_token_id = tokenizer.pad_token_id

    def input_ids(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[list[int]]:
        return [reward_input_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]

    def score(self, prompts: Sequence[Any], responses: Sequence[Any], desc: str | None = None) -> torch.Tensor:
        from rlhf_pipeline.errors import UserError

        sequences = self.input_ids(prompts, responses)
        longest = max(len(s) for s in sequences)
        if longest > self.context:
            raise UserError(f"a (prompt, response) pair is {longest} tokens for the reward model, longer than its "
                            f"context ({self.context} tokens): shorten data.max_prompt_length or "
                            "generation.response_length")
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size, desc)


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (a tie counts as wrong), mean margin and score statistics."""
    import torch

    chosen, rejected = chosen.double(), rejected.double()
    margin = chosen - rejected
    return {
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "ties": int((margin == 0).sum()),
        "num_pairs": int(margin.numel()),
        "chosen_score_mean": float(chosen.mean()),
        "rejected_score_mean": float(rejected.mean()),
        "score_std": float(torch.cat([chosen, rejected]).std()),
    }
