"""The bad-recipe suite: every mistake a user can make in a recipe or on the command line is exit code 2, a message
that names the file (and line), the dotted key and what was expected, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets  # noqa: F401  (see below)
import pytest
import transformers  # noqa: F401
from conftest import FAST_TRAINING, run_cli, stage_recipe, write_jsonl, write_recipe

# datasets and transformers give their loggers a StreamHandler bound to the sys.stderr of the moment they are first
# imported. Imported inside a CliRunner call, that stream is closed afterwards and later log records print
# "--- Logging error --- Traceback ...". Importing them here, before any CliRunner call, keeps outputs clean.

# A valid sft recipe; the cases below change one thing in it. Line numbers matter: messages must point at them.
SFT = """\
stage: sft
seed: 0
output_dir: {out}
model:
  name_or_path: {model}
data:
  files: {data}
  eval_size: 8
training:
  max_steps: 3
  learning_rate: 1.0e-3
  disable_tqdm: true
"""


@dataclass
class Case:
    id: str
    text: str  # bad.yaml; {out}, {model}, {data}, {dir} are filled in
    expected: list[str]  # substrings of the output; {file} is bad.yaml's path
    commands: tuple[str, ...] = ("sft", "validate")  # `validate` = `rlhf recipe validate bad.yaml`
    args: tuple[str, ...] = ()  # extra arguments for the stage command
    extra_files: dict[str, str] = field(default_factory=dict)


def sft_with(old: str, new: str) -> str:
    assert old in SFT, old
    return SFT.replace(old, new)


STATIC_CASES = [
    Case("misspelt-top-level-key", sft_with("output_dir:", "ouput_dir:"),
         ["{file}:3: ouput_dir: unknown key; did you mean 'output_dir'?",
          "{file}: output_dir: required key is missing"]),
    Case("misspelt-nested-key", sft_with("  eval_size: 8\n", "  eval_size: 8\n  colums:\n    prompt: prompt\n"),
         ["{file}:9: data.colums: unknown key; did you mean 'columns'? Every key: `rlhf recipe keys sft data`"]),
    Case("unknown-training-key", sft_with("  learning_rate:", "  learning_rat:"),
         ["{file}:11: training.learning_rat: unknown key for trl.SFTConfig; did you mean 'learning_rate'?"]),
    Case("wrong-type", sft_with("  max_steps: 3\n", "  max_steps: 3\n  num_train_epochs: many\n"),
         ["{file}:11: training.num_train_epochs: expected float (got 'many')"]),
    Case("bad-enum", sft_with("  max_steps: 3\n", "  max_steps: 3\n  lr_scheduler_type: cosin\n"),
         ["{file}:11: training.lr_scheduler_type: expected one of linear, cosine,", "did you mean 'cosine'?"]),
    Case("bad-enum-schema", sft_with("  name_or_path: {model}\n", "  name_or_path: {model}\n  dtype: float8\n"),
         ["{file}:6: model.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'float8')"]),
    Case("missing-output-dir", sft_with("output_dir: {out}\n", ""),
         ["{file}: output_dir: required key is missing"]),
    Case("missing-model", sft_with("model:\n  name_or_path: {model}\n", ""),
         ["{file}: model: required key is missing"]),
    Case("model-without-source", sft_with("  name_or_path: {model}\n", "  dtype: float32\n"),
         ["{file}:4: model: set `name_or_path`"]),
    Case("invalid-yaml", sft_with("  eval_size: 8\n", " eval_size: 8\n"),
         ["{file}:8: invalid YAML"]),
    Case("duplicate-key", sft_with("  learning_rate: 1.0e-3\n", "  learning_rate: 1.0e-3\n  max_steps: 5\n"),
         ["{file}:12: training.max_steps: duplicate key"]),
    Case("unknown-stage", sft_with("stage: sft", "stage: sfft"),
         ["{file}:1: stage: unknown stage 'sfft'; did you mean 'sft'?", "one of: pretrain, sft, reward"]),
    Case("missing-stage", sft_with("stage: sft\n", ""),
         ["{file}: stage: missing: every recipe names its stage"]),
    Case("wrong-stage-for-command", sft_with("stage: sft", "stage: reward"),
         ["{file}:1: stage: this is a `reward` recipe; run it with `rlhf reward`, not `rlhf sft`"],
         commands=("sft",)),
    Case("extends-cycle", "extends: other.yaml\n" + SFT,
         ["`extends` cycle:", "bad.yaml -> ", "other.yaml -> ", "extends"],
         extra_files={"other.yaml": "extends: bad.yaml\nseed: 1\n"}),
    Case("extends-self", "extends: bad.yaml\n" + SFT, ["`extends` cycle:"]),
    Case("extends-missing-file", "extends: nowhere/base.yaml\n" + SFT,
         ["{file}:1: extends: no such file: ", "nowhere/base.yaml"]),
    Case("extends-not-a-path", "extends: {{a: 1}}\n" + SFT,
         ["{file}:1: extends: expected a path or a list of paths"]),
    Case("set-without-equals", SFT, ["--set 'training.learning_rate': expected KEY=VALUE"],
         commands=("sft", "show"), args=("--set", "training.learning_rate")),
    Case("set-empty-key-part", SFT, ["--set 'training..x=1': expected KEY=VALUE"],
         commands=("sft", "show"), args=("--set", "training..x=1")),
    Case("set-unknown-key", SFT,
         ["--set training.learning_rat=1: training.learning_rat: unknown key for trl.SFTConfig; "
          "did you mean 'learning_rate'?"],
         commands=("sft", "show"), args=("--set", "training.learning_rat=1")),
    Case("set-unknown-section-key", SFT,
         ["--set data.colums.prompt=q: data.colums: unknown key; did you mean 'columns'?"],
         commands=("sft", "show"), args=("--set", "data.colums.prompt=q")),
    Case("set-through-scalar", SFT, ["--set seed.x=1: `seed` holds a value (0)", "not a section"],
         commands=("sft", "show"), args=("--set", "seed.x=1")),
    Case("set-through-default-scalar", sft_with("seed: 0\n", ""), ["--set seed.x=1: seed: "],
         commands=("sft", "show"), args=("--set", "seed.x=1")),
    Case("set-wrong-type", SFT, ["--set training.max_steps=lots: training.max_steps: expected int (got 'lots')"],
         commands=("sft", "show"), args=("--set", "training.max_steps=lots")),
    Case("data-file-missing", sft_with("files: {data}", "files: {dir}/nope.jsonl"),
         ["{file}:7: data.files: no such file: ", "nope.jsonl", "split 'train'"]),
    Case("files-and-dataset", sft_with("  eval_size: 8\n", "  eval_size: 8\n  dataset: trl-lib/tldr\n"),
         ["{file}:6: data: set exactly one of `dataset` (a Hub dataset id), `files` (local files) or `datasets` "
          "(a mixture)"]),
    Case("no-data-source", sft_with("  files: {data}\n", ""),
         ["{file}:6: data: set exactly one of `dataset`"]),
    Case("bad-file-extension", sft_with("files: {data}", "files: {dir}/data.text"),
         ["{file}:7: data.files: ", "data.text", "expected a .jsonl, .json, .csv, .parquet, .txt file"]),
    Case("mixed-file-formats", sft_with("files: {data}", "files: [{data}, {dir}/more.csv]"),
         ["{file}:7: data.files: all files must have one format"]),
    Case("eval-size-and-eval-split",
         sft_with("  files: {data}\n", "  files:\n    train: {data}\n    test: {data}\n  eval_split: test\n"),
         ["{file}:6: data: set `eval_split` (a given held-out split) or `eval_size` (carve one off), not both"]),
    Case("eval-size-fractional-rows", sft_with("eval_size: 8", "eval_size: 8.5"),
         ["{file}:6: data: `eval_size` is a fraction below 1 or a whole number of rows"]),
    Case("eval-split-not-in-files", sft_with("  eval_size: 8\n", "  eval_split: test\n"),
         ["{file}:8: data.eval_split: no split 'test' among data.files (train)"]),
    Case("train-split-not-in-files", sft_with("  files: {data}\n", "  files:\n    training: {data}\n"),
         ["data.train_split: no split 'train' among data.files (training); did you mean 'training'?"]),
    Case("training-output-dir", sft_with("  max_steps: 3\n", "  max_steps: 3\n  output_dir: elsewhere\n"),
         ["{file}:11: training.output_dir: not set here: set `output_dir` (at the top level; --output-dir "
          "overrides it)"]),
    Case("training-hub-token", sft_with("  max_steps: 3\n", "  max_steps: 3\n  hub_token: hf_secret\n"),
         ["{file}:11: training.hub_token: not set here: tokens never go in recipes: set HF_TOKEN"]),
    Case("training-seed", sft_with("  max_steps: 3\n", "  max_steps: 3\n  seed: 3\n"),
         ["{file}:11: training.seed: not set here: set `seed` (at the top level)"]),
    Case("training-not-a-mapping",
         sft_with("training:\n  max_steps: 3\n  learning_rate: 1.0e-3\n  disable_tqdm: true\n", "training: fast\n"),
         ["{file}:9: training: Input should be a valid dictionary (got 'fast')"]),
    Case("peft-r-zero", SFT + "peft:\n  r: 0\n",
         ["{file}:14: peft.r: Input should be greater than or equal to 1 (got 0)"]),
    Case("peft-unknown-key", SFT + "peft:\n  rank: 8\n",
         ["{file}:14: peft.rank: unknown key; did you mean 'r'? Every key: `rlhf recipe keys sft peft`"]),
    Case("pretrain-init-without-tokenizer",
         "stage: pretrain\noutput_dir: {out}\nmodel:\n  init:\n    n_layer: 1\n    n_head: 2\n    n_embd: 32\n"
         "data:\n  files: {data}\n",
         ["{file}: a new model (`model.init`) needs `tokenizer.train` or `tokenizer.name_or_path`"],
         commands=("pretrain", "validate")),
    Case("pretrain-init-and-checkpoint",
         "stage: pretrain\noutput_dir: {out}\nmodel:\n  name_or_path: {model}\n  init:\n    n_layer: 1\n"
         "tokenizer:\n  train:\n    vocab_size: 300\ndata:\n  files: {data}\n",
         ["{file}:3: model: set either `name_or_path` (continue pre-training) or `init`"],
         commands=("pretrain", "validate")),
    Case("pretrain-heads-do-not-divide",
         "stage: pretrain\noutput_dir: {out}\nmodel:\n  init:\n    n_head: 3\n    n_embd: 32\n"
         "tokenizer:\n  train:\n    vocab_size: 300\ndata:\n  files: {data}\n",
         ["{file}:4: model.init: n_head (3) must divide n_embd (32)"],
         commands=("pretrain", "validate")),
    Case("pretrain-vocab-too-small",
         "stage: pretrain\noutput_dir: {out}\nmodel:\n  init:\n    n_head: 2\n"
         "tokenizer:\n  train:\n    vocab_size: 100\ndata:\n  files: {data}\n",
         ["{file}:8: tokenizer.train.vocab_size: Input should be greater than or equal to 300 (got 100)"],
         commands=("pretrain", "validate")),
    Case("not-a-mapping", "- stage: sft\n- output_dir: {out}\n", ["{file}:1: a recipe is a mapping of keys to values"]),
    Case("scalar-recipe", "sft\n", ["{file}:1: a recipe is a mapping of keys to values"]),
    Case("empty-recipe", "", ["{file}: stage: missing: every recipe names its stage"]),
]


def _run(command: str, recipe: Path, args: tuple[str, ...]):
    if command == "validate":
        return run_cli("recipe", "validate", recipe)
    if command == "show":
        return run_cli("recipe", "show", recipe, *args)
    return run_cli(command, recipe, *args)


def assert_user_error(result, expected: list[str], out: Path) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in output
    assert output.startswith("error: ") or "\nerror: " in output, output
    for text in expected:
        assert text in output, f"{text!r} not in:\n{output}"
    assert not out.exists(), f"{out} was written"


@pytest.mark.parametrize("case", STATIC_CASES, ids=lambda c: c.id)
def test_bad_recipe(case: Case, tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    fill = {"out": out, "model": tiny_model_dir, "data": data_dir / "sft.jsonl", "dir": tmp_path}
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(case.text.format(**fill))
    for name, text in case.extra_files.items():
        (tmp_path / name).write_text(text.format(**fill))
    expected = [e.format(file=recipe) for e in case.expected]
    for command in case.commands:
        assert_user_error(_run(command, recipe, case.args), expected, out)
        if command in ("sft", "pretrain", "reward"):  # a dry run finds the same problem
            assert_user_error(_run(command, recipe, (*case.args, "--dry-run")), expected, out)


def test_every_problem_is_reported_at_once(tmp_path, tiny_model_dir, data_dir):
    recipe = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    text = SFT.format(out=out, model=tiny_model_dir, data=data_dir / "sft.jsonl")
    recipe.write_text(text.replace("output_dir:", "ouput_dir:").replace("learning_rate:", "learning_rat:"))
    result = run_cli("sft", recipe)
    assert_user_error(result, ["3 problems in the recipe", f"{recipe}:3: ouput_dir",
                               f"{recipe}:11: training.learning_rat", "output_dir: required key is missing"], out)


def test_validate_reports_every_bad_file_and_still_lists_good_ones(tmp_path, tiny_model_dir, data_dir):
    good = tmp_path / "recipes" / "good.yaml"
    bad = tmp_path / "recipes" / "nested" / "bad.yml"
    write_recipe(good, stage_recipe("sft", tmp_path / "out", tiny_model_dir, {"files": str(data_dir / "sft.jsonl")}))
    bad.parent.mkdir()
    bad.write_text("stage: sft\nouput_dir: x\n")
    result = run_cli("recipe", "validate", tmp_path / "recipes")
    assert result.exit_code == 2, result.output
    assert f"ok  {good}  (sft)" in result.stdout
    assert f"{bad}:2: ouput_dir: unknown key; did you mean 'output_dir'?" in result.stderr
    assert "Traceback" not in result.output


def test_validate_without_recipes(tmp_path):
    result = run_cli("recipe", "validate", tmp_path)
    assert result.exit_code == 2
    assert f"error: no recipe files in {tmp_path}" in result.output


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    for args in (("sft", missing), ("recipe", "validate", missing), ("recipe", "show", missing)):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert f"{missing}: no such recipe file" in result.output
        assert "Traceback" not in result.output


def test_error_in_parent_points_at_parent(tmp_path, tiny_model_dir, data_dir):
    """A bad key inherited through `extends` is reported at the parent's file and line."""
    parent = tmp_path / "base" / "parent.yaml"
    parent.parent.mkdir()
    parent.write_text("stage: sft\nseed: 0\ntraining:\n  max_steps: 3\n  learning_rat: 1.0e-3\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: base/parent.yaml\noutput_dir: {tmp_path / 'out'}\nmodel:\n  name_or_path: "
                     f"{tiny_model_dir}\ndata:\n  files: {data_dir / 'sft.jsonl'}\n  colums: {{}}\n")
    for args in (("sft", child), ("recipe", "validate", child)):
        result = run_cli(*args)
        assert_user_error(result, [f"{parent}:5: training.learning_rat: unknown key",
                                   f"{child}:7: data.colums: unknown key"], tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# errors only the data can reveal: the stage runs up to loading the data, then stops with exit code 2
# ---------------------------------------------------------------------------------------------------------------
def _data_case(tmp_path, model, stage, data, **extra):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "bad.yaml", stage_recipe(stage, out, model, data, **extra))
    return recipe, out


@pytest.mark.parametrize(
    "stage, data, expected",
    [
        ("sft", {"files": "sft.jsonl", "columns": {"prompt": "question"}},
         ["data.columns.prompt: the train data has no column 'question' (it has: prompt, completion)"]),
        ("sft", {"files": "sft.jsonl", "columns": {"prompt": "promt"}},
         ["data.columns.prompt: the train data has no column 'promt'", "did you mean 'prompt'?"]),
        ("sft", {"files": "prefs.jsonl"},
         ["data.columns: prompt/completion data needs a `completion` column too (the data has: prompt, chosen, "
          "rejected)"]),
        ("reward", {"files": "sft.jsonl", "eval_size": 4},
         ["data.columns: the train data has no `chosen` column (it has: prompt, completion)",
          "map one with `data.columns.chosen: <column>`"]),
        ("reward", {"files": "prefs.jsonl", "eval_size": 4, "columns": {"chosen": "better"}},
         ["data.columns.chosen: the train data has no column 'better' (it has: prompt, chosen, rejected)"]),
        ("reward", {"files": "prefs.jsonl"},
         ["data: the reward stage reports held-out accuracy: set `eval_split` or `eval_size`"]),
        ("sft", {"files": "sft.jsonl", "eval_size": 64},
         ["data.eval_size: 64 rows asked for, but the training split has 64"]),
        ("pretrain", {"files": "sft.jsonl"},
         ["data.columns: the train data has no `text` column (it has: prompt, completion)"]),
    ],
    ids=["missing-column", "missing-column-did-you-mean", "prompt-without-completion", "reward-no-chosen",
         "reward-mapped-chosen-missing", "reward-no-held-out", "eval-size-too-big", "pretrain-no-text"],
)
def test_bad_data(tmp_path, tiny_model_dir, data_dir, stage, data, expected):
    data = {**data, "files": str(data_dir / data["files"])}
    recipe, out = _data_case(tmp_path, tiny_model_dir, stage, data)
    assert_user_error(run_cli(stage, recipe), [f"{recipe}:", *expected], out)


def test_no_sft_columns(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a b c", "answer": "d ."}] * 8)
    recipe, out = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data)})
    assert_user_error(run_cli("sft", recipe), ["data.columns: found none of the SFT formats' columns (text; prompt + "
                                               "completion; messages) in question, answer"], out)


def test_malformed_jsonl(tmp_path, tiny_model_dir, data_dir):
    bad = tmp_path / "broken.jsonl"
    bad.write_text((data_dir / "sft.jsonl").read_text().splitlines()[0] + "\n{\"prompt\": \"unterminated\n")
    recipe, out = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(bad)})
    result = run_cli("sft", recipe)
    assert_user_error(result, [f"{recipe}:", f"data.files: split 'train': {bad}:2: not JSON"], out)


def test_eval_split_absent_from_files_at_run_time(tmp_path, tiny_model_dir, data_dir):
    recipe, out = _data_case(tmp_path, tiny_model_dir, "reward",
                             {"files": {"train": str(data_dir / "prefs.jsonl")}, "eval_split": "tset"})
    assert_user_error(run_cli("reward", recipe),
                      [f"{recipe}:", "data.eval_split: no split 'tset' among data.files (train)"], out)


def test_conversational_data_without_chat_template(tmp_path, tiny_model_dir, data_dir):
    recipe, out = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "chat.jsonl")})
    assert_user_error(run_cli("sft", recipe), [f"{recipe}: tokenizer.chat_template: the data is conversational"], out)


def test_chat_template_neither_file_nor_template(tmp_path, tiny_model_dir, data_dir):
    recipe, out = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "chat.jsonl")},
                             tokenizer={"chat_template": "templates/missing.jinja"})
    assert_user_error(run_cli("sft", recipe),
                      ["tokenizer.chat_template: no such file: templates/missing.jinja"], out)


@pytest.mark.parametrize("stage, data, training, expected", [
    ("sft", {"files": "sft.jsonl"}, {"max_length": 200},
     "training.max_length: 200 tokens is longer than the model's context (64 tokens)"),
    ("reward", {"files": "prefs.jsonl", "eval_size": 4}, {"max_length": 200},
     "training.max_length: 200 tokens is longer than the model's context (64 tokens)"),
    ("pretrain", {"files": "text.jsonl", "block_size": 128}, {},
     "data.block_size: 128 tokens is longer than the model's context (64 tokens)"),
])
def test_longer_than_the_model_context(tmp_path, tiny_model_dir, data_dir, stage, data, training, expected):
    """Without this check the position embeddings overflow mid-training (IndexError, a half-written run)."""
    data = {**data, "files": str(data_dir / data["files"])}
    recipe, out = _data_case(tmp_path, tiny_model_dir, stage, data, training={**FAST_TRAINING, **training})
    assert_user_error(run_cli(stage, recipe), [f"{recipe}:", expected], out)


def test_model_path_missing(tmp_path, data_dir):
    recipe, out = _data_case(tmp_path, tmp_path / "no-model", "sft", {"files": str(data_dir / "sft.jsonl")})
    assert_user_error(run_cli("sft", recipe), [f"model.name_or_path: no such directory: {tmp_path / 'no-model'}"], out)


def test_training_config_rejects_settings(tmp_path, tiny_model_dir, data_dir):
    """Combinations only the config class checks (here: bf16 and fp16 together) name the `training` section."""
    recipe, out = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    result = run_cli("sft", recipe, "--set", "training.fp16=true", "--set", "training.bf16=true")
    assert_user_error(result, ["training: SFTConfig rejected these settings"], out)


# ---------------------------------------------------------------------------------------------------------------
# output-dir guards
# ---------------------------------------------------------------------------------------------------------------
def _finished_run(out: Path) -> bytes:
    out.mkdir(parents=True)
    (out / ".rlhf-run.json").write_text('{"run_id": "earlier", "stage": "sft"}')
    (out / "recipe.resolved.yaml").write_text("stage: sft\n")
    metrics = json.dumps({"train_loss": 1.0}).encode()
    (out / "metrics.json").write_bytes(metrics)
    return metrics


def test_finished_run_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    metrics = _finished_run(out)
    before = os.stat(out / "metrics.json").st_mtime_ns
    recipe, _ = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    for extra in ((), ("--dry-run",)):  # a dry run does not refuse: it says what the run needs
        result = run_cli("sft", recipe, *extra)
        assert result.exit_code == (0 if extra else 2), result.output
        assert "Traceback" not in result.output
        assert f"{out} holds a finished run" in result.output and "--overwrite" in result.output
        if extra:
            assert f"the run needs --overwrite: {out} holds a finished run" in result.stdout
        assert (out / "metrics.json").read_bytes() == metrics
        assert os.stat(out / "metrics.json").st_mtime_ns == before
        assert sorted(p.name for p in out.iterdir()) == [".rlhf-run.json", "metrics.json", "recipe.resolved.yaml"]


def test_foreign_dir_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    recipe, _ = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    for extra in ((), ("--overwrite",), ("--dry-run",)):
        result = run_cli("sft", recipe, *extra)
        assert result.exit_code == 2, result.output
        assert "is not an rlhf run directory" in result.output and "Traceback" not in result.output
        assert [p.name for p in out.iterdir()] == ["thesis.tex"]
        assert (out / "thesis.tex").read_text() == "precious"


def test_output_dir_is_a_file(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    out.write_text("not a dir")
    recipe, _ = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    result = run_cli("sft", recipe)
    assert result.exit_code == 2, result.output
    assert out.read_text() == "not a dir"


def test_overwrite_replaces_finished_run(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    _finished_run(out)
    (out / "stale.txt").write_text("from the old run")
    recipe, _ = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    dry = run_cli("sft", recipe, "--overwrite", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"holds a run: the new one is built in {tmp_path / '.out.next'} and replaces it once finished" in dry.stdout
    assert (out / "stale.txt").exists()
    result = run_cli("sft", recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["train_loss"] != 1.0
    assert "provenance:" in (out / "recipe.resolved.yaml").read_text()


def test_unfinished_run_is_cleared_without_overwrite(tmp_path, tiny_model_dir, data_dir):
    """A crashed run of ours with no checkpoint has nothing to resume: the next run clears it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".rlhf-run.json").write_text('{"run_id": "crashed", "stage": "sft"}')
    (out / "recipe.resolved.yaml").write_text("stage: sft\n")
    (out / "model.safetensors").write_text("half-written")
    recipe, _ = _data_case(tmp_path, tiny_model_dir, "sft", {"files": str(data_dir / "sft.jsonl")})
    dry = run_cli("sft", recipe, "--dry-run")
    assert dry.exit_code == 0 and "holds an unfinished run with nothing to resume: it will be cleared" in dry.stdout
    result = run_cli("sft", recipe)
    assert result.exit_code == 0, result.output
    assert "holds an unfinished run that stopped before its first checkpoint: starting it over" in result.output
    assert (out / "metrics.json").is_file()
    assert (out / "model.safetensors").stat().st_size > 1000
