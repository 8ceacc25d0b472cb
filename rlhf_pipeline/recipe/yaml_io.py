"""Safe YAML reading that remembers the line of every key, so errors can point at it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import Problem, RecipeError

KeyPath = tuple  # a dotted key as a tuple of str (mapping keys) and int (list indices)


class RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.2; PyYAML's 1.1 rules demand a dot)."""


RecipeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_scalar(text: str) -> Any:
    """Type a command-line value the way the recipe file would (`3` -> int, `1e-4` -> float, `[a, b]` -> list)."""
    return yaml.load(text, Loader=RecipeYamlLoader)


def load_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Read a YAML file safely. Returns the data and the 1-based line of every key and list item."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("no such recipe file", file=str(path))]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(f"not a YAML text file: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                                   "is not UTF-8", file=str(path))]) from None
    except OSError as exc:  # a directory, no permission, ...
        raise RecipeError([Problem(f"cannot read recipe: {exc.strerror or exc}", file=str(path))]) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise RecipeError([Problem("not a YAML text file: it holds NUL bytes", file=str(path), line=line)])
    loader = None
    try:
        loader = RecipeYamlLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if re.search(r"^[^#'\"]*[:-]\s*\{recipe_dir\}", text, re.MULTILINE):
            problem += (' (a value starting with {recipe_dir} needs quotes: "{recipe_dir}/data/train.jsonl"; '
                        "unquoted, YAML reads `{` as the start of a mapping)")
        raise RecipeError(
            [Problem(f"invalid YAML: {problem}", file=str(path), line=mark.line + 1 if mark else None)]
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[KeyPath, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _index_lines(node, (), lines, problems, str(path))
    if problems:
        raise RecipeError(problems)
    return data, lines


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict, problems: list, file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                problems.append(Problem("duplicate key (the later one would silently win)", dotted, file, line))
            seen.add(key)
            lines[(*path, key)] = line
            _index_lines(value_node, (*path, key), lines, problems, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _index_lines(item, (*path, index), lines, problems, file)


def dump_yaml(data: Any) -> str:
    """YAML for people: keys in recipe order, block style."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
