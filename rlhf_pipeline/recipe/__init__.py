"""Recipes: YAML files validated against one schema per stage. Torch-free, so the CLI answers fast."""

from rlhf_pipeline.recipe.load import LoadedRecipe, load_recipe, parse_override

__all__ = ["LoadedRecipe", "load_recipe", "parse_override"]
