"""The `rlhf` command line: help, version, `recipe show / keys / validate`, dry runs, and a torch-free start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
import yaml
from conftest import REPO, run_cli, stage_recipe, write_recipe

import rlhf_pipeline
from rlhf_pipeline.recipe.schema import STAGE_RECIPES

STAGES = ("pretrain", "sft", "reward", "dpo")


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "[OPTIONS] COMMAND [ARGS]..." in result.output
    for command in (*STAGES, "recipe", "recipes"):
        assert f"\n  {command} " in result.output, command


def test_no_arguments_prints_help():
    result = run_cli()
    assert "Usage: " in result.output and "\n  sft " in result.output
    assert "Traceback" not in result.output


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"rlhf-pipeline {rlhf_pipeline.__version__}"
    assert rlhf_pipeline.__version__ == version("rlhf-pipeline")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage):
    result = run_cli(stage, "--help")
    assert result.exit_code == 0, result.output
    assert f" {stage} [OPTIONS] {{recipe}}" in result.output.splitlines()[0]
    for option in ("--set", "--output-dir", "--overwrite", "--dry-run"):
        assert option in result.output, option


@pytest.mark.parametrize("command, words", [
    ("validate", ["Validate recipes", "exit code 2"]),
    ("show", ["fully resolved recipe", "--set"]),
    ("keys", ["List every key", "section"]),
])
def test_recipe_help(command, words):
    result = run_cli("recipe", command, "--help")
    assert result.exit_code == 0, result.output
    assert f" recipe {command} [OPTIONS] " in result.output.splitlines()[0]
    for word in words:
        assert word in result.output


def test_unknown_command_is_a_usage_error():
    result = run_cli("ppo-fast", "x.yaml")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# recipe show
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_show_applies_overrides_and_fills_defaults(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("stage: sft\noutput_dir: runs/x\nmodel:\n  name_or_path: gpt2\ndata:\n  files: d.jsonl\n"
                      "training:\n  learning_rate: 3.0e-4\n")
    result = run_cli("recipe", "show", recipe, "--set", "training.learning_rate=1e-4", "--set", "peft.r=4",
                     "--set", "data.columns.text=chosen")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["training"] == {"learning_rate": 1e-4}
    assert shown["peft"]["r"] == 4
    assert shown["data"]["columns"]["text"] == "chosen"
    # defaults filled in
    assert shown["seed"] == 42
    assert shown["peft"]["alpha"] == 32 and shown["peft"]["save"] == "merged"
    assert shown["model"]["dtype"] == "float32" and shown["model"]["trust_remote_code"] is False
    assert shown["data"]["train_split"] == "train"
    assert shown["data"]["files"] == {"train": ["d.jsonl"]}  # normalised
    assert shown["tokenizer"] == {"name_or_path": None, "revision": None, "trust_remote_code": False,
                                  "chat_template": None}
    assert "extends" not in shown and "provenance" not in shown
    assert list(shown)[:3] == ["stage", "seed", "output_dir"]  # recipe order, not alphabetical


def test_recipe_show_merges_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: reward\nseed: 7\ntraining:\n  learning_rate: 1.0e-5\n  max_steps: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\noutput_dir: out\nmodel: {name_or_path: gpt2}\ndata: {dataset: x/y}\n"
                     "training:\n  max_steps: 20\n")
    result = run_cli("recipe", "show", child)
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["stage"] == "reward" and shown["seed"] == 7
    assert shown["training"] == {"learning_rate": 1e-5, "max_steps": 20}


# ---------------------------------------------------------------------------------------------------------------
# recipe keys
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_keys_sft():
    result = run_cli("recipe", "keys", "sft")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("Supervised fine-tuning")
    for key in ("output_dir", "model.name_or_path", "tokenizer.chat_template", "data.files", "data.columns.prompt",
                "data.eval_size", "peft.r", "peft.save"):
        assert f"\n  {key}  (" in out, key
    assert "model.init" not in out  # a pretrain key
    assert "`rlhf recipe keys sft training` lists them" in out
    assert "\n  training.learning_rate" not in out


def test_recipe_keys_sft_training():
    result = run_cli("recipe", "keys", "sft", "training")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "\n  training.learning_rate  (float; default 2e-05)" in out
    assert "\n  training.lr_scheduler_type  ('linear' | 'cosine'" in out
    assert "\n  training.completion_only_loss" in out  # an SFTConfig field, not a TrainingArguments one
    for owned in ("output_dir", "seed", "hub_token", "push_to_hub"):  # set elsewhere in a recipe
        assert f"\n  training.{owned}  " not in out, owned
    assert "\n  model." not in out


def test_recipe_keys_section():
    result = run_cli("recipe", "keys", "reward", "data")
    assert result.exit_code == 0, result.output
    keys = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and not
            line.startswith("   ")]
    assert keys[0] == "data" and "data.columns.chosen" in keys and "data.columns.margin" in keys
    assert all(k == "data" or k.startswith("data.") for k in keys), keys


def test_recipe_keys_pretrain_has_architecture():
    result = run_cli("recipe", "keys", "pretrain", "model")
    assert result.exit_code == 0, result.output
    assert "\n  model.init.n_layer  (int; default 4)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("nope",), f"error: unknown stage 'nope' (one of: {', '.join(STAGE_RECIPES)})"),
    (("sfy",), "unknown stage 'sfy'; did you mean 'sft'?"),
    (("sft", "trainig"), "sft recipes have no section 'trainig'; did you mean 'training'? (one of: stage, "),
])
def test_recipe_keys_unknown(args, message):
    result = run_cli("recipe", "keys", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("stage", STAGE_RECIPES)
def test_recipe_keys_of_every_stage_and_section(stage):
    sections = list(STAGE_RECIPES[stage].model_fields)
    outputs = [run_cli("recipe", "keys", stage, *([section] if section else [])) for section in [None, *sections]]
    for section, result in zip([None, *sections], outputs):
        assert result.exit_code == 0, (section, result.output)
        assert "%%" not in result.output, section  # transformers' argparse escaping, printed as `%`
    assert f"\n  {sections[-1]}  (" in outputs[0].stdout  # the whole list
    if stage in ("pretrain", "sft", "reward", "dpo"):  # TrainingArguments' help: "~20% slower training"
        assert "~20% slower" in outputs[1 + sections.index("training")].stdout


def test_ppo_policy_dtype_names_ppos_precision_key():
    result = run_cli("recipe", "keys", "ppo", "policy")
    dtype_help = result.stdout.split("policy.dtype", 1)[1].split("\n\n")[0]
    assert "training.mixed_precision" in dtype_help and "PPO has no training.bf16/fp16" in dtype_help
    assert "training.bf16" in run_cli("recipe", "keys", "sft", "model").stdout


@pytest.mark.parametrize("command", [(), *[(c,) for c in ("pretrain", "sft", "reward", "ppo", "dpo", "eval",
                                                            "pipeline", "plan", "push", "recipe")],
                                     ("recipe", "validate"), ("recipe", "show"), ("recipe", "keys")])
def test_help_texts_print_no_doubled_percent(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "%%" not in result.output


def test_recipe_reference_prints_no_doubled_percent():
    assert "%%" not in (REPO / "docs" / "recipe-reference.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# dry runs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_dry_run_of_tiny_recipes(stage, tmp_path):
    out = tmp_path / "nested" / "out"
    result = run_cli(stage, f"recipes/tiny/{stage}.yaml", "--output-dir", out, "--dry-run",
                     "--set", "training.learning_rate=1e-4")
    assert result.exit_code == 0, result.output
    plan = result.stdout
    assert plan.startswith("dry run: nothing was written\n")
    assert f"  stage       {stage}\n" in plan
    assert f"  recipe      recipes/tiny/{stage}.yaml\n" in plan
    assert f"  output_dir  {out} (new)\n" in plan
    assert "learning_rate=0.0001" in plan
    assert "recipes/tiny/data/" in plan
    assert not out.exists() and not out.parent.exists()


def test_dry_run_over_a_finished_run_plans_and_names_the_flag(tmp_path):
    """The tiny reward recipe dry-run once the reward stage ran (the README's example): not refused, it plans the run
    as --overwrite would make it and says that the run needs that flag."""
    out = tmp_path / "reward"
    out.mkdir()
    (out / ".rlhf-run.json").write_text('{"run_id": "r1", "stage": "reward"}')
    (out / "recipe.resolved.yaml").write_text("stage: reward\n")
    (out / "metrics.json").write_text("{}")
    result = run_cli("reward", "recipes/tiny/reward.yaml", "--output-dir", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"  output_dir  {out} (with --overwrite: holds a run: the new one is built in {tmp_path / '.reward.next'} "
            "and replaces it once finished)\n") in result.stdout
    assert f"\nthe run needs --overwrite: {out} holds a finished run (metrics.json is there)." in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].endswith(" --overwrite")  # the command that runs it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]
    assert sorted(p.name for p in out.iterdir()) == [".rlhf-run.json", "metrics.json", "recipe.resolved.yaml"]


def _batches_row(plan: str) -> str:
    (row,) = [line for line in plan.splitlines() if line.startswith("  batches ")]
    return row.split(None, 1)[1]


@pytest.mark.parametrize("world_size", [None, "2"])
def test_dry_run_batches_of_a_trl_stage_per_device_and_global(tmp_path, monkeypatch, world_size):
    if world_size:  # what torchrun and accelerate launch set
        monkeypatch.setenv("WORLD_SIZE", world_size)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = run_cli("sft", "recipes/tiny/sft.yaml", "--output-dir", tmp_path / "out", "--dry-run",
                     "--set", "training.per_device_train_batch_size=8",
                     "--set", "training.gradient_accumulation_steps=4")
    assert result.exit_code == 0, result.output
    processes, total = ("2 processes (WORLD_SIZE)", 64) if world_size else ("1 process", 32)
    assert _batches_row(result.stdout) == (
        f"8 examples per device (per_device_train_batch_size) x {processes} x 4 gradient accumulation steps = "
        f"{total} examples per optimizer step; 1 epoch")


def test_dry_run_batches_of_ppo_global_and_per_process(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("ppo", "recipes/tiny/ppo.yaml", "--output-dir", tmp_path / "out", "--dry-run",
                     "--set", "training.gradient_accumulation_steps=2")
    assert result.exit_code == 0, result.output
    assert _batches_row(result.stdout) == (
        "64 episodes per update (rollout_batch_size, all processes together) = 32 per process x 2 processes "
        "(WORLD_SIZE); 32 updates; each update: 4 epochs x 4 mini-batches of 16 episodes (8 per process, in 2 "
        "accumulated micro-batches of 4) = 16 optimizer steps; 512 optimizer steps in all")
    # a launch it would not divide across is refused at the key, as the launch itself would
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = run_cli("ppo", "recipes/tiny/ppo.yaml", "--output-dir", tmp_path / "out", "--dry-run")
    assert result.exit_code == 2
    assert "recipes/tiny/ppo.yaml:25: training.rollout_batch_size: with 3 process(es): 64 must be divisible" in \
        result.output


def test_dry_run_of_the_tiny_eval_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "eval"
    result = run_cli("eval", "recipes/tiny/eval.yaml", "--output-dir", out, "--dry-run")
    assert result.exit_code == 0, result.output
    plan = result.stdout
    for row in ("  policy       runs/tiny/ppo\n", "  baseline     runs/tiny/sft\n", "  reward       runs/tiny/reward\n",
                "  sampling     256 held-out prompts at most, up to 24 tokens, temperature 0.7\n",
                "  batches      64 prompts per generation batch on each process x 2 processes (WORLD_SIZE) = 128 "
                "prompts sampled at once\n",
                "  preferences  train: recipes/tiny/data/preferences-train.jsonl.gz; test: "):
        assert row in plan, row
    assert not out.exists()


def test_tiny_eval_recipe_is_the_one_the_tiny_pipeline_builds():
    from rlhf_pipeline.pipeline import plan_stages
    from rlhf_pipeline.recipe.load import load_recipe

    (generated,) = [s.loaded for s in plan_stages(load_recipe("recipes/tiny/pipeline.yaml")) if s.kind == "eval"]
    assert load_recipe("recipes/tiny/eval.yaml").recipe == generated.recipe


def test_dry_run_plan_details(tmp_path, data_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe(
        "reward", out, "some/model", {"files": {"train": str(data_dir / "prefs.jsonl"),
                                                 "test": str(data_dir / "prefs-test.jsonl")},
                                       "eval_split": "test", "columns": {"chosen": "chosen"}},
        peft={"r": 4}))
    result = run_cli("reward", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    plan = result.stdout
    assert "some/model (float32)" in plan
    assert "held-out split 'test'" in plan
    assert "chosen <- chosen" in plan
    assert "LoRA r=4 alpha=32 dropout=0.05 on all-linear; saved merged" in plan
    assert not out.exists()


def test_dry_run_names_a_missing_data_file(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, "m", {"files": str(tmp_path / "no.jsonl")}))
    result = run_cli("sft", recipe, "--dry-run")
    assert result.exit_code == 2
    assert "data.files: no such file" in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# start-up cost: the fast commands never import torch or transformers
# ---------------------------------------------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "trl", "datasets", "peft", "accelerate")

PROBE = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from rlhf_pipeline.cli import app

    report = {}
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(app, args)
        report[" ".join(args)] = {"exit_code": result.exit_code, "output": result.output,
                                  "heavy": sorted(m for m in %r if m in sys.modules)}
    print(json.dumps(report))
""" % (HEAVY,))


def test_fast_commands_import_no_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nouput_dir: x\n")
    commands = [
        ["--help"],
        ["sft", "--help"],
        ["recipe", "validate", "recipes/"],
        ["recipe", "show", "recipes/tiny/sft.yaml"],
        ["recipe", "keys", "sft", "training"],
        ["sft", "recipes/tiny/sft.yaml", "--dry-run", "--output-dir", str(tmp_path / "out")],
        ["dpo", "--help"],
        ["recipe", "keys", "dpo", "training"],
        ["dpo", "recipes/tiny/dpo.yaml", "--dry-run", "--output-dir", str(tmp_path / "out-dpo")],
        ["label", "--help"],
        ["recipe", "keys", "label"],
        ["label", "recipes/tiny/label.yaml", "--dry-run", "--output-dir", str(tmp_path / "out-label")],
        ["sft", str(bad)],
        ["recipes", "list"],
        ["recipes", "copy", "tiny", str(tmp_path / "copy")],
        ["pipeline", "tiny", "--dry-run", "--set", f"output_dir={tmp_path / 'runs'}"],
    ]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for args in commands:
        entry = report[" ".join(args)]
        assert entry["exit_code"] == (2 if args[-1] == str(bad) else 0), entry["output"]
        # checked after each command, in one interpreter: the first one to import torch would show up here
        assert entry["heavy"] == [], f"`rlhf {' '.join(args)}` imported {entry['heavy']}"


def test_console_script_reports_errors_without_traceback(tmp_path):
    """The real entry point (not CliRunner): exit code 2 and a one-line message on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\noutput_dir: out\nmodel: {name_or_path: m}\ndata: {files: d.jsonl}\n"
                   "training:\n  learning_rat: 1\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "recipe", "validate", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"error: {bad}:6: training.learning_rat: unknown key for trl.SFTConfig; "
                           "did you mean 'learning_rate'? Every key: `rlhf recipe keys sft training`\n")
