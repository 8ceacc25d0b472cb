"""The package list, the one thing pyproject.toml cannot say here: [tool.setuptools] takes either package discovery
or a list, and the packages are those discovered plus `rlhf_pipeline.recipes`, the folder `recipes/` at the root of
the repository (pyproject's package-dir maps it, package-data ships its files): the recipe sets install with the
package, where rlhf_pipeline/recipe/sets.py finds them."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["rlhf_pipeline", "rlhf_pipeline.*"]), "rlhf_pipeline.recipes"])
