"""The recipe sets ship with the package (rlhf_pipeline/recipe/sets.py): `rlhf recipes list`, `rlhf recipes copy`, a
set's name where a recipe path goes, and all of it from a wheel built from this checkout and installed (not editable)
into a fresh virtualenv, run from a folder outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from rlhf_pipeline.recipe import sets

SETS = ("accelerate", "gpt2-hh", "gpt2-tldr", "qwen2.5-0.5b-hh", "tiny")


def shipped_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


# ---------------------------------------------------------------------------------------------------------------
# in this checkout: the sets are the repository's recipes/
# ---------------------------------------------------------------------------------------------------------------
def test_the_sets_of_a_checkout_are_its_recipes_folder():
    assert sets.root() == REPO / "recipes"
    assert tuple(sets.names()) == SETS


def test_recipes_list_names_each_set_its_description_and_recipes():
    result = run_cli("recipes", "list")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"Recipe sets shipped with rlhf-pipeline, in {REPO / 'recipes'}:" in out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")
            and not line.startswith("   ")}
    assert rows == {"accelerate": "Accelerate configs: several GPUs or machines",
                    "gpt2-hh": "GPT-2 on Anthropic HH-RLHF", "gpt2-tldr": "GPT-2 on TL;DR summarisation",
                    "qwen2.5-0.5b-hh": "Qwen2.5-0.5B-Instruct on Anthropic HH-RLHF",
                    "tiny": "The tiny default (offline, CPU)"}
    flat = " ".join(out.split())  # the recipes' lines are wrapped
    assert "configs (accelerate launch --config_file): ddp, fsdp, multi_node, single_gpu, zero2, zero3" in flat
    assert "recipes: pipeline (sft, reward, ppo, eval), sft, reward, ppo, dpo" in flat  # gpt2-hh
    assert ("recipes: pipeline (pretrain, sft, reward, ppo, eval), compare (pipeline: pretrain, sft, reward, ppo, "
            "rloo, grpo, dpo, ppo-kl0, eval), pretrain, sft, reward, ppo, dpo, eval, label, label-ab (label), "
            "compare/reward, compare/ppo, compare/grpo (ppo), compare/rloo (ppo), compare/dpo") in flat
    assert "To edit one: rlhf recipes copy NAME DIR" in out


def test_recipes_copy_copies_a_set_with_its_data_and_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("recipes", "copy", "tiny", "mine")
    assert result.exit_code == 0, result.output
    assert shipped_files(tmp_path / "mine") == shipped_files(REPO / "recipes" / "tiny")
    for name in shipped_files(tmp_path / "mine"):
        assert (tmp_path / "mine" / name).read_bytes() == (REPO / "recipes" / "tiny" / name).read_bytes(), name
    assert result.stdout.startswith("copied the recipe set tiny to mine: 15 recipes and 10 data files (")
    for line in ("  rlhf recipe validate mine", "  rlhf pipeline mine/pipeline.yaml", "  rlhf sft mine/sft.yaml",
                 "  rlhf label mine/label-ab.yaml", "  rlhf pipeline mine/compare.yaml"):
        assert f"\n{line}\n" in result.stdout + "\n", line
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left beside it

    validated = run_cli("recipe", "validate", "mine")  # its {recipe_dir} paths name the copy's data
    assert validated.exit_code == 0, validated.output
    assert "ok  mine/compare/dpo.yaml  (dpo)" in validated.stdout
    dry = run_cli("sft", "mine/sft.yaml", "--dry-run")
    assert dry.exit_code == 0 and "data        train: mine/data/sft.jsonl.gz" in dry.stdout, dry.output

    again = run_cli("recipes", "copy", "gpt2-hh", "mine")
    assert again.exit_code == 2
    assert again.stderr == ("error: mine is not empty: rlhf recipes copy writes into a new or empty folder only "
                            "(nothing there is replaced)\n")
    (tmp_path / "empty").mkdir()
    into_empty = run_cli("recipes", "copy", "recipes/gpt2-hh/", "empty")  # spelt as the docs' paths are
    assert into_empty.exit_code == 0, into_empty.output
    assert "Its data paths" not in into_empty.stdout  # gpt2-hh's data comes from the Hub
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "README.md", "dpo.yaml", "pipeline.yaml", "ppo.yaml", "reward.yaml", "sft.yaml"]


@pytest.mark.parametrize(("name", "message"), [
    ("tyni", "error: no recipe set 'tyni'; the sets: accelerate, gpt2-hh, gpt2-tldr, qwen2.5-0.5b-hh, tiny "
             "(`rlhf recipes list`)"),
    ("gpt2", "error: no recipe set 'gpt2'; did you mean 'gpt2-hh'?"),
    ("tiny/compare", "error: tiny/compare is a folder of the recipe set tiny, whose recipes it uses (`extends`, "
                     "`recipe:` paths): copy the whole set, `rlhf recipes copy tiny DIR`"),
])
def test_recipes_copy_refuses_what_is_not_a_set(tmp_path, name, message):
    result = run_cli("recipes", "copy", name, tmp_path / "copy")
    assert result.exit_code == 2 and result.stderr.startswith(message), result.output
    assert not (tmp_path / "copy").exists()


def test_recipes_copy_into_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("mine")
    result = run_cli("recipes", "copy", "tiny", tmp_path / "notes")
    assert result.exit_code == 2 and "notes exists and is not a folder" in result.stderr
    assert (tmp_path / "notes").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# a set's name where a recipe path goes, when no such file or folder is here
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "recipe"), [
    (("sft", "tiny"), "tiny/sft.yaml"),
    (("sft", "tiny/sft"), "tiny/sft.yaml"),
    (("reward", "tiny/reward.yaml"), "tiny/reward.yaml"),
    (("reward", "recipes/tiny/reward.yaml"), "tiny/reward.yaml"),  # the docs' path, from anywhere
    (("ppo", "tiny/compare/grpo"), "tiny/compare/grpo.yaml"),
    (("eval", "tiny"), "tiny/eval.yaml"),
    (("label", "tiny/label-ab"), "tiny/label-ab.yaml"),
    (("pipeline", "tiny"), "tiny/pipeline.yaml"),
    (("pipeline", "tiny/compare"), "tiny/compare.yaml"),
    (("dpo", "gpt2-hh"), "gpt2-hh/dpo.yaml"),
])
def test_a_shipped_recipe_by_name_from_any_folder(tmp_path, monkeypatch, args, recipe):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    path = REPO / "recipes" / recipe
    assert result.stderr == (f"note: {args[1]}: no such file here; reading the shipped recipe {recipe} "
                             f"({path})\n")
    if args[0] != "pipeline":
        assert re.search(rf"\n  recipe +{re.escape(str(path))}\n", result.stdout), result.stdout
    assert " runs/" in result.stdout  # outputs: under the current folder
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_in_the_repository_a_set_name_reads_the_same_recipe_as_its_path(monkeypatch):
    """`rlhf sft tiny` in the repository is `rlhf sft recipes/tiny/sft.yaml`, resolved recipe and all (a pipeline
    run one way and then the other would otherwise see its data paths change, and run again)."""
    from rlhf_pipeline.commands import recipe_argument
    from rlhf_pipeline.recipe.load import load_recipe

    monkeypatch.chdir(REPO)
    found = recipe_argument(Path("tiny"), "sft")
    assert found == Path("recipes/tiny/sft.yaml")
    assert load_recipe(found).resolved_yaml() == load_recipe("recipes/tiny/sft.yaml").resolved_yaml()


def test_a_file_or_folder_here_comes_before_a_shipped_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder of the user's named like a set, without an sft recipe: read as it is
    result = run_cli("sft", "tiny", "--dry-run")
    assert result.exit_code == 2 and result.stderr == "error: tiny: cannot read recipe: it is a directory\n"
    (tmp_path / "tiny").rmdir()
    assert run_cli("recipes", "copy", "tiny", "tiny").exit_code == 0
    (tmp_path / "tiny" / "sft.yaml").write_text((tmp_path / "tiny" / "sft.yaml").read_text().replace(
        "eval_size: 200", "eval_size: 100"))
    result = run_cli("sft", "tiny", "--dry-run")  # the folder: its sft recipe, edited
    assert result.exit_code == 0, result.output
    assert result.stderr == "note: tiny is a folder: reading its sft recipe, tiny/sft.yaml\n"
    assert "100 rows of the train split" in result.stdout
    result = run_cli("sft", "tiny/sft.yaml", "--dry-run")  # a file that is here: no note
    assert result.exit_code == 0 and result.stderr == "", result.output


@pytest.mark.parametrize(("args", "message"), [
    (("pretrain", "gpt2-hh"), "error: gpt2-hh: the shipped recipe set gpt2-hh has no pretrain recipe (it has: "
                              "pipeline, sft, reward, ppo, dpo)"),
    (("sft", "tiny/sfft"), "error: tiny/sfft: no such file here, and the shipped recipe set tiny has no recipe sfft "
                           "(it has: pipeline, compare, pretrain, sft,"),
    (("sft", "gpt2"), "error: gpt2: no such recipe file here, nor a recipe set shipped with rlhf-pipeline; did you "
                      "mean 'gpt2-hh'? (the sets: accelerate, gpt2-hh, gpt2-tldr, qwen2.5-0.5b-hh, tiny; `rlhf "
                      "recipes list`)"),
    (("sft", "nope.yaml"), "error: nope.yaml: no such recipe file"),
    (("sft", "tiny/../../pyproject.toml"), "error: tiny/../../pyproject.toml: no such recipe file"),
])
def test_a_name_that_names_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args, "--dry-run")
    assert result.exit_code == 2 and result.stderr.startswith(message), result.output


def test_validate_show_and_plan_take_a_set_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    validated = run_cli("recipe", "validate", "tiny", "accelerate/ddp.yaml")
    assert validated.exit_code == 0, validated.output
    assert f"ok  {REPO / 'recipes/tiny/compare/dpo.yaml'}  (dpo)" in validated.stdout
    assert f"ok  {REPO / 'recipes/accelerate/ddp.yaml'}  (Accelerate config: " in validated.stdout
    assert f"note: tiny: no such file or folder here; reading the shipped recipes in {REPO / 'recipes/tiny'}" in \
        validated.stderr
    shown = run_cli("recipe", "show", "tiny/sft")
    assert shown.exit_code == 0 and shown.stdout.startswith("stage: sft\n"), shown.output
    planned = run_cli("plan", "tiny")
    assert planned.exit_code == 0 and planned.stdout.startswith("pipeline tiny: 4 stages planned"), planned.output


def test_the_shipped_accelerate_configs_by_name():
    assert sets.accelerate_config("zero3") == REPO / "recipes" / "accelerate" / "zero3.yaml"
    from rlhf_pipeline.errors import UserError

    with pytest.raises(UserError, match=r"no shipped Accelerate config 'fdsp'; did you mean 'fsdp'\?; they are: "
                                        r"ddp, fsdp, multi_node, single_gpu, zero2, zero3 \(or give"):
        sets.accelerate_config("fdsp")


# ---------------------------------------------------------------------------------------------------------------
# from a wheel, installed (not editable) into a fresh virtualenv
# ---------------------------------------------------------------------------------------------------------------
def test_a_wheel_installed_in_a_fresh_venv_ships_and_runs_the_recipe_sets(tmp_path):
    """The wheel is built from a copy of the checkout's sources (nothing of this checkout's own build), offline
    (`--no-build-isolation`: this environment's setuptools, the `dev` extra's). The fresh venv holds the wheel alone;
    its dependencies (torch and the rest, gigabytes) are this environment's, reached through a .pth file listing
    this environment's site-packages: appended to sys.path after the venv's own, so that rlhf_pipeline comes from
    the wheel (checked) and nothing of the checkout is importable (no PYTHONPATH)."""
    import shutil

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("rlhf_pipeline", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rlhf_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name.removeprefix("rlhf_pipeline/recipes/") for name in archive.namelist()
                    if name.startswith("rlhf_pipeline/recipes/")}
    assert packaged == shipped_files(REPO / "recipes")  # every file of every set, data included

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    dependencies = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "_dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))

    here = tmp_path / "elsewhere"
    here.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def rlhf(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "rlhf"), *args], cwd=here, env=env, capture_output=True,
                              text=True, timeout=120)

    where = subprocess.run([str(python), "-c", "import rlhf_pipeline; print(rlhf_pipeline.__file__)"], cwd=here,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site_packages / "rlhf_pipeline" / "__init__.py"), where.stderr
    shipped = site_packages / "rlhf_pipeline" / "recipes"

    listed = rlhf("recipes", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"Recipe sets shipped with rlhf-pipeline, in {shipped}:" in listed.stdout
    assert all(f"\n  {name} " in listed.stdout for name in SETS), listed.stdout

    copied = rlhf("recipes", "copy", "tiny", "mine")
    assert copied.returncode == 0, copied.stderr
    assert shipped_files(here / "mine") == shipped_files(REPO / "recipes" / "tiny")
    assert "\n  rlhf pipeline mine/pipeline.yaml\n" in copied.stdout

    validated = rlhf("recipe", "validate", "mine")
    assert validated.returncode == 0, validated.stderr
    assert validated.stdout.count("\nok  ") + 1 == len(list((REPO / "recipes" / "tiny").rglob("*.yaml")))

    dry = rlhf("pipeline", "tiny", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stderr == (f"note: tiny: no such file here; reading the shipped recipe tiny/pipeline.yaml "
                          f"({shipped / 'tiny' / 'pipeline.yaml'})\n")
    assert dry.stdout.startswith("dry run: nothing was written\n")
    for stage in ("pretrain", "sft", "reward", "ppo", "eval"):
        assert f"  runs/tiny/{stage}\n" in dry.stdout, stage
    assert sorted(p.name for p in here.iterdir()) == ["mine"]  # nothing written but the copy
