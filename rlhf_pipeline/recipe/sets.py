"""The recipe sets shipped with the package: the tiny world (with its data), the model recipe sets (gpt2-hh, ...) and
the Accelerate configs. Imports no torch.

Where they are: `recipes/` at the root of the repository; a wheel carries that folder as `rlhf_pipeline/recipes/`
(pyproject.toml's package-dir maps the one to the other), so that a `pip install` has them too. `root()` finds either.

How a command finds one (`resolve`): a recipe argument that exists here is always taken as it is, so that a file or
folder of the user's is never shadowed. Only when nothing of that name exists here does it name a shipped recipe:
`tiny` (a set: its recipe for the command, `rlhf pipeline tiny` -> tiny/pipeline.yaml, `rlhf sft tiny` ->
tiny/sft.yaml), `tiny/sft` or `tiny/sft.yaml` (a recipe of a set), each also spelt as the docs write them from the
repository, `recipes/tiny/sft.yaml`. A folder given where a recipe file is expected (a set copied by `rlhf recipes
copy`) is read the same way: its recipe for the command. The command says on stderr which file it took.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_pipeline.errors import UserError, did_you_mean

REPO_FOLDER = "recipes"  # how the docs name the sets' folder: `recipes/tiny/sft.yaml`
README = "README.md"  # every set has one; its first heading describes it
ACCELERATE = "accelerate"  # the set of Accelerate configs (`accelerate launch --config_file`), not recipes
RECIPE_ORDER = ("pipeline", "pretrain", "sft", "reward", "ppo", "dpo", "eval", "label")  # as the stages run


def root() -> Path:
    """The folder holding the sets: `rlhf_pipeline/recipes` in an installed wheel, else `recipes/` beside the
    package in the source checkout it is imported from (an editable install, or the repository on PYTHONPATH)."""
    package = Path(str(importlib.resources.files("rlhf_pipeline")))
    installed = package / "recipes"
    if installed.is_dir():
        return installed
    checkout = package.parent / REPO_FOLDER
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise UserError(f"the recipe sets that ship with rlhf-pipeline are missing from this installation (no "
                    f"{installed}): reinstall it (pip install --force-reinstall rlhf-pipeline)")


def names() -> list[str]:
    """The sets, by name (a folder of `root()` with a README.md), sorted."""
    return sorted(p.name for p in root().iterdir() if (p / README).is_file())


@dataclass(frozen=True)
class RecipeSet:
    name: str
    path: Path
    description: str  # the README's first heading
    recipes: tuple[tuple[str, str], ...]  # (path inside the set without `.yaml`, e.g. `compare/ppo`; what it is)

    @property
    def is_accelerate(self) -> bool:
        return self.name == ACCELERATE


def recipe_set(name: str) -> RecipeSet:
    """One set, by name (`tiny`, `recipes/tiny`); UserError naming the sets when there is none of that name. A
    folder inside a set (`tiny/compare`) is refused: its recipes use the set's own (`extends: ../dpo.yaml`)."""
    key = _strip(name)
    if key not in names():
        top = key.split("/")[0]
        if "/" in key and top in names() and (root() / key).is_dir():
            raise UserError(f"{name} is a folder of the recipe set {top}, whose recipes it uses (`extends`, "
                            f"`recipe:` paths): copy the whole set, `rlhf recipes copy {top} DIR`")
        raise UserError(f"no recipe set {name!r}{did_you_mean(key, names())}; the sets: {', '.join(names())} "
                        "(`rlhf recipes list`)")
    path = root() / key
    return RecipeSet(key, path, _description(path), tuple(_recipes(path)))


def _strip(name: str) -> str:
    """A set or recipe name as the user may spell it: `tiny`, `tiny/`, `recipes/tiny`, `./recipes/tiny`."""
    text = name.replace(os.sep, "/").strip().rstrip("/")
    text = text.removeprefix("./")
    return text.removeprefix(f"{REPO_FOLDER}/")


def _description(path: Path) -> str:
    for line in (path / README).read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def _recipes(path: Path) -> list[tuple[str, str]]:
    """(name inside the set, what it is) for every YAML file of the set, the stages' order first: for a recipe its
    stage (a pipeline's: its stages), for an Accelerate config `accelerate`."""
    found = []
    for file in sorted(path.rglob("*.yaml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        stage = data.get("stage", ACCELERATE) if isinstance(data, dict) else ACCELERATE
        what = str(stage)
        if stage == "pipeline":
            stages = data.get("stages") or {}
            flat = [name for key, entry in stages.items()
                    for name in ((entry or {}) if key == "policies" else {key: None})]
            what = f"pipeline: {', '.join(flat)}"
        found.append((file.relative_to(path).with_suffix("").as_posix(), what))
    order = {stage: index for index, stage in enumerate(RECIPE_ORDER)}

    def rank(item: tuple[str, str]) -> tuple:  # a folder's last; by stage; the recipe named as its stage first
        name, what = item
        stage = what.split(":")[0]
        return "/" in name, order.get(stage, len(order)), name.rsplit("/", 1)[-1] != stage, name

    return sorted(found, key=rank)


def resolve(argument: Path, command: str | None) -> tuple[Path, str | None]:
    """The recipe file (or, `command` None, the file or folder) a recipe argument names, by the rule in the module
    docstring, and a note saying which it took when it is not the argument itself (else None). `command` is the
    stage whose recipe a set stands for (`pipeline` for a command that takes any recipe). An argument that names
    nothing is returned as it is when it is a file name (reading it says that it is missing); UserError when it
    names a set without a recipe for `command`, or for another name, saying which sets there are."""
    try:
        here = argument.exists() or argument.is_symlink()
        if here and command is not None and argument.is_dir() and (argument / f"{command}.yaml").is_file():
            chosen = argument / f"{command}.yaml"
            return chosen, f"{argument} is a folder: reading its {command} recipe, {chosen}"
    except (OSError, ValueError):  # a name too long, a NUL byte: reading it says what is wrong
        return argument, None
    if here or argument.is_absolute():
        return argument, None
    key = _strip(str(argument))
    base = root()
    if command is None and key.split("/")[0] in names() and (base / key).is_dir() and ".." not in key.split("/"):
        folder = _as_reached(base / key)
        return folder, f"{argument}: no such file or folder here; reading the shipped recipes in {folder}"
    if key in names():  # a set
        found = base / key / f"{command}.yaml"
        if not found.is_file():
            have = ", ".join(name for name, _ in _recipes(base / key) if "/" not in name)
            raise UserError(f"{argument}: the shipped recipe set {key} has no {command} recipe (it has: {have})")
    else:
        named = key.endswith((".yaml", ".yml"))
        found = base / (key if named else f"{key}.yaml")
        top = key.split("/")[0]
        if not (found.is_file() and base.resolve() in found.resolve().parents and top in names()):
            if named or command is None:  # reading it says that it is missing (`recipe validate`: with the rest)
                return argument, None
            if top in names() and ".." not in key.split("/"):
                have = ", ".join(name for name, _ in _recipes(base / top))
                raise UserError(f"{argument}: no such file here, and the shipped recipe set {top} has no recipe "
                                f"{key.removeprefix(top + '/')} (it has: {have})")
            raise UserError(f"{argument}: no such recipe file here, nor a recipe set shipped with rlhf-pipeline"
                            f"{did_you_mean(top, names())} (the sets: {', '.join(names())}; `rlhf recipes list`)")
    return _as_reached(found), (f"{argument}: no such file here; reading the shipped recipe "
                                f"{found.relative_to(base).as_posix()} ({_as_reached(found)})")


def _as_reached(path: Path) -> Path:
    """A shipped recipe's path relative to the current folder when it lies inside it (in the repository, `rlhf sft
    tiny` reads recipes/tiny/sft.yaml, as `rlhf sft recipes/tiny/sft.yaml` does: its `{recipe_dir}` data paths and
    so its resolved recipe are the same, and a pipeline sees no change between the two), else absolute."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def copy(name: str, destination: Path) -> tuple[RecipeSet, Path]:
    """Copy a set, data included, into `destination` (a new or empty folder): built in a temporary folder beside
    it and renamed into place, so that nothing half-copied is left. The copy's files are the user's to edit (the
    ordinary mode, whatever the installed files' mode); its `{recipe_dir}` paths name files of the copy wherever it
    goes. Returns the set and the copy."""
    from rlhf_pipeline import runs

    chosen = recipe_set(name)
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise UserError(f"{destination} exists and is not a folder: give a new or empty folder to copy into")
    if destination.is_dir() and any(destination.iterdir()):
        raise UserError(f"{destination} is not empty: rlhf recipes copy writes into a new or empty folder only "
                        "(nothing there is replaced)")
    created = runs.make_dirs(destination.parent)
    temporary = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _copy_tree(chosen.path, temporary)
        os.rename(temporary, destination)  # onto an empty folder too (POSIX)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        runs.remove_empty_dirs(created)
        raise runs.disk_full(exc, destination) or UserError(f"cannot copy the recipe set {chosen.name} to "
                                                            f"{destination}: {exc.strerror or exc}") from None
    return chosen, destination


def _copy_tree(source: Path, target: Path) -> None:
    """Folders and files of `source` (not what a checkout may hold beside them: caches, hidden files), made anew."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__" or path.is_symlink():
            continue
        if path.is_dir():
            _copy_tree(path, target / path.name)
        elif path.is_file():
            shutil.copyfile(path, target / path.name)


def accelerate_config(name: str) -> Path:
    """A shipped Accelerate config by name (`ddp`, `zero3`, ...; see `rlhf recipes list`); UserError naming them
    when there is none of that name."""
    folder = root() / ACCELERATE
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in known:
        raise UserError(f"no shipped Accelerate config {name!r}{did_you_mean(name, known)}; they are: "
                        f"{', '.join(known)} (or give a config file's path)")
    return folder / f"{name}.yaml"
