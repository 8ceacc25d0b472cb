"""Read a recipe: `extends:` inheritance, `--set` overrides, schema validation, errors that point at file:line."""

from __future__ import annotations

import copy
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_pipeline.errors import KeyedValueError, Problem, RecipeError, UserError, did_you_mean
from rlhf_pipeline.recipe import accelerate_config, training_fields
from rlhf_pipeline.recipe.schema import STAGE_RECIPES, StageRecipe
from rlhf_pipeline.recipe.suggest import unknown_key
from rlhf_pipeline.recipe.yaml_io import KeyPath, YamlLimitError, dump_yaml, load_yaml, parse_scalar, yaml_problem

Origin = tuple[str, "int | None"]  # (file or "--set ...", line)


@dataclass
class LoadedRecipe:
    """A validated recipe plus where each of its keys came from (for errors raised later, e.g. a missing column)."""

    path: Path
    recipe: StageRecipe
    data: dict[str, Any]
    origins: dict[KeyPath, Origin] = field(repr=False)
    published_output_dir: str | None = None  # set while the run is built elsewhere (see working_in)

    @property
    def stage(self) -> str:
        return self.recipe.stage

    def problem(self, key: str, message: str) -> Problem:
        file, line = _locate(self.origins, _split_key(key), str(self.path))
        return Problem(message, key, file, line)

    def error(self, key: str, message: str) -> RecipeError:
        """A RecipeError about `key` (dotted), located at the file and line that set it."""
        return RecipeError([self.problem(key, message)])

    def working_in(self, work_dir: str | Path) -> LoadedRecipe:
        """The same recipe writing to `work_dir` (e.g. a staging dir that replaces the output dir once finished);
        its resolved recipe still names the real output dir."""
        if str(work_dir) == self.recipe.output_dir:
            return self
        recipe = self.recipe.model_copy(update={"output_dir": str(work_dir)})
        return LoadedRecipe(self.path, recipe, self.data, self.origins,
                            published_output_dir=self.published_output_dir or self.recipe.output_dir)

    def resolved_yaml(self, provenance: dict[str, Any] | None = None) -> str:
        """The fully resolved recipe (extends merged, overrides applied, defaults filled in) as YAML."""
        data = self.recipe.model_dump(mode="json", exclude={"extends", "provenance"})
        if self.published_output_dir is not None:
            data["output_dir"] = self.published_output_dir
        if provenance is not None:
            data["provenance"] = provenance
        return dump_yaml(data)


Assignment = tuple[str, Any, str]  # (dotted key, value, where it came from: e.g. "pipeline: the sft output")


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), expected_stage: str | None = None,
                assignments: typing.Sequence[Assignment] = ()) -> LoadedRecipe:
    """Read, merge, override and validate a recipe. Raises RecipeError listing every problem found.

    `overrides` are `--set` texts (`key.sub=value`, the value typed as YAML); `assignments` set typed values directly
    (the pipeline wires stage outputs into the next stage's recipe this way)."""
    path = Path(path)
    data, origins = _read_with_extends(path, chain=())
    for text in overrides:
        parts, value = parse_override(text)
        _assign(data, origins, parts, expand_recipe_dir(value, path), f"--set {text}")
    return _validate(path, data, origins, assignments, expected_stage)


def merged_recipe_data(path: str | Path) -> dict[str, Any]:
    """A recipe file's data with its `extends` merged, not yet validated."""
    return _read_with_extends(Path(path), chain=())[0]


def recipe_from_data(data: dict[str, Any], label: str, assignments: typing.Sequence[Assignment] = (),
                     expected_stage: str | None = None) -> LoadedRecipe:
    """Validate a recipe built in code (e.g. the pipeline's generated eval recipe); errors name `label`."""
    return _validate(Path(label), copy.deepcopy(data), {}, assignments, expected_stage)


def _validate(path: Path, data: dict, origins: dict, assignments: typing.Sequence[Assignment],
              expected_stage: str | None) -> LoadedRecipe:
    for key, value, origin in assignments:
        _assign(data, origins, tuple(key.split(".")), value, origin)
    stage = data.get("stage")
    if not isinstance(stage, str) or stage not in STAGE_RECIPES:
        file, line = _locate(origins, ("stage",), str(path))
        if stage is None and accelerate_config.is_accelerate_config(data):
            raise RecipeError([Problem(
                "this is an Accelerate config, not a recipe: launch with it, as in `accelerate launch --config_file "
                f"{path} -m rlhf_pipeline sft RECIPE` (see recipes/accelerate/README.md)", file=str(path))])
        message = (
            "missing: every recipe names its stage"
            if stage is None
            else f"unknown stage {stage!r}{did_you_mean(str(stage), STAGE_RECIPES)}"
        )
        raise RecipeError([Problem(f"{message} (one of: {', '.join(STAGE_RECIPES)})", "stage", file, line)])
    if expected_stage and stage != expected_stage:
        file, line = _locate(origins, ("stage",), str(path))
        raise RecipeError(
            [Problem(f"this is a `{stage}` recipe; run it with `rlhf {stage}`, not `rlhf {expected_stage}`",
                     "stage", file, line)]
        )
    schema = STAGE_RECIPES[stage]
    _drop_unsetting_nulls(schema, data, stage)
    problems: list[Problem] = []
    recipe = None
    try:
        recipe = schema.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from_pydantic(exc, stage, origins, str(path)))
    training = data.get("training")
    if stage in training_fields.CONFIG_CLASSES and isinstance(training, dict):
        for key, message in training_fields.check_training(stage, training):
            file, line = _locate(origins, ("training", key), str(path))
            problems.append(Problem(message, f"training.{key}", file, line))
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.file or "", p.line or 0)))
    return LoadedRecipe(path=path, recipe=recipe, data=data, origins=origins)


def _drop_unsetting_nulls(schema: type[BaseModel], data: dict, stage: str) -> None:
    """`null` for a key that takes no null means "not set": the key is dropped and its default applies, so that a
    recipe (or `--set key=null`) can unset a key it inherits through `extends`. A key that takes null (e.g.
    `training.max_length` in SFT: no truncation) keeps it as its value."""
    for key, value in list(data.items()):
        field_info = schema.model_fields.get(key)
        if field_info is None:
            continue
        if value is None and not field_info.is_required() and not _admits_null(field_info.annotation):
            del data[key]
        elif isinstance(value, dict):
            section = _model_class(field_info.annotation)
            if section is not None:
                _drop_unsetting_nulls(section, value, stage)
            elif key == "training" and stage in training_fields.CONFIG_CLASSES:
                fields = training_fields.fields_for(stage)
                for name in [k for k, v in value.items() if v is None and k in fields
                             and not {"null", "any"} & set(fields[k]["types"])]:
                    del value[name]


def _admits_null(annotation: Any) -> bool:
    return annotation is Any or annotation is None or type(None) in typing.get_args(annotation)


def resolved_data(yaml_text: str, where: str | Path = "the resolved recipe") -> dict[str, Any]:
    """A resolved recipe (YAML text) as data, without what does not change the result (provenance, where it is
    published): what two runs compare. UserError naming `where` (e.g. a run's recipe.resolved.yaml) when the text
    is not a recipe."""
    from rlhf_pipeline.recipe.yaml_io import load_text

    try:
        data = load_text(yaml_text)[0] or {}
    except (yaml.YAMLError, YamlLimitError) as exc:
        reason = yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else str(exc)
        raise UserError(f"{where}: cannot be read as a recipe: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: cannot be read as a recipe: it is not a mapping of keys to values")
    data.pop("provenance", None)
    data.pop("hub", None)
    return data


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings (1 and 1.0 are the same value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            keys.extend(diff_keys(old.get(key), new.get(key), f"{prefix}{key}."))
        return keys
    return [] if old == new else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------------------------
# extends + merge
# ---------------------------------------------------------------------------------------------------------------
MAX_EXTENDS_DEPTH = 16  # parents of parents...
MAX_EXTENDS_READS = 64  # recipe files read for one recipe: a parent listed 9 times by each of 9 files is a bomb too


def _read_with_extends(path: Path, chain: tuple[Path, ...], reads: list[int] | None = None) \
        -> tuple[dict, dict[KeyPath, Origin]]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError([Problem(f"`extends` cycle: {cycle}", "extends", str(path))])
    reads = reads if reads is not None else [0]
    reads[0] += 1
    if len(chain) > MAX_EXTENDS_DEPTH or reads[0] > MAX_EXTENDS_READS:
        what = (f"more than {MAX_EXTENDS_DEPTH} files deep" if len(chain) > MAX_EXTENDS_DEPTH
                else f"more than {MAX_EXTENDS_READS} recipe files in all (parents listed many times over?)")
        raise RecipeError([Problem(f"`extends` goes {what}: refusing to read further", "extends", str(chain[0]))])
    data, lines = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([Problem("a recipe is a mapping of keys to values", file=str(path), line=1)])
    origins: dict[KeyPath, Origin] = {key: (str(path), line) for key, line in lines.items()}
    data = expand_recipe_dir(data, path)  # before merging: each file's own directory

    parents = data.pop("extends", None)
    if parents is None:
        return data, origins
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        line = lines.get(("extends",))
        raise RecipeError([Problem("expected a path or a list of paths", "extends", str(path), line)])

    merged: dict = {}
    merged_origins: dict[KeyPath, Origin] = {}
    for index, parent in enumerate(parents):
        parent_path = path.parent / parent
        if not parent_path.is_file():
            line = lines.get(("extends", index), lines.get(("extends",)))
            raise RecipeError([Problem(f"no such file: {parent_path}", "extends", str(path), line)])
        parent_data, parent_origins = _read_with_extends(parent_path, (*chain, resolved), reads)
        _deep_merge(merged, parent_data, merged_origins, parent_origins, ())
    _deep_merge(merged, data, merged_origins, origins, ())
    return merged, merged_origins


RECIPE_DIR = "{recipe_dir}"


def expand_recipe_dir(value: Any, recipe_file: Path) -> Any:
    """`{recipe_dir}` in every string of `value` replaced by the directory of the recipe file that wrote it, as that
    file was reached (e.g. `recipes/tiny`), so that a recipe set can ship its own data and still be copied anywhere.
    Every other relative path starts at the current directory, as in TRL."""
    if isinstance(value, str):
        return value.replace(RECIPE_DIR, os.path.normpath(recipe_file.parent)) if RECIPE_DIR in value else value
    if isinstance(value, dict):
        return {key: expand_recipe_dir(item, recipe_file) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_recipe_dir(item, recipe_file) for item in value]
    return value


def _deep_merge(base: dict, top: dict, base_origins: dict, top_origins: dict, prefix: KeyPath) -> None:
    """Merge `top` into `base` in place: mappings merge key by key; anything else (lists too) replaces."""
    for key, value in top.items():
        key_path = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if key_path in top_origins:
                base_origins[key_path] = top_origins[key_path]
            _deep_merge(base[key], value, base_origins, top_origins, key_path)
        else:
            for stale in [k for k in base_origins if k[: len(key_path)] == key_path]:
                del base_origins[stale]
            base[key] = copy.deepcopy(value)
            base_origins.update({k: v for k, v in top_origins.items() if k[: len(key_path)] == key_path})


# ---------------------------------------------------------------------------------------------------------------
# --set key.sub=value
# ---------------------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[KeyPath, Any]:
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise UserError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set training.learning_rate=1e-4")
    if raw.strip().startswith(RECIPE_DIR):  # a path, not the YAML mapping its `{` would start
        return parts, raw.strip()
    try:
        value = parse_scalar(raw)
    except YamlLimitError as exc:
        raise UserError(f"--set {text!r}: refusing the value: {exc}") from None
    except yaml.YAMLError as exc:  # odd values: say which flag, on one line
        raise UserError(f"--set {text!r}: cannot read the value: {yaml_problem(exc)}") from None
    return parts, value


def _assign(data: dict, origins: dict, parts: KeyPath, value: Any, label: str) -> None:
    """Set a dotted key (creating sections as needed); errors about it will name `label`."""
    if parts[0] == "extends":  # it would be ignored: the parents were merged when the file was read
        raise UserError(f"{label}: `extends` is read from the recipe file only (its parents are merged before any "
                        "override applies); write it in the recipe file, or --set the keys themselves")
    origin: Origin = (label, None)
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
            origins[parts[: depth + 1]] = origin  # a section this flag created: errors about it name the flag
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise UserError(f"{label}: `{where}` holds a value ({child!r}), not a section of keys")
        node = child
    node[parts[-1]] = value
    for stale in [k for k in origins if k[: len(parts)] == parts]:
        del origins[stale]
    origins[parts] = origin


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def _split_key(key: str) -> KeyPath:
    return tuple(int(p) if p.isdigit() else p for p in key.split(".")) if key else ()


def _locate(origins: dict[KeyPath, Origin], key: KeyPath, default_file: str) -> Origin:
    """The file and line of `key`, or of its nearest ancestor that a file sets."""
    for end in range(len(key), 0, -1):
        if key[:end] in origins:
            return origins[key[:end]]
    return default_file, None


def _problems_from_pydantic(exc: ValidationError, stage: str, origins, default_file) -> list[Problem]:
    schema = STAGE_RECIPES[stage]
    problems = []
    seen = set()
    for err in exc.errors():
        loc, owner = _clean_loc(schema, err["loc"])
        key = ".".join(str(p) for p in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            message = unknown_key(stage, loc, list(owner.model_fields) if owner else [])
        elif kind == "missing":
            message = "required key is missing"
        elif isinstance(err.get("ctx", {}).get("error"), KeyedValueError):  # findings about keys of this section
            for sub_key, sub_message in err["ctx"]["error"].problems:
                sub_loc = (*loc, *_split_key(sub_key))
                file, line = _locate(origins, sub_loc, default_file)
                problems.append(Problem(sub_message, ".".join(map(str, sub_loc)), file, line))
            continue
        else:
            message = err["msg"].removeprefix("Value error, ")
            if kind not in ("value_error", "assertion_error") and "input" in err:
                message += f" (got {err['input']!r})"
        if (key, message) in seen:  # a union reports once per member; once is enough
            continue
        seen.add((key, message))
        file, line = _locate(origins, loc, default_file)
        problems.append(Problem(message, key, file, line))
    return problems


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation such as `Section`, `Section | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _clean_loc(schema: type[BaseModel], loc: tuple) -> tuple[KeyPath, type[BaseModel] | None]:
    """Drop pydantic's union-member tags from an error location; return it with the model owning its last key."""
    clean: list = []
    owner: type[BaseModel] | None = None
    annotation: Any = schema
    for part in loc:
        model = _model_class(annotation)
        if model is not None and isinstance(part, str):
            owner = model
            clean.append(part)
            annotation = model.model_fields[part].annotation if part in model.model_fields else None
        elif typing.get_origin(annotation) is dict or isinstance(part, int):
            clean.append(part)
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        # anything else is a union tag such as 'str' or 'list[str]': not a key
    return tuple(clean), owner
