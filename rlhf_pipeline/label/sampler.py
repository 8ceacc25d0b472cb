"""The background thread that samples responses ahead of the labelers.

Each prompt is sampled on its own, each model under a seed of its own (`store.item_seed`: the recipe's seed, the
prompt's position and the model's name), with that model's sampling settings alone (`sample_rollout`, as PPO and
`rlhf eval` sample): a prompt sampled again (its row was never written: the server was killed while sampling it)
gets the very same responses. The models do not share their sampling noise (as `rlhf eval` makes them, to compare
scores with less variance): two close models would often write the very same text, and a person would be shown a
forced tie. The order the responses are shown in (in A/B mode, the sides) is drawn from the prompt's seed, and
stored.
"""

from __future__ import annotations

import random
import sys
import threading
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.label.store import Item, LabelStore, item_id, item_seed


@dataclass
class Model:
    """A loaded model to sample from, with its sampling settings (a GenerationSection)."""

    name: str
    model: Any
    generation: Any


def sample_item(index: int, position: int, prompts, models: dict[str, Model], tokenizer, mode: str, k: int,
                seed: int, device, candidates: list[str] | None = None) -> Item:
    """The responses to prompt `index` of `prompts`, in the order they are shown. Rank mode: k responses, drawn from
    the models in turn (response j from model j mod n), shown in a random order. A/B mode: one response from the
    prompt's candidate (the candidates in turn, by `position`) and one from `baseline`, on random sides."""
    from rlhf_pipeline.ppo.modules import sample_rollout, seeded

    own_seed = item_seed(seed, index)
    prompt = prompts.messages[index] if prompts.messages is not None else prompts.texts[index]
    if mode == "ab":
        candidate = (candidates or [n for n in models if n != "baseline"])[position % len(candidates or models)]
        sources = [candidate, "baseline"]
    else:
        candidate = None
        names = list(models)
        sources = [names[j % len(names)] for j in range(k)]
    responses: dict[str, list[str]] = {}
    for name in dict.fromkeys(sources):
        count = sources.count(name)
        with seeded(item_seed(seed, index, name), device):
            rollout = sample_rollout(models[name].model, tokenizer, prompts.select([index] * count),
                                     models[name].generation, device)
        responses[name] = list(rollout.responses)
    texts, shown_models = [], []
    for name in sources:
        texts.append(responses[name].pop(0))
        shown_models.append(name)
    order = list(range(len(texts)))
    random.Random(own_seed).shuffle(order)
    return Item(item=item_id(index), index=index, prompt=prompt, responses=[texts[i] for i in order],
                models=[shown_models[i] for i in order], seed=own_seed, candidate=candidate)


class Sampler(threading.Thread):
    """Samples every planned prompt that has no stored responses, in order, staying `store.ahead` prompts ahead of the
    labelers; a failure is reported on the page and on stderr, and the labelling of what was sampled goes on."""

    def __init__(self, store: LabelStore, planned: list[int], sample):
        super().__init__(name="rlhf-label-sampler", daemon=True)
        self.store = store
        self.planned = planned
        self.sample = sample  # (index, position) -> Item

    def run(self) -> None:
        try:
            for position, index in enumerate(self.planned):
                if self.store.has(item_id(index)):
                    continue
                if not self.store.wait_until_needed():
                    return
                self.store.add_item(self.sample(index, position))
        except Exception as exc:  # noqa: BLE001 - shown to the user; the labels already given stay valid
            message = f"{type(exc).__name__}: {exc}"
            print(f"[rlhf label] sampling failed: {message}", file=sys.stderr, flush=True)
            self.store.fail(message)
        finally:
            self.store.sampling_finished()
