"""bench/rloo_vs_trl.py: its --help runs and the recipes it writes for `rlhf ppo` validate (no training)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipeline.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "rloo_vs_trl.py"


def _bench():
    spec = importlib.util.spec_from_file_location("rloo_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "--methods" in out.stdout and "--repeats" in out.stdout


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "gae"])
def test_written_recipe_validates(tmp_path, estimator):
    bench = _bench()
    path = tmp_path / "recipe.yaml"
    bench.write_recipe(path, tmp_path / "models", estimator, seed=0, out_dir=tmp_path / "out")
    recipe = load_recipe(path, expected_stage="ppo").recipe
    work = bench.WORK
    assert recipe.training.advantage_estimator == estimator
    assert recipe.training.total_episodes == work["total_episodes"]
    assert recipe.training.missing_eos_penalty is None  # the penalty lives in the shared reward function
    assert recipe.reward.function.endswith("bench/tiny_reward.py:reward")
    assert recipe.generation.samples_per_prompt == (1 if estimator == "gae" else work["samples_per_prompt"])
    if estimator == "rloo":
        assert recipe.training.whiten_advantages is False and recipe.training.kl_estimator == "k1"
