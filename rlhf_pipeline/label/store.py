"""A labelling run on disk, and who labels what next. No torch, no Gradio.

Files in the run dir (beside the run marker and recipe.resolved.yaml that every run has):
- samples.jsonl: one row per prompt, its responses as the page shows them and the model behind each (never sent to
  the page), appended and fsync'd by the sampler as each prompt is ready. A restart reads them back: nothing is
  sampled twice.
- labels.jsonl: every label as given (prompt, labeler, decision, ranking, time), appended and fsync'd before the page
  moves on. The source of truth: a killed server loses nothing, and a restart never shows a labelled prompt again.
- preferences.jsonl: the preference dataset, in TRL's format (prompt / chosen / rejected, conversational when the
  prompts are), one row per pair a label orders, with the rank information kept (chosen_rank, rejected_rank).
  Appended with each label, and rebuilt from labels.jsonl when the run is opened (a kill between the two appends
  loses nothing).
- summary.json: counts, agreement between labelers and (A/B mode) the human win rate, written when the server stops.

A JSON-lines file is only ever appended to; a last line torn by a kill (no newline) is cut off when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.label import stats

SAMPLES_FILE = "samples.jsonl"
LABELS_FILE = "labels.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
SUMMARY_FILE = "summary.json"
RESERVATION_SECONDS = 15 * 60  # a prompt shown to a labeler is kept for them this long (a closed tab frees it)


class JsonlLog:
    """An append-only JSON-lines file: `append` returns once the row is written, flushed and fsync'd."""

    def __init__(self, path: Path):
        self.path = path
        created = not path.exists()
        self.rows = self._repair_and_read()
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run's life)
        if created:
            runs.fsync_dir(path.parent)

    def _repair_and_read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):  # the last line was torn by a kill mid-write: it was never acknowledged
            with open(self.path, "r+b") as handle:
                handle.truncate(whole)
                handle.flush()
                os.fsync(handle.fileno())
        rows = []
        for number, line in enumerate(data[:whole].decode("utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise UserError(f"{self.path}:{number}: not a JSON object; this file is written by `rlhf label` "
                                "and read back when it restarts: restore it, or label into another output_dir")
            rows.append(row)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        try:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as exc:
            raise runs.disk_full(exc, self.path) or exc from None
        self.rows.append(row)

    def close(self) -> None:
        self._handle.close()


@dataclass
class Item:
    """One prompt to label and its responses, as shown (`models`: the model behind each response, never shown)."""

    item: str
    index: int  # the prompt's position in the labelled split
    prompt: Any  # text, or a conversation (a list of messages)
    responses: list[str]
    models: list[str]
    seed: int
    candidate: str | None = None  # A/B mode: the policy compared with the baseline on this prompt

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Item:
        return cls(**{key: row[key] for key in cls.__dataclass_fields__ if key in row})

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def item_id(index: int) -> str:
    return f"{index:06d}"


def item_seed(seed: int, index: int, model: str | None = None) -> int:
    """The seed of one prompt (of one model's sampling of it): fixed by the recipe's seed, the prompt's position
    (and the model's name) alone, so that a prompt gets the same responses whenever it is sampled."""
    key = f"rlhf-label/{seed}/{index}" + (f"/{model}" if model is not None else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def needs_second_labeler(seed: int, index: int, overlap: float) -> bool:
    """Whether a prompt is among the `overlap` share shown to two labelers (a fixed draw per prompt)."""
    draw = int.from_bytes(hashlib.sha256(f"rlhf-label-overlap/{seed}/{index}".encode()).digest()[:8], "little")
    return draw / 2**64 < overlap


def prompt_text(prompt: Any) -> str:
    """A prompt as the page shows it: the text, or each message of a conversation as `role: content`."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def preference_rows(item: Item, label: dict[str, Any]) -> list[dict[str, Any]]:
    """The preference pairs a label gives, in TRL's format: prompt / chosen / rejected (for conversational prompts
    the responses are assistant messages), with the prompt, labeler, both ranks and the models kept. A pair of two
    identical texts teaches nothing and is left out."""
    if label["decision"] != "ranking":
        return []
    k = len(item.responses)
    rows = []
    for better, worse, better_rank, worse_rank in stats.pairs_from_ranking(label["ranking"], k):
        chosen, rejected = item.responses[better], item.responses[worse]
        if chosen == rejected:
            continue
        if item.conversational:
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        rows.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "item": item.item,
                     "labeler": label["labeler"], "chosen_rank": better_rank, "rejected_rank": worse_rank,
                     "num_responses": k, "chosen_model": item.models[better], "rejected_model": item.models[worse]})
    return rows


class LabelStore:
    """The labelling run: stored samples and labels, the preference dataset, and which prompt a labeler gets next.
    Thread-safe: the page's handlers and the sampler share it."""

    def __init__(self, directory: Path, mode: str, planned: list[int], seed: int, overlap: float = 0.0,
                 ahead: int = 16):
        self.directory = Path(directory)
        self.mode = mode
        self.order = [item_id(i) for i in planned]
        self.required = {item_id(i): 2 if needs_second_labeler(seed, i, overlap) else 1 for i in planned}
        self.ahead = ahead
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._samples = JsonlLog(self.directory / SAMPLES_FILE)
        self.items: dict[str, Item] = {row["item"]: Item.from_row(row) for row in self._samples.rows}
        self._labels = JsonlLog(self.directory / LABELS_FILE)
        self.by_item: dict[str, list[dict[str, Any]]] = {}
        for label in self._labels.rows:
            self.by_item.setdefault(label["item"], []).append(label)
        self.reserved: dict[str, dict[str, float]] = {}  # prompt -> labeler -> when it was shown to them
        self.failure: str | None = None
        self.sampling = True  # the sampler is (or will be) running
        self.stopping = False
        self.closed = False
        rows = [row for label in self._labels.rows if label["item"] in self.items
                for row in preference_rows(self.items[label["item"]], label)]
        runs.atomic_write_text(self.directory / PREFERENCES_FILE,
                               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._preferences = JsonlLog(self.directory / PREFERENCES_FILE)

    # -----------------------------------------------------------------------------------------------------------
    # the sampler's side
    # -----------------------------------------------------------------------------------------------------------
    def has(self, item: str) -> bool:
        with self._lock:
            return item in self.items

    def wait_until_needed(self) -> bool:
        """Block the sampler while `ahead` sampled prompts wait for their first labeler (none has labelled them or
        holds them); False when the store is stopping."""
        with self._changed:
            while not self.stopping and self._untouched() >= self.ahead:
                self._changed.wait(timeout=1.0)
            return not self.stopping

    def _untouched(self) -> int:
        return sum(1 for item in self.items if item not in self.by_item and item not in self.reserved)

    def add_item(self, item: Item) -> None:
        with self._changed:
            if item.item in self.items or self.closed:  # closed: sampled as the server stopped; sampled again later
                return
            self._samples.append({"item": item.item, **{k: v for k, v in asdict(item).items() if k != "item"}})
            self.items[item.item] = item
            self._changed.notify_all()

    def fail(self, message: str) -> None:
        with self._changed:
            self.failure = message
            self._changed.notify_all()

    def sampling_finished(self) -> None:
        with self._changed:
            self.sampling = False
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self.stopping = True
            self._changed.notify_all()

    # -----------------------------------------------------------------------------------------------------------
    # the labelers' side
    # -----------------------------------------------------------------------------------------------------------
    def next_item(self, labeler: str) -> tuple[Item | None, str]:
        """The prompt `labeler` labels next, and the state: `ready` (an item), `waiting` (its responses are being
        sampled), `failed` (sampling failed: nothing more will come) or `done` (nothing left for this labeler). The
        prompt they were shown and have not labelled comes back first (a reloaded page); then, in order, the first
        one they have not labelled that still lacks labels and is not being labelled by someone else."""
        now = time.monotonic()
        with self._lock:
            for item, holders in list(self.reserved.items()):
                for name, since in list(holders.items()):
                    if now - since > RESERVATION_SECONDS:
                        del holders[name]
                if not holders:
                    del self.reserved[item]
            for item, holders in self.reserved.items():
                if labeler in holders:
                    return self.items[item], "ready"
            missing = False
            for item in self.order:
                labels = self.by_item.get(item, [])
                if any(label["labeler"] == labeler for label in labels):
                    continue
                if len(labels) + len(self.reserved.get(item, {})) >= self.required[item]:
                    continue
                if item not in self.items:
                    missing = True
                    continue
                self.reserved.setdefault(item, {})[labeler] = now
                return self.items[item], "ready"
            if missing and self.failure is not None:
                return None, "failed"
            return None, "waiting" if missing else "done"

    def record(self, labeler: str, item: str, decision: str, ranking: list[int] | None = None) -> bool:
        """Append one label (fsync'd) and its preference pairs; False when this labeler already labelled this prompt
        (a second submit: nothing is written). Bad input raises ValueError."""
        if decision not in stats.DECISIONS:
            raise ValueError(f"unknown decision {decision!r}: one of {', '.join(stats.DECISIONS)}")
        with self._changed:
            if self.closed:
                raise ValueError("the labelling run is closed (the server is stopping)")
            if item not in self.items:
                raise ValueError(f"no prompt {item!r} in this run")
            sample = self.items[item]
            if decision == "ranking":
                ranking = stats.check_ranking(ranking, len(sample.responses))
            elif ranking:
                raise ValueError(f"a {decision!r} label has no ranking")
            labels = self.by_item.setdefault(item, [])
            if any(label["labeler"] == labeler for label in labels):
                return False
            shown = self.reserved.get(item, {}).pop(labeler, None)
            if not self.reserved.get(item, True):
                del self.reserved[item]
            label: dict[str, Any] = {"item": item, "labeler": labeler, "decision": decision}
            if decision == "ranking":
                label["ranking"] = ranking
            label["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if shown is not None:
                label["seconds"] = round(time.monotonic() - shown, 1)
            self._labels.append(label)  # from here on the label is safe
            labels.append(label)
            for row in preference_rows(sample, label):
                self._preferences.append(row)
            self._changed.notify_all()
            return True

    def progress(self, labeler: str | None = None) -> dict[str, int]:
        """Prompts with all their labels, prompts in all, and how many this labeler labelled."""
        with self._lock:
            complete = sum(1 for item in self.order if len(self.by_item.get(item, [])) >= self.required[item])
            mine = sum(1 for labels in self.by_item.values() for label in labels if label["labeler"] == labeler)
            return {"complete": complete, "total": len(self.order), "mine": mine}

    def labels(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._labels.rows)

    def close(self) -> None:
        self.stop()
        with self._lock:
            self.closed = True
            for log in (self._samples, self._labels, self._preferences):
                log.close()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return summarise(self.mode, self.items, self._labels.rows, self.order, self.required,
                             len(self._preferences.rows))


def summarise(mode: str, items: dict[str, Item], labels: list[dict[str, Any]], order: list[str] | None = None,
              required: dict[str, int] | None = None, pairs: int | None = None) -> dict[str, Any]:
    """What a labelling run holds: counts, agreement between labelers where a prompt has several labels, and in A/B
    mode the human win rate of each candidate over the baseline (`stats.win_rates`)."""
    by_item: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        by_item.setdefault(label["item"], []).append(label)
    order = order if order is not None else sorted(items)
    required = required or {item: 1 for item in order}
    summary: dict[str, Any] = {
        "mode": mode,
        "prompts": len(order),
        "prompts_sampled": sum(1 for item in order if item in items),
        "prompts_labelled": sum(1 for item in order if by_item.get(item)),
        "prompts_complete": sum(1 for item in order if len(by_item.get(item, [])) >= required.get(item, 1)),
        "prompts_for_two_labelers": sum(1 for item in order if required.get(item, 1) > 1),
        "labels": len(labels),
        "decisions": dict(Counter(label["decision"] for label in labels)),
        "labelers": dict(Counter(label["labeler"] for label in labels)),
        "pairs": pairs if pairs is not None else sum(
            len(preference_rows(items[label["item"]], label)) for label in labels if label["item"] in items),
    }
    units: dict[Any, dict[str, str]] = {}
    for item, its_labels in by_item.items():
        if item not in items:
            continue
        k = len(items[item].responses)
        for label in its_labels:
            if mode == "ab":  # the A/B judgement itself: which side won, tie, both bad
                value = (f"side {label['ranking'][0]}" if label["decision"] == "ranking" else label["decision"])
                if label["decision"] != "skip":
                    units.setdefault(item, {})[label["labeler"]] = value
            else:  # each pair of responses: which one the labeler preferred, or neither
                for pair, value in stats.pair_judgements(label, k).items():
                    units.setdefault((item, *pair), {})[label["labeler"]] = value
    summary["agreement"] = stats.agreement(units)
    if mode == "ab":
        judged = []
        for item, its_labels in by_item.items():
            if item not in items or items[item].candidate is None:
                continue
            sample = items[item]
            scores = [s for s in (stats.candidate_score(label, sample.models, sample.candidate)
                                  for label in its_labels) if s is not None]
            counts = {"wins": sum(s == 1.0 for s in scores), "losses": sum(s == 0.0 for s in scores),
                      "ties": sum(label["decision"] == "tie" for label in its_labels),
                      "both_bad": sum(label["decision"] == "bad" for label in its_labels)}
            judged.append((sample.candidate, scores, counts))
        summary["win_rates"] = stats.win_rates(judged)
    return summary


def read_run(directory: Path) -> tuple[dict[str, Item], list[dict[str, Any]]]:
    """The stored samples and labels of a labelling run (read only; a torn last line is ignored)."""
    items = {row["item"]: Item.from_row(row) for row in runs.read_jsonl(Path(directory) / SAMPLES_FILE)
             if "item" in row}
    return items, runs.read_jsonl(Path(directory) / LABELS_FILE)
