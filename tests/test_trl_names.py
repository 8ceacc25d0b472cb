"""What a TRL user writes: TRL's names lead to ours (one suggestion, then where to read every key), and batch sizes
that do not divide are refused at the key to change, with the nearest values that fit."""

from __future__ import annotations

import pytest
from conftest import REPO, run_cli

from rlhf_pipeline.errors import KeyedValueError, RecipeError
from rlhf_pipeline.ppo.plan import BatchPlan, nearest_multiples
from rlhf_pipeline.recipe.load import load_recipe
from rlhf_pipeline.recipe.schema import STAGE_RECIPES
from rlhf_pipeline.recipe.suggest import trl_alias
from rlhf_pipeline.recipe.training_fields import CONFIG_CLASSES, fields_for
from rlhf_pipeline.recipe.trl_names import ANY, TRL_NAMES

TRAINED = ("pretrain", "sft", "reward", "ppo", "dpo")  # the stages with a recipe in recipes/tiny and a `training:`


def problem_at(stage: str, key: str, value: str = "1"):
    """The one problem `--set key=value` causes in the tiny recipe of `stage`."""
    with pytest.raises(RecipeError) as caught:
        load_recipe(REPO / "recipes" / "tiny" / f"{stage}.yaml", [f"{key}={value}"])
    found = [p for p in caught.value.problems if p.key == key]
    assert len(found) == 1, caught.value.problems
    return found[0]


def test_every_entry_leads_to_a_key_that_exists():
    for name, entry in TRL_NAMES.items():
        for stage in entry.keys() - {ANY}:
            assert trl_alias(stage, name) is not None, f"{name} for {stage}: {entry[stage].key} is no {stage} key"
        assert any(trl_alias(stage, name) for stage in STAGE_RECIPES), f"{name} leads nowhere"
        for stage in STAGE_RECIPES:  # an alias is never a key already accepted where it points
            alias = trl_alias(stage, name)
            if alias and alias.key and alias.key.startswith("training.") and stage in CONFIG_CLASSES:
                assert name not in fields_for(stage), (stage, name)


UNDER_TRAINING = [(stage, name) for stage in TRAINED for name in TRL_NAMES if trl_alias(stage, name)]


@pytest.mark.parametrize("stage,name", UNDER_TRAINING, ids=[f"{s}-{n}" for s, n in UNDER_TRAINING])
def test_each_trl_name_under_training_names_our_key_once(stage, name):
    alias = trl_alias(stage, name)
    message = problem_at(stage, f"training.{name}").message
    if stage in CONFIG_CLASSES and name in fields_for(stage):  # a field of TRL's config that we set elsewhere
        assert message == f"not set here: {f'set `{alias.key}`' if alias.key else alias.note}" + (
            f" ({alias.note})" if alias.key and alias.note else "")
        return
    assert message.count("did you mean") == (1 if alias.key else 0) and "allowed here" not in message
    if alias.key:
        assert f"did you mean '{alias.key.removeprefix('training.')}'?" in message
    assert alias.note in message
    assert message.endswith(f"Every key: `rlhf recipe keys {stage} training`")


@pytest.mark.parametrize("stage,name,expected", [
    ("ppo", "local_rollout_forward_batch_size", "did you mean 'forward_batch_size'?"),  # fuzzy said rollout_batch_size
    ("ppo", "per_device_train_batch_size", "did you mean 'rollout_batch_size'? (TRL counts per device; "
                                           "rollout_batch_size counts all processes together: per_device_train_batch_"
                                           "size x gradient_accumulation_steps x num_mini_batches x processes)"),
    ("ppo", "bf16", "did you mean 'mixed_precision'? (`mixed_precision: bf16`"),
    ("ppo", "fp16", "did you mean 'mixed_precision'? (`mixed_precision: fp16`"),
    ("ppo", "response_length", "did you mean 'generation.response_length'?"),
    ("ppo", "push_to_hub", "did you mean 'hub.push'?"),
    ("ppo", "hub_model_id", "did you mean 'hub.repo_id'?"),
    ("ppo", "lora_alpha", "did you mean 'peft.alpha'?"),
    ("ppo", "lora_r", "did you mean 'peft.r'?"),
    ("ppo", "lora_dropout", "did you mean 'peft.dropout'?"),
    ("ppo", "target_modules", "did you mean 'peft.target_modules'?"),
    ("ppo", "num_generations", "did you mean 'generation.samples_per_prompt'?"),
    ("ppo", "temperature", "did you mean 'generation.temperature'?"),  # the same name in another section
    ("ppo", "trust_remote_code", "did you mean 'policy.trust_remote_code'?"),
    ("sft", "lora_alpha", "unknown key for trl.SFTConfig; did you mean 'peft.alpha'?"),
    ("sft", "max_seq_length", "unknown key for trl.SFTConfig; did you mean 'max_length'?"),
    ("pretrain", "max_seq_length", "did you mean 'data.block_size'?"),
    ("sft", "mixed_precision", "did you mean 'bf16'? (TRL's flags: `bf16: true` or `fp16: true`)"),
    ("dpo", "response_length", "did you mean 'generation.response_length'?"),
    ("dpo", "max_prompt_length", "did you mean 'max_length'? (TRL 1.x cuts prompt and response together"),
    ("sft", "hub_model_id", "not set here: set `hub.repo_id`"),
    ("reward", "trust_remote_code", "not set here: set `model.trust_remote_code`"),
])
def test_trl_names_the_brief_lists(stage, name, expected):
    assert expected in problem_at(stage, f"training.{name}").message


@pytest.mark.parametrize("stage,key,expected", [  # the flat files of `trl sft --config`: ModelConfig, ScriptArguments
    ("sft", "model_name_or_path", "model.name_or_path"),
    ("ppo", "model_name_or_path", "policy.name_or_path"),
    ("sft", "learning_rate", "training.learning_rate"),
    ("ppo", "learning_rate", "training.learning_rate"),
    ("dpo", "dataset_name", "data.dataset"),
    ("reward", "lora_alpha", "peft.alpha"),
    ("sft", "torch_dtype", "model.dtype"),
    ("ppo", "torch_dtype", "policy.dtype"),
])
def test_flat_trl_config_keys_at_the_top_level(stage, key, expected):
    message = problem_at(stage, key).message
    assert message == f"unknown key; did you mean '{expected}'? Every key: `rlhf recipe keys {stage}`"


def test_message_shape_without_and_with_a_suggestion():
    assert problem_at("sft", "data.whatever").message == "unknown key. Every key: `rlhf recipe keys sft data`"
    assert problem_at("sft", "peft.lora_alpha").message == (
        "unknown key; did you mean 'alpha'? Every key: `rlhf recipe keys sft peft`")
    assert problem_at("ppo", "training.hub_token").message == (
        "unknown key: tokens never go in recipes: set HF_TOKEN or run `hf auth login`. Every key: "
        "`rlhf recipe keys ppo training`")


def test_cli_points_at_the_line_of_a_trl_name(tmp_path):
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes/tiny/ppo.yaml'}\ntraining:\n  bf16: true\n"
                      "  local_rollout_forward_batch_size: 4\n")
    result = run_cli("recipe", "validate", recipe)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 2 problems in the recipe:"
    assert lines[1] == (f"  {recipe}:3: training.bf16: unknown key; did you mean 'mixed_precision'? (`mixed_precision"
                        ": bf16`: one key for bf16 and fp16). Every key: `rlhf recipe keys ppo training`")
    assert lines[2] == (f"  {recipe}:4: training.local_rollout_forward_batch_size: unknown key; did you mean "
                        "'forward_batch_size'? Every key: `rlhf recipe keys ppo training`")


# ---------------------------------------------------------------------------------------------------------------
# batch sizes that do not divide
# ---------------------------------------------------------------------------------------------------------------
def test_nearest_multiples():
    assert nearest_multiples(10000, 64) == [9984, 10048]
    assert nearest_multiples(10, 64) == [64]


def test_batch_plan_names_each_key_to_change():
    with pytest.raises(KeyedValueError) as caught:
        BatchPlan(10001, 100, 3, 1, 1)
    assert [key for key, _ in caught.value.problems] == ["total_episodes", "rollout_batch_size"]
    with pytest.raises(KeyedValueError) as caught:
        BatchPlan(128, 64, 4, 1, 1, num_processes=2, samples_per_prompt=3)
    (key, message), = caught.value.problems
    assert key == "samples_per_prompt"
    assert "(64 / 2 process(es) = 32) must be a multiple of samples_per_prompt (3)" in message
    assert message.endswith("samples_per_prompt 2 or 4 fits, or rollout_batch_size 48 or 72")


@pytest.mark.parametrize("lines,key,line,expected", [
    ("  total_episodes: 10000\n", "training.total_episodes", 3,
     "10000 must be a multiple of rollout_batch_size (64, the episodes of one update); the nearest that are: 9984 "
     "(156 updates) or 10048 (157 updates)"),
    ("  num_mini_batches: 3\n", "training.rollout_batch_size", None,
     "64 must be divisible by processes (1) x num_mini_batches (3) x gradient_accumulation_steps (1) = 3 (equal "
     "micro-batches); the nearest values that are: 63 or 66"),
    ("  rollout_batch_size: 128\n  gradient_accumulation_steps: 3\n", "training.rollout_batch_size", 3,
     "128 must be divisible by processes (1) x num_mini_batches (4) x gradient_accumulation_steps (3) = 12 (equal "
     "micro-batches); the nearest values that are: 120 or 132"),
    ("  advantage_estimator: rloo\ngeneration:\n  samples_per_prompt: 3\n", "generation.samples_per_prompt", 5,
     "each process's share of rollout_batch_size (64 / 1 process(es) = 64) must be a multiple of samples_per_prompt "
     "(3): a prompt's responses are sampled and compared in one process; samples_per_prompt 2 or 4 fits, or "
     "rollout_batch_size 60 or 72"),
])
def test_batch_errors_point_at_the_key(tmp_path, lines, key, line, expected):
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes/tiny/ppo.yaml'}\ntraining:\n{lines}")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    (problem,) = caught.value.problems
    assert (problem.key, problem.message) == (key, expected)
    # the line of the key itself; rollout_batch_size, set only in the parent, is found there
    assert (problem.file, problem.line) == ((str(recipe), line) if line else
                                            (str(REPO / "recipes/tiny/ppo.yaml"), 25))
