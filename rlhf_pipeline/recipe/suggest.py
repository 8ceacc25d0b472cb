"""The one suggestion an unknown-key error makes: TRL's name for one of ours, else the same name in another
section, else a close spelling in this section, else none; then where to read every key."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from rlhf_pipeline.errors import closest
from rlhf_pipeline.recipe import training_fields
from rlhf_pipeline.recipe.schema import STAGE_RECIPES
from rlhf_pipeline.recipe.trl_names import Alias, alias_for


@cache
def stage_keys(stage: str) -> tuple[str, ...]:
    """Every dotted key (sections included) of a stage's recipe, in schema order, `training.*` of the TRL-backed
    stages included."""
    # imported here: `python -m rlhf_pipeline.recipe.reference` must not find that module already imported
    from rlhf_pipeline.recipe.reference import schema_rows

    keys = [key for key, *_ in schema_rows(STAGE_RECIPES[stage])]
    if stage in training_fields.CONFIG_CLASSES:
        keys += [f"training.{name}" for name in training_fields.fields_for(stage)]
    return tuple(keys)


def trl_alias(stage: str, name: str) -> Alias | None:
    """The table's entry for `name`, when its target exists in this stage's recipes."""
    alias = alias_for(stage, name)
    if alias is None or (alias.key is not None and alias.key not in stage_keys(stage)):
        return None
    return alias


def unknown_key(stage: str, path: tuple, here: Iterable[str], head: str = "unknown key") -> str:
    """The message for an unknown key at `path` (a tuple of keys) of a `stage` recipe; `here` are the keys its
    section accepts."""
    name, parent = str(path[-1]), ".".join(map(str, path[:-1]))
    alias = trl_alias(stage, name)
    if alias is not None:
        target, note = alias.key, alias.note
    else:
        spelt = closest(name, here)
        target = _same_name_elsewhere(stage, name) or (f"{parent}.{spelt}" if parent and spelt else spelt)
        note = ""
    message = head
    if target is not None:  # shown as written in this section, or as a dotted key from the top when elsewhere
        message += f"; did you mean '{target.removeprefix(parent + '.') if parent else target}'?"
        message += f" ({note})" if note else ""
    elif note:
        message += f": {note}"
    return message + ("" if message.endswith("?") else ".") + f" Every key: `{keys_command(stage, path)}`"


def keys_command(stage: str, path: tuple) -> str:
    """The command listing the keys around `path`: its section's, or the whole stage's for a top-level key."""
    section = path[0] if len(path) > 1 else None
    return f"rlhf recipe keys {stage}" + (f" {section}" if section is not None else "")


def _same_name_elsewhere(stage: str, name: str) -> str | None:
    """The first key of this stage that ends in `name` (e.g. `generation.response_length` for `response_length`)."""
    return next((key for key in stage_keys(stage) if key.rsplit(".", 1)[-1] == name), None)
