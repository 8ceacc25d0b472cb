"""Generated files are up to date: the training-field snapshot and the recipe reference."""

from __future__ import annotations

import json

from conftest import REPO

from rlhf_pipeline.recipe import training_fields
from rlhf_pipeline.recipe.reference import markdown_reference
from rlhf_pipeline.recipe.schema import STAGE_RECIPES


def test_training_fields_snapshot_matches_installed_libraries():
    committed = json.loads(training_fields.SNAPSHOT.read_text())
    current = training_fields.take_snapshot()
    regenerate = "regenerate it with `python -m rlhf_pipeline.recipe.training_fields` and commit the result"
    assert committed["versions"] == current["versions"], f"taken from other library versions; {regenerate}"
    for cls in current["classes"].keys():
        assert committed["classes"].get(cls) == current["classes"][cls], f"{cls} fields changed; {regenerate}"
    assert committed == current, regenerate


def test_training_fields_snapshot_is_sane():
    for stage in training_fields.CONFIG_CLASSES:
        fields = training_fields.fields_for(stage)
        assert fields["learning_rate"]["types"] == ["float"], stage
        assert "cosine" in fields["lr_scheduler_type"]["choices"], stage
        assert {"output_dir", "seed", "hub_token", "push_to_hub"} <= set(training_fields.owned_elsewhere(stage)), stage
    assert "max_length" in training_fields.fields_for("sft")
    assert "completion_only_loss" in training_fields.fields_for("sft")
    assert "completion_only_loss" not in training_fields.fields_for("pretrain")


def test_recipe_reference_is_up_to_date():
    path = REPO / "docs" / "recipe-reference.md"
    assert path.is_file(), "create it: python -m rlhf_pipeline.recipe.reference > docs/recipe-reference.md"
    assert path.read_text(encoding="utf-8") == markdown_reference() + "\n", (
        "docs/recipe-reference.md is stale: python -m rlhf_pipeline.recipe.reference > docs/recipe-reference.md")


def test_recipe_reference_covers_every_stage():
    text = markdown_reference()
    for stage in STAGE_RECIPES:
        assert f"## `{stage}`" in text
    assert "| `data.columns.prompt` |" in text
    assert "| `model.init.n_layer` | int | 4 |" in text
