"""Bad input that used to end in a traceback or a misleading message: each is now one clear error naming the file
and the key, exit code 2, and nothing left behind."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest
from conftest import FAST_TRAINING, ppo_recipe, run_cli, stage_recipe, write_jsonl, write_recipe

from rlhf_pipeline import models
from rlhf_pipeline.recipe.schema import LoraSection, ModelSection, ReferenceSection, RewardSource


def assert_clean_error(result, expected: list[str], out=None, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    if out is not None:
        assert not out.exists(), sorted(p.name for p in out.iterdir())
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no lock, no staging


# ---------------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"stage: sft\n\x00\x01\x02garbage\x00", "not a YAML text file: it holds NUL bytes"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a YAML text file: byte 0x89 at offset 0 is not UTF-8"),
    (b"stage: sft\nseed: \x07\n", "invalid YAML"),
])
@pytest.mark.parametrize("command", [("sft",), ("recipe", "validate"), ("sft", "--dry-run")])
def test_a_recipe_that_is_not_yaml_text(tmp_path, content, message, command):
    path = tmp_path / "garbage.yaml"
    path.write_bytes(content)
    args = (*command[:2], path) if command[0] == "recipe" else (command[0], path, *command[1:])
    assert_clean_error(run_cli(*args), [str(path), message])


@pytest.mark.parametrize("stage, key, value, expected", [
    ("sft", "learning_rate", ".nan", "expected a finite number (got nan)"),
    ("sft", "learning_rate", "-1e-4", "expected a finite number >= 0 (got -0.0001)"),
    ("reward", "per_device_train_batch_size", "0", "expected at least 1 (got 0)"),
    ("pretrain", "per_device_train_batch_size", "-4", "expected at least 1 (got -4)"),
    ("sft", "max_steps", "0", "expected -1 (train num_train_epochs) or at least 1 (got 0)"),
    ("sft", "num_train_epochs", ".inf", "expected a finite number (got inf)"),
    ("reward", "gradient_accumulation_steps", "0", "expected at least 1"),
])
def test_training_values_that_cannot_train_are_refused_at_validation(tmp_path, tiny_model_dir, data_dir, stage, key,
                                                                     value, expected):
    out = tmp_path / "out"
    data = {"pretrain": {"files": str(data_dir / "text.jsonl")}, "sft": {"files": str(data_dir / "sft.jsonl")},
            "reward": {"files": str(data_dir / "prefs.jsonl"), "eval_size": 8}}[stage]
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe(stage, out, tiny_model_dir, data))
    for flags in ((), ("--dry-run",)):
        assert_clean_error(run_cli(stage, recipe, "--set", f"training.{key}={value}", *flags),
                           [f"training.{key}: {expected}"], out)


def test_zero_epochs_and_no_max_steps_trains_nothing(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    training = {k: v for k, v in FAST_TRAINING.items() if k != "max_steps"}
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                            {"files": str(data_dir / "sft.jsonl")},
                                                            training={**training, "num_train_epochs": 0}))
    assert_clean_error(run_cli("sft", recipe), ["training.num_train_epochs: 0 epochs and no max_steps"], out)


@pytest.mark.parametrize("key, value", [("learning_rate", ".inf"), ("kl_coef", ".nan"), ("cliprange", ".inf")])
def test_ppo_numbers_must_be_finite(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, key, value):
    out = tmp_path / "ppo"
    recipe = write_recipe(tmp_path / "ppo.yaml", ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)},
                                                            data_dir))
    assert_clean_error(run_cli("ppo", recipe, "--set", f"training.{key}={value}"), [f"training.{key}"], out)


def test_errors_a_trainer_raises_while_being_built_name_the_training_section(tmp_path, tiny_model_dir, data_dir,
                                                                              monkeypatch):
    from trl import SFTTrainer

    def refuse(self, *args, **kwargs):
        raise ValueError("`packing` is not supported with this collator")

    monkeypatch.setattr(SFTTrainer, "__init__", refuse)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                            {"files": str(data_dir / "sft.jsonl")}))
    assert_clean_error(run_cli("sft", recipe), ["training: the trainer rejected these settings: ValueError: "
                                                "`packing` is not supported"], out)


# ---------------------------------------------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------------------------------------------
def sft_with(tmp_path, model, path):
    out = tmp_path / "out"
    return write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, model, {"files": str(path)})), out


def test_data_file_not_utf8(tmp_path, tiny_model_dir):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"data.files: split 'train': {path}:2: not UTF-8 text (byte 0xe9 at "
                                                "column 14)"], out)


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.jsonl", b"\n\n  \n"),
                                           ("empty.csv", b"")])
def test_empty_data_file(tmp_path, tiny_model_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"{path} is empty: no rows"], out)


def test_empty_gzipped_data_file(tmp_path, tiny_model_dir):
    path = tmp_path / "empty.jsonl.gz"
    with gzip.open(path, "wb"):
        pass
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"{path} is empty"], out)


def test_malformed_json_line_is_named(tmp_path, tiny_model_dir):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n{"text": "four"}\n')
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"{path}:3: not JSON: Unterminated string starting at (column 10)"],
                       out)


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a", "completion": None}] * 4, "the train data's `completion` column holds null values"),
    ([{"prompt": "a", "completion": "b"}] * 4 + [{"text": "c"}] * 4, "4 of 8 rows have no `prompt` (null or absent)"),
    ([{"prompt": i, "completion": "b"} for i in range(4)], "`prompt` column holds int64 values; expected text or a "
                                                           "list of messages"),
    ([{"messages": "hello"}] * 4, "`messages` column holds string values; expected a list of messages"),
])
def test_row_values_that_are_not_text_are_named(tmp_path, tiny_model_dir, rows, expected):
    """A null, a number or a string of messages used to fail deep inside TRL ("'NoneType' object has no attribute
    'endswith'", "No columns in the dataset match", "the trainer rejected these settings")."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"{recipe}:", "data: ", expected], out)


def test_corrupt_gzip(tmp_path, tiny_model_dir):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    recipe, out = sft_with(tmp_path, tiny_model_dir, path)
    assert_clean_error(run_cli("sft", recipe), [f"{path}: cannot be read"], out)


# ---------------------------------------------------------------------------------------------------------------
# reward functions
# ---------------------------------------------------------------------------------------------------------------
REWARD_MODULES = {
    "raises": "def reward(prompts, responses):\n    return [len(r) / 0 for r in responses]\n",
    "nan": "def reward(prompts, responses):\n    return [float('nan')] + [1.0] * (len(responses) - 1)\n",
    "short": "def reward(prompts, responses):\n    return [1.0]\n",
    "not-numbers": "def reward(prompts, responses):\n    return ['good'] * len(responses)\n",
    "exits": "def reward(prompts, responses):\n    raise SystemExit(3)\n",
    "exits-on-import": "import sys\nsys.exit('usage: reward.py FILE')\n\ndef reward(prompts, responses):\n"
                       "    return [0.0] * len(responses)\n",
}


@pytest.mark.parametrize("kind, expected", [
    ("raises", ["raised ZeroDivisionError: division by zero", "held-out evaluation"]),
    ("nan", ["returned 1 score(s) that are not finite in float32", "e.g. nan for response 0", "a batch of"]),
    ("short", ["returned 1 scores for 4 responses"]),
    ("not-numbers", ["returned text, not a number, for response 0 ('good')"]),
    ("exits", ["raised SystemExit: 3"]),
    ("exits-on-import", ["called sys.exit('usage: reward.py FILE')", "reward.function"]),
])
def test_a_bad_reward_function_is_named_and_leaves_nothing(tmp_path, tiny_model_dir, data_dir, kind, expected):
    module = tmp_path / f"reward_{kind.replace('-', '_')}.py"
    module.write_text(REWARD_MODULES[kind])
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": f"{module}:reward"}, data_dir)
    recipe["value"] = {"mode": "shared"}
    result = run_cli("ppo", write_recipe(tmp_path / "ppo.yaml", recipe))
    names = [f"{module}:reward"]
    assert_clean_error(result, names + expected, out)


def test_os_exit_in_a_reward_function_is_not_an_exit_0(tmp_path, tiny_model_dir, data_dir):
    """os._exit(0) inside the function used to end the process at once, exit status 0, the run unfinished and
    nothing said. (Run as a process of its own: in this one, the unguarded call would end pytest.)"""
    import subprocess
    import sys

    module = tmp_path / "quits.py"
    module.write_text("import os\n\ndef reward(prompts, responses):\n    os._exit(0)\n")
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": f"{module}:reward"}, data_dir)
    recipe["value"] = {"mode": "shared"}
    done = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "ppo", str(write_recipe(tmp_path / "ppo.yaml",
                                                                                          recipe))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"reward function {module}:reward called os._exit(0)" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_reward_function_failing_mid_training_names_the_update(tmp_path, tiny_model_dir, data_dir):
    module = tmp_path / "late.py"
    module.write_text("calls = 0\n\ndef reward(prompts, responses):\n    global calls\n    calls += 1\n"
                      "    if calls == 4:\n        raise ValueError('the judge is down')\n"
                      "    return [1.0] * len(responses)\n")
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": f"{module}:reward"}, data_dir)
    recipe["value"] = {"mode": "shared"}
    result = run_cli("ppo", write_recipe(tmp_path / "ppo.yaml", recipe))
    # calls: 2 for the held-out evaluation (8 prompts, batches of 4), then update 1, then update 2
    assert_clean_error(result, [f"{module}:reward raised ValueError: the judge is down (update 2 of 2, a batch of "
                                "8 responses)"], out)


def test_a_diverging_update_saves_nothing_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, data_dir):
    """Scores finite in float32 but huge (1e30) overflow in the advantages: the loss goes NaN. The run stops at that
    update with a message, before any checkpoint is written from the NaN weights; the checkpoint of update 1 stays,
    finite, to resume from (it used to be followed by a NaN checkpoint and a RuntimeError from sampling)."""
    from safetensors.torch import load_file

    module = tmp_path / "huge.py"
    module.write_text("calls = 0\n\ndef reward(prompts, responses):\n    global calls\n    calls += 1\n"
                      "    if calls < 4:\n        return [1.0] * len(responses)\n"
                      "    return [1e30 * (i % 2) for i in range(len(responses))]\n")
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"function": f"{module}:reward"}, data_dir, total_episodes=24,
                        save_every=1)
    recipe["value"] = {"mode": "shared"}
    result = run_cli("ppo", write_recipe(tmp_path / "ppo.yaml", recipe))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "update 2: loss/policy is nan: training diverged" in result.output and "nothing of this update is saved" \
        in result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["update-000001"]
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / "update-000001" / "model.safetensors")
               .values())
    assert not (out / "metrics.json").exists()


def test_a_chat_template_the_sandbox_refuses_names_the_key(tmp_path, tiny_model_dir, data_dir):
    """A template reaching for `__class__` is a jinja2 SecurityError as it is applied to the data: one line about
    tokenizer.chat_template, nothing left behind."""
    out = tmp_path / "out"
    template = "{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, tiny_model_dir,
                                                            {"files": str(data_dir / "chat.jsonl")},
                                                            tokenizer={"chat_template": template}))
    assert_clean_error(run_cli("sft", recipe), ["tokenizer.chat_template: the chat template failed as it was applied: "
                                                "SecurityError: access to attribute '__class__' of 'str' object is "
                                                "unsafe"], out)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, expected", [
    ({"config.json": b"[1, 2]"}, "cannot load a tokenizer from"),
    ({"config.json": b'{"model_type": "gpt2", "n_layer": "x"}'}, "Validation error for field 'n_layer': TypeError"),
    ({"tokenizer.json": b"[1]"}, "cannot load a tokenizer from"),
    ({"model.safetensors": b"not safetensors"}, "cannot load a model from"),
    ({"config.json": None, "adapter_config.json": b"{nope"}, "cannot load a model from"),
])
def test_a_damaged_model_folder_is_named(tmp_path, tiny_model_dir, data_dir, damage, expected):
    """Files of a model folder that are not what they claim (they used to end in TypeError, SafetensorError or
    JSONDecodeError tracebacks): one line naming the key that points at the folder."""
    import shutil

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    for name, content in damage.items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, folder, {"files": str(data_dir / "sft.jsonl")}))
    assert_clean_error(run_cli("sft", recipe), ["model.name_or_path:", expected, str(folder)], out)


@pytest.mark.parametrize("path", ["./runs/tiny/sfft", "runs/tiny/sfft", "/nonexistent/model", "tests/no-such-model"])
def test_a_mistyped_local_model_path_is_missing_at_once(tmp_path, data_dir, path):
    """Not tried as a Hub id (which retries for about 50 s): a path-like name that does not exist is an error now."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", stage_recipe("sft", out, path, {"files": str(data_dir / "sft.jsonl")}))
    started = time.perf_counter()
    assert_clean_error(run_cli("sft", recipe), [f"model.name_or_path: no such directory: {path}"], out)
    assert time.perf_counter() - started < 30


def test_hub_ids_still_look_like_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not models.looks_like_a_path("gpt2") and not models.looks_like_a_path("openai-community/gpt2")
    (tmp_path / "openai-community").mkdir()  # a local folder of that name: then it is a path
    assert models.looks_like_a_path("openai-community/gpt2")


@pytest.mark.parametrize("section, key", [("policy", "policy.name_or_path"), ("reward", "reward.model"),
                                          ("reference", "reference.name_or_path"), ("value", "value.name_or_path")])
def test_ppo_model_errors_name_the_real_key(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir, section, key):
    out = tmp_path / "ppo"
    recipe = ppo_recipe(out, tiny_model_dir, {"model": str(tiny_reward_dir)}, data_dir)
    missing = str(tmp_path / "missing-model")
    if section == "reward":
        recipe["reward"] = {"model": missing}
    else:
        recipe[section] = {"name_or_path": missing}
    result = run_cli("ppo", write_recipe(tmp_path / "ppo.yaml", recipe))
    assert_clean_error(result, [f"{key}: no such directory: {missing}"], out)
    assert "model.name_or_path" not in result.output.replace(key, "")


def test_each_model_section_decides_its_own_remote_code():
    """trust_remote_code (and revision) come from the section that names a repository, not from the policy's."""
    policy = ModelSection(name_or_path="org/policy", trust_remote_code=True, revision="v1", dtype="bfloat16")
    reference = models.section_for(policy, "other/reference", ReferenceSection(name_or_path="other/reference"))
    assert (reference.trust_remote_code, reference.revision, reference.dtype) == (False, None, "bfloat16")
    value = models.section_for(policy, "org/rm", RewardSource(model="org/rm"))
    assert value.trust_remote_code is False
    same_repo = models.section_for(policy, "org/policy")  # the policy's own repository keeps the policy's settings
    assert (same_repo.trust_remote_code, same_repo.revision) == (True, "v1")
    assert LoraSection().dropout == 0.05  # (the PPO tests switch this off after the adapters exist)


def test_tokenizer_from_another_repository_does_not_inherit_remote_code(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from rlhf_pipeline.recipe.load import load_recipe
    from rlhf_pipeline.recipe.schema import TokenizerSection

    seen = []
    real = AutoTokenizer.from_pretrained

    def spy(source, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(source, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", stage_recipe("sft", tmp_path / "o", tiny_model_dir,
                                                                        {"files": str(tmp_path / "d.jsonl")})))
    trusting = ModelSection(name_or_path=str(tiny_model_dir), trust_remote_code=True)
    models.load_tokenizer(loaded, TokenizerSection(name_or_path=str(tiny_model_dir)), trusting)
    models.load_tokenizer(loaded, TokenizerSection(), trusting)
    assert seen == [False, True]
