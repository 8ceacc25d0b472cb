"""Every recipe key with its type, default and help text, from the schemas themselves.

The same text feeds `rlhf recipe keys STAGE [SECTION]` and `docs/recipe-reference.md`:

    python -m rlhf_pipeline.recipe.reference > docs/recipe-reference.md
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlhf_pipeline.errors import UserError, did_you_mean
from rlhf_pipeline.recipe import training_fields
from rlhf_pipeline.recipe.schema import STAGE_RECIPES

Row = tuple[str, str, str, str]  # key, type, default, help


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "see help"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, _union_type()):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _union_type():
    import types

    return types.UnionType


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):  # a section: not built just to name it
            return "(section defaults)"
        value = factory()
        return "{}" if isinstance(value, dict) else "(section defaults)" if isinstance(value, BaseModel) else str(value)
    return _scalar(field.default)


def _scalar(value: Any) -> str:
    """A default as it is written in YAML: null, true / false, 'text', 2e-05."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def schema_rows(model: type[BaseModel], prefix: str = "") -> list[Row]:
    rows: list[Row] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _model_in(field.annotation)
        rows.append((key, _type_name(field.annotation), _default(field), field.description or ""))
        if nested is not None:
            rows.extend(schema_rows(nested, f"{key}."))
    return rows


def training_rows(stage: str) -> list[Row]:
    rows = []
    owned = training_fields.owned_elsewhere(stage)
    for name, spec in sorted(training_fields.fields_for(stage).items()):
        if name in owned:
            continue
        kind = " | ".join(spec["types"]) if not spec["choices"] else " | ".join(repr(c) for c in spec["choices"])
        rows.append((f"training.{name}", kind, _scalar(spec["default"]), spec["help"]))
    return rows


def stage_reference(stage: str, section: str | None = None, markdown: bool = False) -> str:
    if stage not in STAGE_RECIPES:
        raise UserError(f"unknown stage {stage!r}{did_you_mean(stage, STAGE_RECIPES)} "
                        f"(one of: {', '.join(STAGE_RECIPES)})")
    schema = STAGE_RECIPES[stage]
    rows = schema_rows(schema)
    config_class = training_fields.CONFIG_CLASSES.get(stage)
    if section == "training" and config_class:
        rows = training_rows(stage)
    elif section:
        if section not in schema.model_fields:
            raise UserError(f"{stage} recipes have no section {section!r}{did_you_mean(section, schema.model_fields)} "
                            f"(one of: {', '.join(schema.model_fields)})")
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
    note = (f"`training` takes the fields of {config_class}: `rlhf recipe keys {stage} training` lists them."
            if config_class and section != "training" else "")
    if markdown:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t.replace('|', '&#124;')} | {d.replace('|', '&#124;')} | {h} |" for k, t, d, h in rows]
        return "\n".join(lines) + (f"\n\n{note}" if note else "")
    out = [f"{schema.__doc__.strip().splitlines()[0]}" if schema.__doc__ else stage]
    for key, kind, default, help_text in rows:
        out.append(f"\n  {key}  ({kind}; default {default})")
        if help_text:
            out.append(f"      {help_text}")
    if note:
        out.append(f"\n{note}")
    return "\n".join(out)


def markdown_reference() -> str:
    parts = ["# Recipe reference", "",
             "Generated from the schemas by `python -m rlhf_pipeline.recipe.reference`; the same text is printed by "
             "`rlhf recipe keys STAGE [SECTION]`. Unknown keys are errors everywhere.", ""]
    for stage, schema in STAGE_RECIPES.items():
        parts += [f"## `{stage}`", "", (schema.__doc__ or "").strip(), "", stage_reference(stage, markdown=True), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown_reference())
