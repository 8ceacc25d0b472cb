"""What of a run may leave the machine: the public rendering of a run dir, for a Hub push (rlhf_pipeline.hub) and its
model card (rlhf_pipeline.model_card).

A run dir keeps its full local record: recipe.resolved.yaml names models and data by local path, and its provenance
holds the command line and the platform. None of that is published. The pushed copy of the recipe (`PublicRecipe`)
names each local thing by what it is: an upstream run by the Hub repo it was pushed to (its hub.json), else
"local sft run (not pushed)"; a data file as "local file NAME"; a Hub id as it is. Its provenance keeps what
reproduces the run: library versions, the tool's commit, the Python version, when it was made. A recipe's relative
paths are read from the directory the run was started from (`made_from`), whatever the current one.

Files that quote the data or what the model wrote (samples, reports with samples, unknown JSON-lines files that may
hold data rows) go only on request (`include_samples`); reports whose `samples` entry quotes them go without it.

`local_markers` + `find_local` are the last look before anything is uploaded: the absolute paths around the run
(its folder, the home folder, every path its recipe names) and the platform string must appear in no uploaded byte.

Importing this module imports neither torch, transformers nor huggingface_hub.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, NamedTuple

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.recipe.schema import BUILDERS

HUB_FILE = "hub.json"  # written by a push: the repo, commit and revision the run went to
# The files that quote data or samples, uploaded only on request, with what they hold.
SAMPLE_FILES = {
    "samples.jsonl": "responses sampled during training, with their prompts",
    "eval_samples.jsonl": "held-out prompts with the responses sampled before and after training",
    "eval.md": "the evaluation report, which quotes held-out prompts and responses",
}
# JSON reports whose "samples" entry quotes prompts and responses: without samples they go without it.
REPORTS_WITH_SAMPLES = ("eval_before.json", "eval.json")
# The JSON-lines files this tool writes that hold numbers only; any other may hold data rows.
NUMBERS_ONLY_JSONL = ("log.jsonl", "eval_pairs.jsonl")
# What the pushed recipe's provenance keeps (never the command line, platform, host or folders).
PUBLIC_PROVENANCE = ("created", "python", "versions", "git")
RECIPE_HEADER = ("# The resolved recipe of this run, as published: local paths are replaced by what they named\n"
                 "# (the Hub repo an upstream run was pushed to, `local file NAME`, ...). Put your own in their\n"
                 "# place to re-run.\n")


def sample_reason(name: str) -> str | None:
    """Why a run-dir file (path relative to the run) goes only with samples included; None: it is not a sample."""
    base = name.rsplit("/", 1)[-1]
    if name in SAMPLE_FILES:
        return SAMPLE_FILES[name]
    if base.lower().endswith(".jsonl") and name not in NUMBERS_ONLY_JSONL:
        return "a JSON-lines file this tool does not write as a log: it may hold data rows"
    return None


def quoting_files(run_dir: Path) -> list[str]:
    """The run's sample files among those this tool writes (a push finds other JSON-lines files too)."""
    return [name for name in SAMPLE_FILES if (run_dir / name).is_file()]


def without_samples(data: Any) -> Any:
    """A JSON report with its quoted samples left out."""
    return {k: v for k, v in data.items() if k != "samples"} if isinstance(data, dict) else data


# ---------------------------------------------------------------------------------------------------------------
# naming local things in public
# ---------------------------------------------------------------------------------------------------------------
class ModelRef(NamedTuple):
    """A model as a recipe names it (a Hub id or a local directory), described without local paths."""

    name: str  # as the recipe names it
    repo_id: str | None  # where it is on the Hub: the Hub id itself, or the repo a local run was pushed to
    local: bool  # a local directory (or a path that is not there any more), not a Hub id
    stage: str | None = None  # a local run's stage
    record: dict[str, Any] | None = None  # a pushed local run's hub.json

    @property
    def public(self) -> str:
        """Plain text for the pushed recipe."""
        if self.repo_id:
            return self.repo_id
        if not self.local:
            return self.name
        if self.stage:
            return f"local {self.stage} run (not pushed)"
        if Path(self.name).expanduser().exists():
            return "local model directory (not pushed)"
        return f"local path {Path(self.name).name} (not found when pushed)"


def model_ref(name: str) -> ModelRef:
    local = Path(name).expanduser()
    if local.is_dir():
        stage = read_recipe(local, missing_ok=True).get("stage")
        record = pushed_to(local)
        return ModelRef(name, record["repo_id"] if record else None, True, str(stage) if stage else None, record)
    if is_hub_id(name) and not local.exists():
        return ModelRef(name, name, False)
    return ModelRef(name, None, True)


def parent_model(recipe: dict[str, Any]) -> str | None:
    """The model a run trained from, as its recipe names it: PPO's policy, the others' model (None for a model
    initialised from scratch, or a run that trains none)."""
    section = recipe.get("policy") if recipe.get("stage") == "ppo" else recipe.get("model")
    if recipe.get("stage") == "eval" or not isinstance(section, dict) or section.get("init"):
        return None
    return str(section["name_or_path"]) if section.get("name_or_path") else None


class Ancestry(NamedTuple):
    """Where a model's line of local runs reaches the Hub."""

    repo_id: str | None  # the nearest published ancestor (a Hub id, or a pushed run's repo); None: none is
    unpushed: list[tuple[str, str]]  # the local runs passed on the way, nearest first: (stage or "model", path)
    root: str  # how the line ends: "hub", "scratch" (initialised from scratch) or "unknown" (no recipe to follow)


def ancestry(name: str, limit: int = 32) -> Ancestry:
    """Follow a model through the local runs it came from (each run's recipe names its own parent) up to the first
    one on the Hub."""
    unpushed: list[tuple[str, str]] = []
    seen: set[Path] = set()
    current: str | None = name
    while current is not None and len(unpushed) < limit:
        ref = model_ref(current)
        if ref.repo_id:
            return Ancestry(ref.repo_id, unpushed, "hub")
        local = Path(current).expanduser()
        if not local.is_dir() or local.resolve() in seen:
            break
        seen.add(local.resolve())
        unpushed.append((ref.stage or "model", current))
        recipe = read_recipe(local, missing_ok=True)
        current = parent_model(recipe)
        if current is None and isinstance(recipe.get("model"), dict) and recipe["model"].get("init"):
            return Ancestry(None, unpushed, "scratch")
    return Ancestry(None, unpushed, "unknown")


def local_file(path: str) -> str:
    return f"local file {Path(path).name}"


def function_ref(value: str) -> str:
    """`package.module:function` as it is; `path/to/file.py:function` as `local file file.py:function`."""
    module, sep, function = value.rpartition(":")
    if sep and module.endswith(".py"):
        return f"{local_file(module)}:{function}"
    return value


def dataset_ref(value: str) -> str:
    if value in BUILDERS or value.startswith(("hf://", "http://", "https://")):
        return value
    local = Path(value).expanduser()
    if local.exists() or not is_hub_id(value):
        return f"local dataset {local.name}"
    return value


def data_file(value: str) -> str:
    return value if value.startswith(("hf://", "http://", "https://")) else local_file(value)


def reference_kind(key: tuple) -> str | None:
    """What a recipe value at `key` (its path of keys and list indices) may name on this machine: a "model", a
    "data file", a "dataset", a "function" (`file.py:function`), a chat "template" file; None: nothing local."""
    names = {k for k in key if isinstance(k, str)}
    last = next((k for k in reversed(key) if isinstance(k, str)), "")
    if last in ("name_or_path", "model"):
        return "model"
    if names & {"files", "data_files"}:
        return "data file"
    if last == "dataset" or (last == "path" and "datasets" in names):
        return "dataset"
    return {"function": "function", "chat_template": "template"}.get(last)


def made_from(run_dir: Path, recipe: dict[str, Any]) -> Path:
    """The directory a run was started from, where its recipe's relative paths start: the run dir's absolute path
    less its (relative) output_dir; the current directory when that cannot be told."""
    output_dir = recipe.get("output_dir")
    run = run_dir.absolute()
    if isinstance(output_dir, str) and output_dir and not os.path.isabs(output_dir):
        parts = Path(os.path.normpath(output_dir)).parts
        if ".." not in parts and run.parts[-len(parts):] == parts:
            return Path(*run.parts[: -len(parts)])
    return Path.cwd()


def local_path(name: str, origin: Path) -> Path:
    """Where `name`, as a recipe run from `origin` names it, is on this machine."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else origin / path


def anchored(recipe: dict[str, Any], origin: Path) -> dict[str, Any]:
    """The recipe with each relative reference to something under `origin` (a model dir, a data file, ...) made
    absolute, so that it means the same whatever the current directory."""
    def walk(value: Any, key: tuple) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*key, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "\n" in value or key[:1] == ("provenance",) or reference_kind(key) is None:
            return value
        file, sep, function = value.rpartition(":") if reference_kind(key) == "function" else ("", "", value)
        name = file if sep else value
        if not name or os.path.isabs(name) or name.startswith("~") or not (origin / name).exists():
            return value
        return str(origin / name) + (sep + function if sep else "")

    return walk(recipe, ())


def looks_local(value: str) -> bool:
    """A string that names a place on this machine: an absolute or home path."""
    return "\n" not in value and (os.path.isabs(value) or value.startswith("~"))


class PublicRecipe:
    """A run's resolved recipe as published, and what each local text in it became (`replaced`), so that a report
    naming the same paths can be rewritten the same way (`rewrite`)."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.local = recipe if recipe is not None else read_recipe(run_dir)
        self.origin = made_from(run_dir, self.local)
        self.replaced: dict[str, str] = {}
        data = copy.deepcopy(self.local)
        data.pop("provenance", None)
        if "output_dir" in data:
            self._remember(str(data["output_dir"]), run_dir.name)
            data["output_dir"] = run_dir.name
        self.data = self._walk(data, ())
        provenance = self.local.get("provenance")
        if isinstance(provenance, dict):
            self.data["provenance"] = {k: provenance[k] for k in PUBLIC_PROVENANCE if k in provenance}

    def text(self) -> str:
        from rlhf_pipeline.recipe.yaml_io import dump_yaml

        return RECIPE_HEADER + dump_yaml(self.data)

    def rewrite(self, text: str) -> str:
        """`text` with every local path of the recipe replaced by its public name (longest first)."""
        for local in sorted(self.replaced, key=len, reverse=True):
            text = text.replace(local, self.replaced[local])
        return text

    def _remember(self, local: str, public: str) -> str:
        if local != public and "\n" not in local:  # every form a report may quote it in, if it is a path
            path = local_path(local, self.origin)
            forms = {local, str(path), os.path.realpath(path), os.path.relpath(path, self.origin)}
            for form in forms:
                if ("/" in form or os.sep in form) and not form.startswith(".."):
                    self.replaced.setdefault(form, public)
        return public

    def _walk(self, value: Any, key: tuple) -> Any:
        if isinstance(value, dict):
            return {k: self._walk(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, (*key, i)) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        return self._remember(value, self._public(value, key))

    def _public(self, value: str, key: tuple) -> str:
        kind = reference_kind(key)
        if kind == "model":
            return model_ref(value).public
        if kind == "data file":
            return data_file(value)
        if kind == "dataset":
            return dataset_ref(value)
        if kind == "function":
            return function_ref(value)
        if kind == "template" and (value.endswith(".jinja") or looks_local(value)):
            return local_file(value)
        return f"local path {Path(value).name}" if looks_local(value) else value


# ---------------------------------------------------------------------------------------------------------------
# the last look: nothing local in what is uploaded
# ---------------------------------------------------------------------------------------------------------------
def local_markers(run_dir: Path, recipe: dict[str, Any]) -> list[str]:
    """Texts that say where and on what a run was made: the folders above it (absolute, as given and resolved),
    the folder it was started from, the home folder, the local paths its recipe names, the platform it ran on.
    System folders with one part (`/tmp`, `/home`) say nothing and are left out."""
    paths = {run_dir.absolute().parent, run_dir.resolve().parent, made_from(run_dir, recipe), Path.home()}
    names: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, str) and looks_local(value):
            names.append(value)

    collect({k: v for k, v in recipe.items() if k != "provenance"})
    for name in names:
        path = Path(name.split(":", 1)[0]).expanduser()  # a file.py:function reference too
        paths |= {path.absolute(), Path(os.path.realpath(path))}
    markers = {str(p) for p in paths if len(p.parts) > 2 or p == Path.home() and len(p.parts) > 1}
    provenance = recipe.get("provenance") if isinstance(recipe.get("provenance"), dict) else {}
    markers |= {text for text in (platform.platform(), platform.platform(terse=True), provenance.get("platform"))
                if isinstance(text, str) and len(text) > 8}
    return sorted(markers, key=len, reverse=True)


def find_local(data: bytes, markers: list[str]) -> str | None:
    """The first marker found in `data` whole (`/root` in `/root/x` or `"/root"`, not in `/srv/root` or `/rootfs`),
    or None."""
    for marker in markers:
        if re.search(rb"(?<![\w.-])" + re.escape(marker.encode("utf-8")) + rb"(?![\w.-])", data):
            return marker
    return None


# ---------------------------------------------------------------------------------------------------------------
# the run dir and its records
# ---------------------------------------------------------------------------------------------------------------
def pushed_to(run_dir: Path) -> dict[str, Any] | None:
    """The record of the last push of a run dir (its hub.json), when it names a repo."""
    record = runs.read_json(run_dir / HUB_FILE)
    return record if isinstance(record, dict) and record.get("repo_id") else None


def is_hub_id(name: str) -> bool:
    """`name` (a model or dataset as a recipe names it) is a valid Hub repo id: `gpt2`, `org/name`, but not
    `./runs/sft`, `/abs/path` or `~/x`. A relative path like `runs/sft` is one too: ask the disk first."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_recipe(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A run dir's recipe.resolved.yaml, provenance included ({} when `missing_ok` and it cannot be read), with its
    relative references anchored where the run was made (`anchored`)."""
    import yaml

    from rlhf_pipeline.recipe.yaml_io import YamlLimitError, load_text

    file = path / runs.RECIPE_FILE
    try:  # within the recipe limits: a run dir's file may be anyone's (an alias bomb would hang the push)
        data = load_text(file.read_text(encoding="utf-8"))[0]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, YamlLimitError) as exc:
        if missing_ok:
            return {}
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"{path} has no {runs.RECIPE_FILE}: not a run dir written by an rlhf stage") from None
        raise UserError(f"cannot read {file}: {exc}") from None
    return anchored(data, made_from(path, data)) if isinstance(data, dict) else {}


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
