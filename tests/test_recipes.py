"""Recipe files: the committed ones validate; `extends`, `--set` and YAML typing; resolved recipes load again."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from rlhf_pipeline import commands, runs
from rlhf_pipeline.errors import RecipeError, UserError
from rlhf_pipeline.recipe.load import load_recipe, parse_override

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))  # for `accelerate launch`
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.y*ml") if p not in ACCELERATE_CONFIGS)


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"tiny/pretrain.yaml", "tiny/sft.yaml", "tiny/reward.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_committed_recipe_validates(path):
    loaded = load_recipe(path.relative_to(REPO))
    commands.check_local_files(loaded)
    assert loaded.stage == yaml.safe_load(path.read_text())["stage"]
    assert loaded.recipe.output_dir.startswith("runs/")


def test_validate_command_on_recipes_dir():
    result = run_cli("recipe", "validate", "recipes")
    assert result.exit_code == 0, result.output
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok  ")}
    assert listed == {str(p.relative_to(REPO)) for p in RECIPES + ACCELERATE_CONFIGS}
    assert len(ACCELERATE_CONFIGS) >= 6
    assert "ok  recipes/accelerate/fsdp.yaml  (Accelerate config: FSDP version 2, 8 processes, bf16)" in result.stdout
    assert "ok  recipes/accelerate/zero3.yaml  (Accelerate config: DeepSpeed ZeRO-3, 8 processes, bf16)" in \
        result.stdout
    for path in ACCELERATE_CONFIGS:  # one file at a time too
        one = run_cli("recipe", "validate", path.relative_to(REPO))
        assert one.exit_code == 0 and "(Accelerate config: " in one.stdout, one.output


def test_validate_command_on_a_broken_accelerate_config(tmp_path):
    text = (REPO / "recipes" / "accelerate" / "ddp.yaml").read_text()
    bad = _write(tmp_path / "accelerate" / "ddp.yaml",
                 text.replace("num_processes: 8", "num_proceses: 8").replace("MULTI_GPU", "MULTI_GPUS"))
    lines = {line.split(":")[0]: number for number, line in enumerate(text.splitlines(), 1)}
    result = run_cli("recipe", "validate", tmp_path, "recipes/tiny/sft.yaml")
    assert result.exit_code == 2
    assert "ok  recipes/tiny/sft.yaml  (sft)" in result.stdout  # the others are still checked
    assert (f"{bad}:{lines['num_processes']}: num_proceses: unknown key for Accelerate's ClusterConfig; "
            "did you mean 'num_processes'?") in result.stderr
    assert (f"{bad}:{lines['distributed_type']}: distributed_type: expected one of NO, MULTI_CPU, "
            "MULTI_GPU,") in result.stderr
    assert "did you mean 'MULTI_GPU'?" in result.stderr
    assert "Traceback" not in result.output and "missing" not in result.output


def test_a_stage_given_an_accelerate_config():
    result = run_cli("sft", "recipes/accelerate/ddp.yaml", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: recipes/accelerate/ddp.yaml: this is an Accelerate config, not a recipe: launch with it, as in "
        "`accelerate launch --config_file recipes/accelerate/ddp.yaml -m rlhf_pipeline sft RECIPE` (see "
        "recipes/accelerate/README.md)")


# ---------------------------------------------------------------------------------------------------------------
# extends
# ---------------------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_deep_merge(tmp_path):
    _write(tmp_path / "base" / "sft-base.yaml", """\
stage: sft
seed: 1
output_dir: runs/base
model:
  name_or_path: gpt2
  dtype: bfloat16
data:
  files: [a.jsonl, b.jsonl]
  eval_size: 10
  columns:
    prompt: question
    completion: answer
training:
  learning_rate: 1.0e-4
  max_steps: 100
peft:
  r: 8
  target_modules: [c_attn, c_proj]
""")
    child = _write(tmp_path / "child.yaml", """\
extends: base/sft-base.yaml
output_dir: runs/child
model:
  name_or_path: other-model
data:
  files: [c.jsonl]
  columns:
    completion: response
training:
  max_steps: 5
peft:
  target_modules: [c_fc]
""")
    recipe = load_recipe(child).recipe
    assert recipe.seed == 1  # inherited scalar
    assert recipe.output_dir == "runs/child"  # child overrides scalars
    assert recipe.model.name_or_path == "other-model" and recipe.model.dtype == "bfloat16"  # mappings merge
    assert recipe.data.files == {"train": ["c.jsonl"]}  # lists replace
    assert recipe.data.eval_size == 10
    assert recipe.data.columns.prompt == "question" and recipe.data.columns.completion == "response"
    assert recipe.training == {"learning_rate": 1e-4, "max_steps": 5}
    assert recipe.peft.r == 8 and recipe.peft.target_modules == ["c_fc"]


def test_extends_paths_are_relative_to_the_child(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "common" / "base.yaml", "stage: reward\nseed: 3\n")
    child = _write(tmp_path / "a" / "b" / "child.yaml",
                   "extends: ../common/base.yaml\noutput_dir: o\nmodel: {name_or_path: m}\ndata: {dataset: d}\n")
    monkeypatch.chdir(tmp_path)  # somewhere the relative path would not resolve from
    assert load_recipe(child.relative_to(tmp_path)).recipe.seed == 3


def test_recipe_dir_is_the_directory_of_the_file_that_wrote_the_value(tmp_path, monkeypatch):
    _write(tmp_path / "set" / "base" / "data" / "d.jsonl", '{"text": "x"}\n')
    _write(tmp_path / "set" / "base" / "base.yaml", 'stage: sft\noutput_dir: o\nmodel: {name_or_path: m}\n'
                                                   'data:\n  files: "{recipe_dir}/data/d.jsonl"\n')
    child = _write(tmp_path / "set" / "child" / "c.yaml", 'extends: ../base/base.yaml\n'
                                                          'tokenizer: {chat_template: "{recipe_dir}/t.jinja"}\n')
    _write(tmp_path / "set" / "child" / "t.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(Path("set/child/c.yaml"), ["output_dir={recipe_dir}/out"])
    assert loaded.recipe.data.files == {"train": ["set/base/data/d.jsonl"]}  # the parent's directory, not the child's
    assert loaded.recipe.tokenizer.chat_template == "set/child/t.jinja"
    assert loaded.recipe.output_dir == "set/child/out"  # --set: the recipe named on the command line
    commands.check_local_files(loaded)
    assert load_recipe(child).recipe.data.files == {"train": [str(tmp_path / "set/base/data/d.jsonl")]}


def test_unquoted_recipe_dir_says_to_quote_it(tmp_path):
    bad = _write(tmp_path / "r.yaml", "stage: sft\ndata:\n  files: {recipe_dir}/data/d.jsonl\n")
    with pytest.raises(RecipeError, match=r'needs quotes: "\{recipe_dir\}/data/train.jsonl"'):
        load_recipe(bad)


def test_a_copy_of_the_tiny_recipes_validates_and_dry_runs_from_elsewhere(tmp_path, monkeypatch):
    """The tiny recipes find their shipped data through `{recipe_dir}`, wherever the set is copied and run from."""
    import shutil

    copy = tmp_path / "copied" / "tiny"
    shutil.copytree(REPO / "recipes" / "tiny", copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli("recipe", "validate", "../copied/tiny")
    assert result.exit_code == 0, result.output
    assert "ok  ../copied/tiny/compare/dpo.yaml  (dpo)" in result.stdout
    result = run_cli("sft", "../copied/tiny/sft.yaml", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "data        train: ../copied/tiny/data/sft.jsonl.gz" in result.stdout
    assert "output_dir  runs/tiny/sft (new)" in result.stdout  # outputs: the current directory, as in TRL
    result = run_cli("dpo", str(copy / "compare" / "dpo.yaml"), "--dry-run")  # through `extends`, absolute
    assert result.exit_code == 0, result.output
    assert f"{copy}/compare/data/preferences-train.jsonl.gz" in result.stdout


def test_extends_chain_and_multiple_parents_in_order(tmp_path):
    _write(tmp_path / "root.yaml", "stage: sft\nseed: 1\ntraining:\n  learning_rate: 1.0e-3\n  max_steps: 1\n")
    _write(tmp_path / "first.yaml", "extends: root.yaml\nseed: 2\ntraining:\n  max_steps: 2\n  logging_steps: 2\n")
    _write(tmp_path / "second.yaml", "seed: 3\ntraining:\n  logging_steps: 3\noutput_dir: second\n")
    child = _write(tmp_path / "child.yaml", "extends: [first.yaml, second.yaml]\nmodel: {name_or_path: m}\n"
                                           "data: {dataset: d}\ntraining:\n  warmup_steps: 4\n")
    recipe = load_recipe(child).recipe
    assert recipe.seed == 3  # the later parent wins over the earlier one
    assert recipe.output_dir == "second"
    assert recipe.training == {"learning_rate": 1e-3, "max_steps": 2, "logging_steps": 3, "warmup_steps": 4}

    swapped = _write(tmp_path / "swapped.yaml", child.read_text().replace("[first.yaml, second.yaml]",
                                                                          "[second.yaml, first.yaml]"))
    recipe = load_recipe(swapped).recipe
    assert recipe.seed == 2
    assert recipe.training["logging_steps"] == 2


def test_extends_error_attribution(tmp_path):
    """An error inherited from a parent names the parent's file and line; one in the child names the child."""
    parent = _write(tmp_path / "parent" / "p.yaml", "stage: sft\nseed: 0\nmodel:\n  name_or_path: m\n"
                                                    "  dtyp: float32\ntraining:\n  max_steps: lots\n")
    child = _write(tmp_path / "child.yaml", "extends: parent/p.yaml\noutput_dir: o\ndata:\n  dataset: d\n"
                                            "  eval_sise: 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    found = {(p.file, p.line, p.key) for p in info.value.problems}
    assert found == {
        (str(parent), 5, "model.dtyp"),
        (str(parent), 7, "training.max_steps"),
        (str(child), 5, "data.eval_sise"),
    }


def test_override_in_child_takes_the_childs_line(tmp_path):
    _write(tmp_path / "p.yaml", "stage: sft\nseed: 0\ntraining:\n  max_steps: 3\n")
    child = _write(tmp_path / "c.yaml", "extends: p.yaml\noutput_dir: o\nmodel: {name_or_path: m}\n"
                                        "data: {dataset: d}\ntraining:\n  max_steps: lots\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.key) == (str(child), 6, "training.max_steps")


def test_list_in_child_replaces_and_is_attributed_to_child(tmp_path):
    _write(tmp_path / "p.yaml", "stage: sft\nseed: 0\npeft:\n  target_modules: [c_attn]\n")
    child = _write(tmp_path / "c.yaml", "extends: p.yaml\noutput_dir: o\nmodel: {name_or_path: m}\n"
                                        "data: {dataset: d}\npeft:\n  target_modules: []\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.key) == (str(child), 6, "peft.target_modules")


# ---------------------------------------------------------------------------------------------------------------
# --set and YAML typing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, value", [
    ("training.learning_rate=1e-4", ("training", "learning_rate"), 1e-4),
    ("training.learning_rate=1.5E-5", ("training", "learning_rate"), 1.5e-5),
    ("training.max_steps=3", ("training", "max_steps"), 3),
    ("training.warmup_steps=0.1", ("training", "warmup_steps"), 0.1),
    ("peft.target_modules=[c_attn, c_proj]", ("peft", "target_modules"), ["c_attn", "c_proj"]),
    ("training.bf16=true", ("training", "bf16"), True),
    ("training.bf16=false", ("training", "bf16"), False),
    ("model.revision=null", ("model", "revision"), None),
    ("output_dir=runs/x", ("output_dir",), "runs/x"),
    ("data.columns.text=a=b", ("data", "columns", "text"), "a=b"),  # only the first `=` separates
    ("model.revision='1e-4'", ("model", "revision"), "1e-4"),  # quoted: a string
])
def test_parse_override_types_values(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["training.learning_rate", "=3", "training..x=1", ".x=1"])
def test_parse_override_rejects(text):
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_override(text)


def test_overrides_reach_the_recipe(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "stage: sft\noutput_dir: o\nmodel: {name_or_path: m}\ndata: {dataset: d}\n"
                                         "training:\n  max_steps: 10\n")
    loaded = load_recipe(recipe, ["training.learning_rate=1e-4", "training.max_steps=3", "seed=7",
                                  "peft.target_modules=[c_attn, c_proj]", "training.bf16=true",
                                  "data.columns.text=chosen", "model.revision=null"])
    r = loaded.recipe
    assert r.training == {"max_steps": 3, "learning_rate": 1e-4, "bf16": True}
    assert isinstance(r.training["learning_rate"], float) and isinstance(r.training["max_steps"], int)
    assert r.seed == 7 and r.peft.target_modules == ["c_attn", "c_proj"] and r.data.columns.text == "chosen"
    assert r.model.revision is None
    # later flags win over earlier ones
    assert load_recipe(recipe, ["seed=1", "seed=2"]).recipe.seed == 2


def test_override_replaces_a_whole_section(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "stage: sft\noutput_dir: o\nmodel: {name_or_path: m}\ndata: {dataset: d}\n"
                                         "training:\n  max_steps: 10\n")
    assert load_recipe(recipe, ["training={}"]).recipe.training == {}


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML's YAML 1.1 rules read `1e-4` as a string; recipes read it as a float, as YAML 1.2 does."""
    recipe = _write(tmp_path / "r.yaml", "stage: sft\noutput_dir: o\nmodel: {name_or_path: m}\ndata: {dataset: d}\n"
                                         "training:\n  learning_rate: 1e-4\n  weight_decay: 5E-2\n"
                                         "  adam_epsilon: 1e-8\n")
    assert yaml.safe_load(recipe.read_text())["training"]["learning_rate"] == "1e-4"  # what plain PyYAML does
    training = load_recipe(recipe).recipe.training
    assert training == {"learning_rate": 1e-4, "weight_decay": 0.05, "adam_epsilon": 1e-8}
    assert all(type(v) is float for v in training.values())
    from rlhf_pipeline.recipe.yaml_io import parse_scalar

    assert parse_scalar("-1e+3") == -1000.0 and parse_scalar("+2E-1") == 0.2


def test_yaml_strings_stay_strings(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "stage: sft\noutput_dir: '1e3'\nmodel: {name_or_path: e5}\n"
                                         "data: {dataset: d}\n")
    r = load_recipe(recipe).recipe
    assert r.output_dir == "1e3" and r.model.name_or_path == "e5"


# ---------------------------------------------------------------------------------------------------------------
# recipe.resolved.yaml round-trip
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_resolved_recipe_round_trip(path, tmp_path):
    loaded = load_recipe(path.relative_to(REPO), ["seed=7"])
    resolved = loaded.resolved_yaml(runs.provenance())
    assert "\nprovenance:\n" in resolved
    written = _write(tmp_path / "recipe.resolved.yaml", resolved)
    again = load_recipe(written)
    dump = dict(exclude={"provenance"})
    assert again.recipe.model_dump(**dump) == loaded.recipe.model_dump(**dump)
    assert again.recipe.provenance["versions"]["rlhf-pipeline"] == runs.provenance()["versions"]["rlhf-pipeline"]
    assert again.resolved_yaml() == loaded.resolved_yaml()  # a fixed point
    if loaded.stage == "pipeline":
        return  # its stage recipes are named relative to the pipeline file, which the copy has moved away from
    result = run_cli("recipe", "validate", written)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# training.report_to: names checked when the recipe is validated, packages at --dry-run
# ---------------------------------------------------------------------------------------------------------------
def test_tracker_lists_match_the_installed_libraries():
    """The torch-free copies in recipe/trackers.py are transformers' and Accelerate's own lists."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from rlhf_pipeline.recipe import trackers

    assert sorted(trackers.TRANSFORMERS_TRACKERS) == sorted(INTEGRATION_TO_CALLBACK)
    assert sorted(trackers.ACCELERATE_TRACKERS) == sorted(LOGGER_TYPE_TO_CLASS)
    every = set(trackers.TRANSFORMERS_TRACKERS) | set(trackers.ACCELERATE_TRACKERS)
    assert every - set(trackers.PACKAGES) == {"kubeflow"}  # the only one that needs no package


@pytest.mark.parametrize(("stage", "value", "expected"), [
    ("sft", "mlfow", "training.report_to: unknown tracker 'mlfow'; expected azure_ml, clearml,"),
    ("sft", "[tensorboard, tensorbord]", "did you mean 'tensorboard'?"),
    ("ppo", "tensorbord", "training.report_to: unknown tracker 'tensorbord'; expected aim, clearml,"),
    ("ppo", "neptune", "'neptune' reports the TRL-backed stages (a transformers integration), not rlhf ppo"),
    ("ppo", "{a: 1}", "training.report_to: expected a tracker name or a list of names"),
])
def test_an_unknown_tracker_is_refused_when_the_recipe_is_validated(tmp_path, stage, value, expected):
    text = (REPO / "recipes" / "tiny" / f"{stage}.yaml").read_text()
    path = _write(tmp_path / f"{stage}.yaml", text.replace("training:\n", f"training:\n  report_to: {value}\n", 1))
    result = run_cli("recipe", "validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:" in result.stderr and expected in result.stderr
    if value == "mlfow":
        assert "did you mean 'mlflow'?" in result.stderr


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_tracker_that_is_not_installed_is_named_at_dry_run(tmp_path, stage):
    """`mlflow` is a known name (validate passes: the recipe may run elsewhere); the dry run, like a run before it
    loads a model, says it is not installed and how to install it."""
    from rlhf_pipeline.recipe.trackers import missing_packages

    if not missing_packages("mlflow"):
        pytest.skip("mlflow is installed here")
    tiny = REPO / "recipes" / "tiny" / f"{stage}.yaml"  # extended: its data paths are next to it ({recipe_dir})
    path = _write(tmp_path / f"{stage}.yaml", f"extends: {tiny}\ntraining:\n  report_to: [mlflow]\n")
    assert run_cli("recipe", "validate", path).exit_code == 0
    result = run_cli(stage, path, "--dry-run", "--set", f"output_dir={tmp_path / 'out'}")
    assert result.exit_code == 2, result.output
    assert "training.report_to: mlflow: the package is not installed here: pip install mlflow" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_ppo_project_key(tmp_path):
    assert load_recipe(REPO / "recipes" / "tiny" / "ppo.yaml").recipe.training.project == "rlhf-pipeline"
    result = run_cli("ppo", "recipes/tiny/ppo.yaml", "--dry-run", "--set", "training.project=''")
    assert result.exit_code == 2 and "training.project" in result.stderr
