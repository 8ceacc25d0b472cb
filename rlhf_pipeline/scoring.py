"""Score token sequences with a reward model, and the pairwise metrics of preference data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def score_sequences(model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_token_id: int,
                    batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """The reward model's scalar score of each token sequence (right-padded batches, sorted by length)."""
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

