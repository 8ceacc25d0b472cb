"""The tiny default's data: generated deterministically, committed byte for byte, and shaped as documented."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path

import pytest
from conftest import REPO

from rlhf_pipeline.tiny.annotator import NEGATIVE, POSITIVE, score_text
from rlhf_pipeline.tiny.world import generate, write

COMMITTED = REPO / "recipes" / "tiny" / "data"
SMALL = dict(n_corpus=50, n_sft=20, n_pairs=20, n_pairs_test=5, n_prompts=10, n_prompts_test=5)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> list[Path]:
    return write(tmp_path_factory.mktemp("world"), seed=0)


@pytest.fixture(scope="module")
def committed() -> dict[str, list[dict]]:
    def read(path: Path) -> list[dict]:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    return {path.name.removesuffix(".jsonl.gz"): read(path) for path in sorted(COMMITTED.glob("*.jsonl.gz"))}


def test_generator_is_deterministic():
    assert generate(seed=3, **SMALL) == generate(seed=3, **SMALL)
    assert generate(seed=3, **SMALL) != generate(seed=4, **SMALL)


def test_regenerated_files_match_the_committed_ones_byte_for_byte(regenerated):
    assert sorted(p.name for p in regenerated) == sorted(p.name for p in COMMITTED.iterdir())
    for path in regenerated:
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), (
            f"{path.name} differs from recipes/tiny/data: rerun `python -m rlhf_pipeline.tiny.world` and commit")


def test_sizes_and_columns(committed):
    expected = {
        "corpus": (25000, {"text"}),
        "sft": (4000, {"prompt", "completion"}),
        "preferences-train": (6000, {"prompt", "chosen", "rejected"}),
        "preferences-test": (500, {"prompt", "chosen", "rejected"}),
        "prompts-train": (2000, {"prompt"}),
        "prompts-test": (256, {"prompt"}),
    }
    assert set(committed) == set(expected)
    for name, (size, columns) in expected.items():
        assert len(committed[name]) == size, name
        assert all(set(row) == columns for row in committed[name]), name


def test_corpus_holds_text_of_varied_quality(committed):
    """A fifth of the pre-training text is reviews of varied quality (cut off, repetitive, rambling), as web text is:
    the reward model's base has seen what it must learn to judge."""
    texts = [row["text"] for row in committed["corpus"]]
    cut = sum(not t.endswith(" .") for t in texts)
    repetitive = sum(any(a == b for a, b in zip(t.split(), t.split()[1:])) for t in texts)
    assert 0.02 < cut / len(texts) < 0.1 and 0.005 < repetitive / len(texts) < 0.1  # the older corpus: 0 and 0


def test_corpus_vocabulary_is_in_the_hundreds(committed):
    vocabulary = {word for row in committed["corpus"] for word in row["text"].split()}
    assert 300 <= len(vocabulary) < 1000, len(vocabulary)


def test_sft_demonstrations(committed):
    completions = [row["completion"] for row in committed["sft"]]
    assert all(c.startswith(" ") and c.endswith(" .") for c in completions)
    gold = [score_text(c) for c in completions]
    assert statistics.mean(gold) == pytest.approx(0.5, abs=0.05)  # mixed sentiment
    assert min(gold) == 0.0 and max(gold) == 1.0


def test_prompts_carry_no_sentiment(committed):
    sentiment = set(POSITIVE) | set(NEGATIVE)
    for name in ("sft", "preferences-train", "prompts-train", "prompts-test"):
        for row in committed[name]:
            assert not set(row["prompt"].split()) & sentiment, row["prompt"]
            assert row["prompt"].endswith(" :"), row["prompt"]


@pytest.mark.parametrize("split", ["preferences-train", "preferences-test"])
def test_preference_labels_agree_with_the_annotator(committed, split):
    pairs = committed[split]
    margins = [score_text(p["chosen"]) - score_text(p["rejected"]) for p in pairs]
    assert all(abs(m) >= 0.1 - 1e-9 for m in margins)  # only clearly different answers are compared
    agreement = sum(m > 0 for m in margins) / len(margins)
    assert agreement == pytest.approx(0.95, abs=0.02)  # 5% label noise
    assert all(p["chosen"].startswith(" ") and p["rejected"].startswith(" ") for p in pairs)


def test_train_and_test_prompts_differ(committed):
    train = {row["prompt"] for row in committed["prompts-train"]}
    test = [row["prompt"] for row in committed["prompts-test"]]
    assert sum(p in train for p in test) < len(test) // 2
