"""Data a TRL user expects: mixtures in TRL's `datasets:` shape, .txt corpora, sliced splits (local as on the Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, stage_recipe, write_jsonl, write_recipe

from rlhf_pipeline import data as data_io
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.recipe.load import load_recipe


def loaded_with(tmp_path: Path, stage: str, data: dict, **extra):
    recipe = write_recipe(tmp_path / f"{stage}.yaml", stage_recipe(stage, tmp_path / "out", "some/model", data,
                                                                   **extra))
    return load_recipe(recipe)


@pytest.fixture
def two_sources(tmp_path) -> tuple[Path, Path]:
    """The same kind of data under different column names: 40 (question, answer) rows and 10 (prompt, completion)
    rows, with an extra column each."""
    first = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i} ", "answer": f"a{i}", "id": i} for i in range(40)])
    second = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i} ", "completion": f"c{i}", "source": "x"}
                                                 for i in range(10)])
    return first, second


def test_sft_mixture_maps_each_entry_onto_the_roles_and_keeps_the_fractions(tmp_path, two_sources):
    first, second = two_sources
    loaded = loaded_with(tmp_path, "sft", {"datasets": [
        {"data_files": str(first), "columns": {"prompt": "question", "completion": "answer"}, "fraction": 0.75},
        {"path": "json", "data_files": {"train": str(second)}, "fraction": 0.25},
    ]})
    train, held_out = data_io.load_splits(loaded)
    # TRL's rule: the largest mixture that takes no row twice: 40 / 0.75 = 53.3 and 10 / 0.25 = 40 -> 40 rows, 30 + 10
    assert len(train) == 40 and held_out is None
    assert train.column_names == ["prompt", "completion"]  # the extra columns are not shared: left out
    assert list(train["prompt"][:2]) == ["q0 ", "q1 "] and list(train["prompt"][29:31]) == ["q29 ", "p0 "]
    assert data_io.select_columns(loaded, train, "train", ["prompt", "completion"]).column_names == \
        ["prompt", "completion"]


def test_mixture_without_fractions_takes_every_row_and_holds_out_with_test_split_size(tmp_path, two_sources):
    first, second = two_sources
    loaded = loaded_with(tmp_path, "sft", {
        "datasets": [{"data_files": str(first), "columns": {"prompt": "question", "completion": "answer"},
                      "split": "train[:50%]"},
                     {"data_files": str(second), "columns": ["prompt", "completion"]}],
        "test_split_size": 0.2})
    assert loaded.recipe.data.eval_size == 0.2
    train, held_out = data_io.load_splits(loaded)
    assert (len(train), len(held_out)) == (24, 6)  # 20 + 10 rows, a fifth held out with the seed
    assert set(train["prompt"]) | set(held_out["prompt"]) == {f"q{i} " for i in range(20)} | {f"p{i} " for i in
                                                                                              range(10)}


def test_preference_mixture_for_reward_and_dpo(tmp_path):
    pairs = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}
                                               for i in range(12)])
    other = write_jsonl(tmp_path / "b.jsonl", [{"question": f"q{i}", "better": "yes", "worse": "no"}
                                                   for i in range(6)])
    data = {"datasets": [{"data_files": str(pairs), "fraction": 2},
                         {"data_files": str(other), "fraction": 1,
                          "columns": {"prompt": "question", "chosen": "better", "rejected": "worse"}}],
            "eval_size": 3}
    for stage in ("reward", "dpo"):
        train, held_out = data_io.load_splits(loaded_with(tmp_path, stage, data))
        assert (len(train) + len(held_out), len(held_out)) == (18, 3)  # 12 and 6 rows: exactly 2:1
        assert sorted(train.column_names) == ["chosen", "prompt", "rejected"]
        assert sum(p.startswith("q") for p in [*train["prompt"], *held_out["prompt"]]) == 6


@pytest.mark.parametrize(("entries", "message"), [
    ([{"data_files": "A", "fraction": 1}, {"data_files": "B"}],
     "data.datasets.1: no `fraction`, but other entries have one: set a fraction on every entry"),
    ([{"data_files": "A", "fraction": 0}], "data.datasets.0.fraction: Input should be greater than 0"),
    ([{"data_files": "A", "columns": {"prompt": "questoin", "completion": "answer"}}],
     "data.datasets.0.columns.prompt: data.datasets.0 has no column 'questoin' (it has: question, answer, id); "
     "did you mean 'question'?"),
    ([{"data_files": "A", "columns": {"promt": "question"}}], "data.datasets.0.columns.promt: unknown key"),
    ([{"data_files": "A", "columns": ["question"]}], "as a list (TRL's form), `columns` keeps columns under their "
                                                     "own names, which must be roles"),
    ([{"data_files": "A", "columns": {"prompt": "question", "completion": "answer"}}, {"data_files": "C"}],
     "data.datasets.1: gives the roles text, but data.datasets.0 gives completion, prompt"),
    ([{"data_files": "A", "split": "test"}], "split 'test' is not among data_files (train)"),
    ([{"data_files": "A", "split": "train[50:60]"}], "data.datasets.0.split: 'train[50:60]': Instruction"),
    ([{"data_files": "nowhere.jsonl"}], "data.datasets.0.data_files: no such file: nowhere.jsonl"),
])
def test_bad_mixtures_name_the_entry(tmp_path, two_sources, entries, message):
    files = {"A": str(two_sources[0]), "B": str(two_sources[1]),
             "C": str(write_jsonl(tmp_path / "t.jsonl", [{"text": "t"}]))}
    entries = [{k: files.get(v, v) if k == "data_files" else v for k, v in e.items()} for e in entries]
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", tmp_path / "out", "some/model",
                                                              {"datasets": entries}))
    result = run_cli("recipe", "validate", recipe)
    if result.exit_code == 0:  # what only the data shows: the stage finds it before loading a model
        result = run_cli("sft", recipe)
    assert result.exit_code == 2, result.output
    assert f"{recipe}:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_mixture_excludes_the_single_source_keys(tmp_path, two_sources):
    for extra, message in [({"files": "x.jsonl"}, "set exactly one of `dataset`"),
                           ({"train_split": "train[:5]"}, "each entry names its own `split`")]:
        with pytest.raises(RecipeError, match=message.replace("`", ".")):
            loaded_with(tmp_path, "sft", {"datasets": [{"data_files": str(two_sources[0])}], **extra})


def test_mixture_dry_run_lists_the_entries(tmp_path, two_sources):
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", tmp_path / "out", "some/model", {
        "datasets": [{"data_files": str(two_sources[0]), "columns": {"prompt": "question", "completion": "answer"},
                      "fraction": 3}, {"path": "json", "data_files": str(two_sources[1]), "fraction": 1}],
        "eval_size": 5}))
    result = run_cli("sft", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"data.datasets.0  {two_sources[0]}, split 'train', fraction 3, columns prompt <- question, "
            "completion <- answer") in result.stdout
    assert f"data.datasets.1  json {two_sources[1]}, split 'train', fraction 1" in result.stdout
    assert "held-out 5 rows of the mixture (seed 0)" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# sliced splits
# ---------------------------------------------------------------------------------------------------------------
def test_local_files_slice_as_the_hub_does(tmp_path, two_sources):
    files = {"train": str(two_sources[0]), "test": str(two_sources[1])}
    loaded = loaded_with(tmp_path, "sft", {"files": files, "train_split": "train[10:20]+train[-5:]",
                                           "eval_split": "test[:50%]", "columns": {"prompt": "question",
                                                                                   "completion": "answer"}})
    train, held_out = data_io.load_splits(loaded)
    assert list(train["id"]) == list(range(10, 20)) + list(range(35, 40))
    assert list(held_out["prompt"]) == [f"p{i} " for i in range(5)]


@pytest.mark.parametrize(("split", "message"), [
    ("train[:10x]", "data.train_split: 'train[:10x]' is not a split: expected a name, optionally sliced"),
    ("tain[:10%]", "data.train_split: no split 'tain' among data.files (train); did you mean 'train'?"),
])
def test_bad_slices_are_refused_at_validation(tmp_path, two_sources, split, message):
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", tmp_path / "out", "some/model", {
        "files": str(two_sources[0]), "train_split": split}))
    result = run_cli("recipe", "validate", recipe)
    assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------------------------------------------------------
# .txt corpora
# ---------------------------------------------------------------------------------------------------------------
def test_txt_files_give_a_text_column(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first line\n\nsecond line\nthird line\n\n")
    lines = data_io.load_splits(loaded_with(tmp_path, "sft", {"files": str(corpus)}))[0]
    assert list(lines["text"]) == ["first line", "second line", "third line"]  # blank lines left out
    paragraphs = data_io.load_splits(loaded_with(tmp_path, "sft", {"files": str(corpus), "sample_by": "paragraph"}))[0]
    assert [t.strip() for t in paragraphs["text"]] == ["first line", "second line\nthird line"]
    with pytest.raises(RecipeError, match="`sample_by` applies to .txt files"):
        loaded_with(tmp_path, "sft", {"files": str(write_jsonl(tmp_path / "x.jsonl", [{"text": "t"}])),
                                      "sample_by": "line"})


def test_pretrain_on_a_txt_file(tmp_path, tiny_world):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in tiny_world["corpus"][:300]) + "\n")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "pretrain.yaml", {
        "stage": "pretrain", "seed": 0, "output_dir": str(out),
        "model": {"init": {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32}},
        "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"files": str(corpus), "eval_size": 20, "block_size": 32},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "disable_tqdm": True}})
    result = run_cli("pretrain", recipe)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_a_txt_file_that_is_not_utf8(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(RecipeError, match=r"corpus.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        data_io.load_splits(loaded_with(tmp_path, "sft", {"files": str(corpus)}))


def test_sft_trains_on_a_mixture(tmp_path, tiny_model_dir, data_dir, tiny_world):
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"instruction": r["prompt"], "output": r["completion"]}
                                                       for r in tiny_world["sft"][:16]])
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", out, tiny_model_dir, {
        "datasets": [{"data_files": str(data_dir / "sft.jsonl"), "split": "train[:32]"},
                     {"data_files": str(renamed), "columns": {"prompt": "instruction", "completion": "output"}}],
        "eval_size": 8}))
    result = run_cli("sft", recipe)
    assert result.exit_code == 0, result.output
    assert "prompt-completion data: 40 train rows, 8 held-out" in result.output
    assert (out / "model.safetensors").is_file()
