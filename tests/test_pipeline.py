"""`rlhf pipeline`: wiring, skipping what is up to date, --from / --only / --force, the reward gate."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import FAST_TRAINING, hold_lock, interrupt, run_cli, snapshot, write_pipeline_recipes, write_recipe


@pytest.fixture
def pipeline_dir(tmp_path, data_dir) -> Path:
    """Stage recipes and a pipeline recipe over the tiny fixtures, in one folder (they name each other relatively)."""
    return write_pipeline_recipes(tmp_path, data_dir, dict(FAST_TRAINING), ppo_episodes=8)


def resolved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())


def statuses(output: str) -> dict[str, str]:
    """stage -> ran/skipped, from the summary table."""
    table = output[output.index("pipeline summary"):].splitlines()[3:]
    return {line.split()[0]: line.split()[1] for line in table if line.strip()}


def test_pipeline_wires_runs_and_skips(pipeline_dir):
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    runs = pipeline_dir / "runs"

    dry = run_cli("pipeline", recipe, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing was written" in dry.output and "ppo: policy.name_or_path <- " in dry.output
    assert not runs.exists()

    first = run_cli("pipeline", recipe)
    assert first.exit_code == 0, first.output
    assert statuses(first.output) == dict.fromkeys(["pretrain", "sft", "reward", "ppo", "eval"], "ran")
    # each output feeds the next
    assert resolved(runs / "sft")["model"]["name_or_path"] == str(runs / "pretrain")
    assert resolved(runs / "reward")["model"]["name_or_path"] == str(runs / "sft")
    ppo = resolved(runs / "ppo")
    assert ppo["policy"]["name_or_path"] == str(runs / "sft") and ppo["reward"]["model"] == str(runs / "reward")
    assert ppo["value"]["name_or_path"] == str(runs / "reward")
    evaluation = resolved(runs / "eval")
    assert evaluation["policy"]["name_or_path"] == str(runs / "ppo")
    assert evaluation["baseline"]["name_or_path"] == str(runs / "sft")
    for name in ("eval.json", "eval.md", "eval_score_distributions.png", "eval_gold_vs_sqrt_kl.png",
                 "eval_reward_scores.png", "metrics.json"):
        assert (runs / "eval" / name).is_file(), name
    assert (runs / "pipeline.json").is_file()

    again = run_cli("pipeline", recipe)
    assert again.exit_code == 0, again.output
    assert set(statuses(again.output).values()) == {"skipped"}
    assert "up to date" in again.output

    # an edit to PPO re-runs PPO and what follows, nothing before it
    edited = run_cli("pipeline", recipe, "--set", "stages.ppo.set={training.learning_rate: 0.002}")
    assert edited.exit_code == 0, edited.output
    assert statuses(edited.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "skipped", "ppo": "ran",
                                       "eval": "ran"}
    assert "training.learning_rate" in edited.output
    assert resolved(runs / "ppo")["training"]["learning_rate"] == 0.002

    # a changed input (the reward data) re-runs the reward stage and everything downstream
    with open(pipeline_dir / "prefs.jsonl", "a") as handle:
        handle.write(json.dumps({"prompt": "a", "chosen": " b .", "rejected": " c"}) + "\n")
    changed = run_cli("pipeline", recipe, "--set", "stages.ppo.set={training.learning_rate: 0.002}")
    assert changed.exit_code == 0, changed.output
    assert statuses(changed.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "ran", "ppo": "ran",
                                        "eval": "ran"}
    assert "input changed" in changed.output

    only = run_cli("pipeline", recipe, "--only", "eval", "--set", "stages.ppo.set={training.learning_rate: 0.002}")
    assert only.exit_code == 0, only.output
    assert statuses(only.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "skipped",
                                     "ppo": "skipped", "eval": "ran"}


def test_pipeline_from_and_force_flags(pipeline_dir):
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    refused = run_cli("pipeline", recipe, "--only", "sft")  # the pretrain output it needs does not exist yet
    assert refused.exit_code == 2 and "the pretrain output" in refused.output
    assert not (pipeline_dir / "runs").exists()  # checked before anything ran
    first = run_cli("pipeline", recipe, "--set", "stages={pretrain: {recipe: pretrain.yaml}, "
                                                 "sft: {recipe: sft.yaml}}")
    assert first.exit_code == 0, first.output
    assert statuses(first.output) == {"pretrain": "ran", "sft": "ran"}
    again = run_cli("pipeline", recipe, "--from", "sft", "--set",
                    "stages={pretrain: {recipe: pretrain.yaml}, sft: {recipe: sft.yaml}}")
    assert again.exit_code == 0, again.output
    assert statuses(again.output) == {"pretrain": "skipped", "sft": "ran"}
    forced = run_cli("pipeline", recipe, "--force", "--set",
                     "stages={pretrain: {recipe: pretrain.yaml}, sft: {recipe: sft.yaml}}")
    assert statuses(forced.output) == {"pretrain": "ran", "sft": "ran"}
    assert run_cli("pipeline", recipe, "--from", "ppo", "--set",
                   "stages={pretrain: {recipe: pretrain.yaml}}").exit_code == 2  # not a stage of this pipeline


def test_reward_gate_stops_before_ppo(pipeline_dir):
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    result = run_cli("pipeline", recipe, "--set", "gate.min_reward_accuracy=0.999")
    assert result.exit_code == 3, result.output
    assert "quality gate: the reward model's held-out accuracy is 0." in result.output
    assert "below gate.min_reward_accuracy = 0.999" in result.output and "PPO was not run" in result.output
    runs = pipeline_dir / "runs"
    assert (runs / "reward" / "metrics.json").is_file() and not (runs / "ppo").exists()


def test_pipeline_refuses_what_it_did_not_make(pipeline_dir, tiny_model_dir):
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    foreign = pipeline_dir / "runs" / "pretrain"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    result = run_cli("pipeline", recipe)
    assert result.exit_code == 2 and "not an rlhf run directory" in result.output
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("stages, message", [
    ({"sft": {"recipe": "sft.yaml"}, "pretrain": {"recipe": "pretrain.yaml"}}, "in the order"),
    ({"sft": {"recipe": "missing.yaml"}}, "stages.sft.recipe"),
    ({"reward": {"recipe": "reward.yaml", "init_from": "sft"}}, "stages.reward.init_from"),
    ({"sft": {"recipe": "sft.yaml", "set": {"training.learning_rat": 1}}}, "did you mean 'learning_rate'"),
    ({"sfx": {"recipe": "sft.yaml"}}, "did you mean 'sft'"),
])
def test_bad_pipelines(pipeline_dir, stages, message):
    path = write_recipe(pipeline_dir / "recipes" / "bad.yaml", {"stage": "pipeline", "output_dir": "x",
                                                                 "stages": stages})
    for args in (("pipeline", path), ("recipe", "validate", path)):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (pipeline_dir / "recipes" / "x").exists()


def test_pipeline_pushes_its_models_with_lineage(pipeline_dir, hub):
    """hub.push: sft, reward and ppo go to the (stand-in) Hub upstream first; each card links where it came from."""
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    result = run_cli("pipeline", recipe, "--set", "stages.eval=null", "--set", "hub.repo_prefix=rlhf-test/tiny",
                     "--set", "hub.push=true")
    assert result.exit_code == 0, result.output
    assert set(hub.repos) == {"rlhf-test/tiny-sft", "rlhf-test/tiny-reward", "rlhf-test/tiny-ppo"}
    ppo_files = hub.repos["rlhf-test/tiny-ppo"].files()
    assert {"model.safetensors", "config.json", "metrics.json", "recipe.resolved.yaml", "README.md"} <= set(ppo_files)
    card = ppo_files["README.md"].decode()
    assert f"{hub.url}/rlhf-test/tiny-sft" in card and f"{hub.url}/rlhf-test/tiny-reward" in card
    from conftest import TOKEN

    assert all(TOKEN.encode() not in content for repo in hub.repos.values() for content in repo.files().values())
    assert "push ppo" in result.output and (pipeline_dir / "runs" / "ppo" / "hub.json").is_file()


def interrupt_ppo_in_update_2(pipeline_dir, monkeypatch) -> Path:
    """Run the pipeline with PPO checkpointing every update and stopped (Ctrl-C) in its second update."""
    from rlhf_pipeline.ppo.trainer import PPOTrainer

    ppo = yaml.safe_load((pipeline_dir / "recipes" / "ppo.yaml").read_text())
    ppo["training"].update(total_episodes=16, save_every=1)
    write_recipe(pipeline_dir / "recipes" / "ppo.yaml", ppo)
    original = PPOTrainer._optimise

    def stop_in_update_2(self, *args, **kwargs):
        if self.state.update == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PPOTrainer, "_optimise", stop_in_update_2)
    result = run_cli("pipeline", pipeline_dir / "recipes" / "pipeline.yaml")
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(PPOTrainer, "_optimise", original)
    out = pipeline_dir / "runs" / "ppo"
    assert (out / "checkpoints" / "update-000001").is_dir() and not (out / "metrics.json").exists()
    return out


def test_pipeline_resumes_an_interrupted_stage(pipeline_dir, monkeypatch):
    """A rerun with nothing changed resumes the interrupted PPO stage from its checkpoint (it used to start over,
    deleting the checkpoints), and says so."""
    out = interrupt_ppo_in_update_2(pipeline_dir, monkeypatch)
    pipeline = pipeline_dir / "recipes" / "pipeline.yaml"
    dry = run_cli("pipeline", pipeline, "--dry-run")
    assert any(line.split()[:2] == ["ppo", "resume"] for line in dry.output.splitlines()), dry.output
    result = run_cli("pipeline", pipeline, "--resume")
    assert result.exit_code == 0, result.output
    assert "ppo: resume (the last run stopped; resuming from update-000001)" in result.output
    assert statuses(result.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "skipped",
                                       "ppo": "resumed", "eval": "ran"}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["train/update"] for r in rows] == [1, 2]
    again = run_cli("pipeline", pipeline, "--resume")
    assert again.exit_code == 2 and "no stage of this pipeline holds an interrupted run" in again.output


def test_an_interrupted_stage_whose_recipe_changed_is_started_over(pipeline_dir, monkeypatch):
    """Never skipped, never refused: the interrupted run cannot resume with another recipe, so the stage starts over
    (the interrupted run stays until the new one finishes), and says why."""
    out = interrupt_ppo_in_update_2(pipeline_dir, monkeypatch)
    pipeline = pipeline_dir / "recipes" / "pipeline.yaml"
    result = run_cli("pipeline", pipeline, "--set", "stages.ppo.set.training.learning_rate=0.002")
    assert result.exit_code == 0, result.output
    assert (f"ppo: run (the interrupted run in {out} cannot resume: its recipe differs at training.learning_rate; "
            "starting over)") in result.output
    assert statuses(result.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "skipped", "ppo": "ran",
                                       "eval": "ran"}
    assert (out / "metrics.json").is_file() and "learning_rate: 0.002" in (out / "recipe.resolved.yaml").read_text()


def test_a_failed_rerun_after_an_edit_keeps_the_finished_stage(pipeline_dir, monkeypatch):
    pipeline = pipeline_dir / "recipes" / "pipeline.yaml"
    assert run_cli("pipeline", pipeline).exit_code == 0
    sft = pipeline_dir / "runs" / "sft"
    before = snapshot(sft)
    from transformers import Trainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(Trainer, "train", crash)
    result = run_cli("pipeline", pipeline, "--set", "stages.sft.set.training.learning_rate=0.002")
    assert result.exit_code != 0
    assert snapshot(sft) == before, "the finished SFT run must survive a failed rerun"


def test_pipeline_holds_one_lock(pipeline_dir):
    root = pipeline_dir / "runs"
    holder = hold_lock(root)
    try:
        result = run_cli("pipeline", pipeline_dir / "recipes" / "pipeline.yaml")
        assert result.exit_code == 2 and f"{root} is in use by another rlhf run (pid {holder.pid}" in result.output
        assert not root.exists()
    finally:
        holder.kill()
        holder.wait()


def test_pipeline_compares_several_policies(pipeline_dir):
    """`stages.policies`: PPO-family recipes (rloo, grpo) and a DPO recipe run side by side from the same SFT model,
    each into its own directory; the generated eval compares all of them with the SFT model in one report."""
    folder = pipeline_dir / "recipes"
    ppo = yaml.safe_load((folder / "ppo.yaml").read_text())
    write_recipe(folder / "dpo.yaml", {
        "stage": "dpo", "output_dir": "unused", "model": {"name_or_path": "unused"},
        "data": {"files": {"train": str(pipeline_dir / "prefs.jsonl"), "test": str(pipeline_dir / "prefs-test.jsonl")},
                 "eval_split": "test", "max_train_samples": 8},
        "gold": ppo["gold"], "generation": {"response_length": 8}, "evaluation": {"prompts": 6, "batch_size": 4},
        "training": {**FAST_TRAINING, "max_steps": 2, "beta": 0.5}})
    grpo = {"training.advantage_estimator": "grpo", "generation.samples_per_prompt": 2}
    write_recipe(folder / "compare.yaml", {
        "stage": "pipeline", "output_dir": str(pipeline_dir / "runs"),
        "stages": {"pretrain": {"recipe": "pretrain.yaml"}, "sft": {"recipe": "sft.yaml"},
                   "reward": {"recipe": "reward.yaml"},
                   "policies": {"rloo": {"recipe": "ppo.yaml", "set": {"training.advantage_estimator": "rloo",
                                                                       "generation.samples_per_prompt": 4}},
                                "grpo": {"recipe": "ppo.yaml", "set": grpo},
                                "dpo": {"recipe": "dpo.yaml"}},
                   "eval": {"set": {"num_prompts": 6}}},
        "gate": {"min_reward_accuracy": 0.0}})
    result = run_cli("pipeline", folder / "compare.yaml")
    assert result.exit_code == 0, result.output
    runs = pipeline_dir / "runs"
    assert statuses(result.output) == dict.fromkeys(["pretrain", "sft", "reward", "rloo", "grpo", "dpo", "eval"],
                                                    "ran")
    for name in ("rloo", "grpo"):
        recipe = resolved(runs / name)
        assert recipe["policy"]["name_or_path"] == str(runs / "sft")
        assert recipe["reward"]["model"] == str(runs / "reward")
        assert recipe["value"]["name_or_path"] is None  # no critic: the reward output is not wired into `value`
    assert resolved(runs / "grpo")["training"]["advantage_estimator"] == "grpo"
    dpo = resolved(runs / "dpo")
    assert dpo["model"]["name_or_path"] == str(runs / "sft") and dpo["reward"]["model"] == str(runs / "reward")

    evaluation = resolved(runs / "eval")
    assert evaluation["policies"] == {n: {**evaluation["policies"][n], "name_or_path": str(runs / n)}
                                      for n in ("rloo", "grpo", "dpo")}
    assert evaluation["baseline"]["name_or_path"] == str(runs / "sft")
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    assert metrics["num_prompts"] == 6
    for name, method in (("rloo", "RLOO"), ("grpo", "GRPO"), ("dpo", "DPO")):
        assert metrics[f"{name}_method"] == method
        for key in ("score", "gold", "kl", "win_rate", "gold_win_rate", "train_seconds", "gold_gain_per_minute"):
            assert isinstance(metrics[f"{name}_{key}"], float), (name, key)
    assert "dpo_pairs_per_second" in metrics and "rloo_episodes_per_second" in metrics
    report = (runs / "eval" / "eval.md").read_text()
    assert "| | baseline | rloo | grpo | dpo |" in report and "| method | - | RLOO | GRPO | DPO |" in report
    from rlhf_pipeline.stages.evaluation import seconds

    time_row = next(line for line in report.splitlines() if line.startswith("| training time |"))
    assert time_row == "| training time | - | " + " | ".join(seconds(metrics[f"{n}_train_seconds"])
                                                          for n in ("rloo", "grpo", "dpo")) + " |", time_row
    assert time_row.endswith(" s |") and ".000" not in time_row
    assert "| win rate (gold, 95% interval) | - | " in report
    assert (runs / "eval" / "eval_gold_vs_sqrt_kl.png").read_bytes()[:4] == b"\x89PNG"

    again = run_cli("pipeline", folder / "compare.yaml")  # everything up to date
    assert again.exit_code == 0 and set(statuses(again.output).values()) == {"skipped"}, again.output


@pytest.mark.parametrize("policies, message", [
    ({"sft": {"recipe": "ppo.yaml"}}, "cannot name a policy stage"),
    ({"x": {"recipe": "sft.yaml"}}, "is a `sft` recipe"),
    ({"x": {"recipe": "missing.yaml"}}, "no such file"),
])
def test_bad_policy_stages(pipeline_dir, policies, message):
    recipe = pipeline_dir / "recipes" / "pipeline.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["stages"] = {"sft": data["stages"]["sft"], "policies": policies}
    write_recipe(recipe, data)
    result = run_cli("pipeline", recipe, "--dry-run")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


# ---------------------------------------------------------------------------------------------------------------
# the truth rule (issue 19, item 1): up to date only when the dir holds a finished run with the recipe and inputs of
# now; an interrupted rerun resumed or started over, never skipped; every hint a command that works as printed
# ---------------------------------------------------------------------------------------------------------------
def few_stages(pipeline_dir: Path, *names: str, **sets: dict) -> Path:
    """The fixture pipeline cut to `names`, with `set:` values per stage; written beside the stage recipes."""
    data = yaml.safe_load((pipeline_dir / "recipes" / "pipeline.yaml").read_text())
    data["stages"] = {name: {**data["stages"][name], **({"set": sets[name]} if name in sets else {})}
                      for name in names}
    return write_recipe(pipeline_dir / "recipes" / f"{'-'.join(names)}.yaml", data)


def rows(output: str) -> dict[str, str]:
    """stage -> what a dry run would do."""
    table = output[output.index("dry run: nothing was written"):output.index("wiring:")].splitlines()[3:]
    return {line.split()[0]: line.split()[1] for line in table if line.strip()}


def test_an_interrupted_or_refused_rerun_is_never_up_to_date(pipeline_dir):
    """An edit to SFT, rerun: first refused (a single `rlhf sft` holds the sft dir), then stopped by Ctrl-C in step
    2 (its checkpoint in `.sft.next`, the finished SFT run as it was). Neither makes the stage "up to date": the
    interrupted run resumes with the printed command, run as printed."""
    pipeline = few_stages(pipeline_dir, "pretrain", "sft", sft={"training.save_steps": 1})
    sft = pipeline_dir / "runs" / "sft"
    assert run_cli("pipeline", pipeline).exit_code == 0
    edit = ["--set", "stages.sft.set={training.save_steps: 1, training.learning_rate: 0.002}"]

    holder = hold_lock(sft)
    try:
        refused = run_cli("pipeline", pipeline, *edit)
        assert refused.exit_code == 2 and f"{sft} is in use by another rlhf run (pid {holder.pid}" in refused.output
    finally:
        holder.kill()
        holder.wait()
    assert rows(run_cli("pipeline", pipeline, *edit, "--dry-run").output)["sft"] == "run"

    stopped = interrupt("ctrl-c-at", 2, "pipeline", pipeline, *edit)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert resolved(sft)["training"]["learning_rate"] == 0.001  # the finished run, as it was
    staged = pipeline_dir / "runs" / ".sft.next"
    assert (staged / "checkpoint-2" / ".rlhf-complete").is_file()
    hint = stopped.stderr.strip().splitlines()[-1]
    assert hint == f"resume with: rlhf pipeline {pipeline} --set '{edit[1]}' --resume", hint

    assert rows(run_cli("pipeline", pipeline, *edit, "--dry-run").output)["sft"] == "resume"
    assert rows(run_cli("pipeline", pipeline, "--dry-run").output)["sft"] == "skip"  # the finished run's recipe

    command = shlex.split(hint.removeprefix("resume with: "))
    assert command[:2] == ["rlhf", "pipeline"]
    resumed = run_cli(*command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "sft: resume (the last run stopped; resuming from checkpoint-2)" in resumed.output
    assert statuses(resumed.output) == {"pretrain": "skipped", "sft": "resumed"}
    assert resolved(sft)["training"]["learning_rate"] == 0.002 and not staged.exists()
    assert json.loads((sft / "metrics.json").read_text())["train_steps"] == 3
    again = run_cli("pipeline", pipeline, *edit)
    assert again.exit_code == 0 and set(statuses(again.output).values()) == {"skipped"}, again.output

    # an interrupted rerun that nothing will resume (the edit was undone) is removed, not left with its checkpoints
    other = ["--set", "stages.sft.set={training.save_steps: 1, training.learning_rate: 0.003}"]
    assert interrupt("ctrl-c-at", 2, "pipeline", pipeline, *other).returncode == 130
    assert (staged / "checkpoint-2" / ".rlhf-complete").is_file()
    undone = run_cli("pipeline", pipeline, *edit)
    assert undone.exit_code == 0 and set(statuses(undone.output).values()) == {"skipped"}, undone.output
    assert f"sft: removed the interrupted run in {staged}: nothing will resume it" in undone.output
    assert not staged.exists() and resolved(sft)["training"]["learning_rate"] == 0.002


def test_a_swap_interrupted_in_a_stage_is_recovered_before_deciding(pipeline_dir):
    """A kill between the two renames of a swap leaves the sft run as `.sft.old`: the pipeline completes the swap
    before it decides, so `--only reward` finds the sft output, and a plain rerun retrains nothing."""
    pipeline = few_stages(pipeline_dir, "pretrain", "sft", "reward")
    runs_dir = pipeline_dir / "runs"
    assert run_cli("pipeline", pipeline).exit_code == 0
    os.replace(runs_dir / "sft", runs_dir / ".sft.old")
    dry = run_cli("pipeline", pipeline, "--only", "reward", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert rows(dry.output) == {"pretrain": "skip", "sft": "skip", "reward": "run"}
    assert (runs_dir / ".sft.old").is_dir() and not (runs_dir / "sft").exists()  # a dry run changes nothing
    only = run_cli("pipeline", pipeline, "--only", "reward")
    assert only.exit_code == 0, only.output
    assert statuses(only.output) == {"pretrain": "skipped", "sft": "skipped", "reward": "ran"}
    assert (runs_dir / "sft" / "metrics.json").is_file() and not (runs_dir / ".sft.old").exists()

    os.replace(runs_dir / "sft", runs_dir / ".sft.old")
    assert rows(run_cli("pipeline", pipeline, "--dry-run").output) == dict.fromkeys(["pretrain", "sft", "reward"],
                                                                                     "skip")
    again = run_cli("pipeline", pipeline)
    assert again.exit_code == 0 and set(statuses(again.output).values()) == {"skipped"}, again.output


# ---------------------------------------------------------------------------------------------------------------
# no two stages share or nest output dirs (issue 19, item 2)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, where, message", [
    ("ppo", "sft", "stage ppo would write to {out}, the same as stage sft's output dir"),
    ("ppo", "sft/ppo", "stage ppo would write to {out}, inside stage sft's output dir"),
    ("sft", "pretrain/x", "stage sft would write to {out}, inside stage pretrain's output dir"),
    ("eval", ".", "stage eval would write to {out}, which is the pipeline's own output_dir"),
    ("policies.rloo", "reward", "stage rloo would write to {out}, the same as stage reward's output dir"),
])
def test_stages_never_share_or_nest_output_dirs(pipeline_dir, stage, where, message):
    """Refused by `recipe validate`, `--dry-run` and the run itself, before anything is written (a policy stage set
    to write to <root>/sft used to replace the SFT model)."""
    path = pipeline_dir / "recipes" / "pipeline.yaml"
    data = yaml.safe_load(path.read_text())
    out = str(Path(data["output_dir"]) / where) if where != "." else data["output_dir"]
    if stage.startswith("policies."):
        evaluation = data["stages"].pop("eval")  # listed in the order they run: policies before eval
        data["stages"]["policies"] = {stage.split(".")[1]: {"recipe": "ppo.yaml", "set": {"output_dir": out}}}
        data["stages"]["eval"] = evaluation
    else:
        data["stages"][stage]["set"] = {"output_dir": out}
    write_recipe(path, data)
    key = f"stages.{stage}.set.output_dir"
    for args in (("recipe", "validate", path), ("pipeline", path, "--dry-run"), ("pipeline", path)):
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert f"{key}: {message.format(out=out)}" in result.output and "Traceback" not in result.output
    assert not (pipeline_dir / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# one process, several stages (issue 19, item 11): each stage with the mixed precision it has alone
# ---------------------------------------------------------------------------------------------------------------
def test_trainer_stages_and_ppo_with_different_mixed_precision(pipeline_dir, tiny_model_dir, tiny_reward_dir,
                                                               monkeypatch):
    """Under `accelerate launch --mixed_precision bf16` the SFT Trainer takes bf16 from ACCELERATE_MIXED_PRECISION
    (its recipe does not say) while PPO's recipe says `no`: PPO's Accelerator used to meet the Trainer's
    AcceleratorState and crash ("AcceleratorState has already been initialized and cannot be changed")."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    pipeline = few_stages(pipeline_dir, "sft", "ppo", sft={"model.name_or_path": str(tiny_model_dir)},
                          ppo={"reward.model": str(tiny_reward_dir)})
    result = run_cli("pipeline", pipeline)
    assert result.exit_code == 0, result.output
    assert statuses(result.output) == {"sft": "ran", "ppo": "ran"}
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "no"  # PPO's own, as `rlhf ppo` alone would run


def printed_command(output: str, after: str) -> list[str]:
    """The `rlhf ...` command a message printed between backquotes after `after`, split as a shell would."""
    start = output.index(after) + len(after)
    return shlex.split(output[output.index("`", start) + 1:output.index("`", output.index("`", start) + 1)])


def test_runs_the_pipeline_did_not_make_are_kept_and_the_hints_work_as_printed(pipeline_dir):
    """A single-stage run in a stage's dir is never replaced unasked: a finished one with another recipe, or an
    interrupted replacement, stops the pipeline with the commands that resolve it, which work as printed."""
    pipeline = few_stages(pipeline_dir, "pretrain", "sft")
    sft = pipeline_dir / "runs" / "sft"
    assert run_cli("pipeline", pipeline).exit_code == 0
    own = ["--set", "training.learning_rate=0.005", "--set", "training.save_steps=1"]
    assert run_cli("sft", sft / "recipe.resolved.yaml", "--overwrite", *own).exit_code == 0
    refused = run_cli("pipeline", pipeline)
    assert refused.exit_code == 2 and "holds a finished run that this pipeline did not make" in refused.output
    command = printed_command(refused.output, "replace it with ")
    assert command == ["rlhf", "pipeline", str(pipeline), "--from", "sft"]
    dry = run_cli("pipeline", pipeline, "--dry-run")  # never refuses: plans as with the flag, and names it
    assert dry.exit_code == 0 and rows(dry.output) == {"pretrain": "skip", "sft": "run"}, dry.output
    assert "the run needs --from sft (stage sft): " in dry.output and "did not make" in dry.output
    assert dry.output.rstrip().endswith(f"\n  rlhf pipeline {pipeline} --from sft")
    replaced = run_cli(*command[1:])
    assert replaced.exit_code == 0 and statuses(replaced.output) == {"pretrain": "skipped", "sft": "ran"}

    stopped = interrupt("ctrl-c-at", 2, "sft", sft / "recipe.resolved.yaml", "--overwrite", *own)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    staged = pipeline_dir / "runs" / ".sft.next"
    before = snapshot(staged)
    edit = ["--set", "stages.sft.set.training.learning_rate=0.002"]
    refused = run_cli("pipeline", pipeline, *edit)
    assert refused.exit_code == 2 and f"{staged} holds an interrupted run (checkpoint checkpoint-2) that this " \
        "pipeline did not start" in refused.output, refused.output
    assert snapshot(staged) == before
    dry = run_cli("pipeline", pipeline, *edit, "--dry-run")
    assert dry.exit_code == 0 and rows(dry.output) == {"pretrain": "skip", "sft": "run"}, dry.output
    assert "the run needs --from sft (stage sft): " in dry.output and "did not start" in dry.output
    assert snapshot(staged) == before
    command = printed_command(refused.output, "finish it with ")
    assert command == ["rlhf", "sft", str(staged / "recipe.resolved.yaml"), "--resume", "--overwrite"]
    finished = run_cli(*command[1:])
    assert finished.exit_code == 0, finished.output
    assert resolved(sft)["training"]["learning_rate"] == 0.005 and not staged.exists()


def test_a_record_written_before_runs_had_ids_still_counts(tmp_path):
    """pipeline.json as earlier versions wrote it (one entry per stage, `finished` once it ran through): it still
    describes the finished run in the dir when the recipes agree, so an upgrade re-runs nothing; an unfinished entry
    (the rerun that used to make a stage look up to date) describes nothing."""
    from rlhf_pipeline import runs
    from rlhf_pipeline.pipeline import _recorded_inputs

    run = tmp_path / "sft"
    run.mkdir()
    (run / runs.MARKER_FILE).write_text(json.dumps({"run_id": "abc", "stage": "sft"}))
    (run / runs.RECIPE_FILE).write_text("stage: sft\nseed: 0\nprovenance: {created: now}\n")
    (run / runs.METRICS_FILE).write_text("{}")
    entry = {"recipe": {"stage": "sft", "seed": 0}, "inputs": {"data.jsonl": "f1"}, "output_dir": str(run),
             "finished": True}
    assert _recorded_inputs({"stages": {"sft": entry}}, "sft", run) == {"data.jsonl": "f1"}
    assert _recorded_inputs({"stages": {"sft": {**entry, "finished": False}}}, "sft", run) is None
    assert _recorded_inputs({"stages": {"sft": {**entry, "recipe": {"stage": "sft", "seed": 1}}}}, "sft", run) is None
    assert _recorded_inputs({"stages": {"sft": {"runs": {"abc": {"x": "1"}}}}}, "sft", run) == {"x": "1"}
    assert _recorded_inputs({"stages": {"sft": {"runs": {"other": {"x": "1"}}}}}, "sft", run) is None
