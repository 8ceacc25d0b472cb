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


# A recipe is a few kilobytes. These limits refuse, quickly and with one line, what no recipe needs and what would
# exhaust memory or time: a huge file (or /dev/zero), an alias bomb (a few lines of `&a [*b, *b, ...]` that expand to
# billions of values), nesting deep enough to overflow Python's stack.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000  # scalars, mappings and lists, counted with every alias expanded
MAX_DEPTH = 64


class YamlLimitError(ValueError):
    """A YAML text beyond the limits above (or one PyYAML itself cannot hold): the message says which."""


def parse_scalar(text: str) -> Any:
    """Type a command-line value the way the recipe file would (`3` -> int, `1e-4` -> float, `[a, b]` -> list).
    Raises yaml.YAMLError or YamlLimitError."""
    return load_text(text)[0]


def load_text(text: str) -> tuple[Any, yaml.Node | None]:
    """Safely load one YAML document from `text` within the limits above; returns the data and its node tree.
    Raises yaml.YAMLError (bad YAML) or YamlLimitError."""
    if len(text) > MAX_BYTES:
        raise YamlLimitError(f"{len(text):,} characters: larger than any recipe (the limit is {MAX_BYTES:,})")
    loader = RecipeYamlLoader(text)  # its reader refuses control characters here
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep") from None
        if node is not None:
            check_size(node)
        try:
            data = loader.construct_document(node) if node is not None else None
        except ValueError as exc:  # an integer of more than 4,300 digits (Python's limit), a date such as 2024-13-45
            reason = ("an integer of more than 4,300 digits" if "digits" in str(exc)
                      else f"a value cannot be read: {_first_line(exc)}")
            raise YamlLimitError(reason) from None
    finally:
        loader.dispose()
    return data, node


def check_size(root: yaml.Node) -> None:
    """Refuse a node tree nested deeper than MAX_DEPTH or holding more than MAX_VALUES values once its aliases are
    expanded. Aliases share nodes, so each node's expanded size is counted once (memoised): a bomb is caught in
    time proportional to its text, never expanded."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep")
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise YamlLimitError("an anchor (`&name`) holds an alias to itself: its value would be infinite")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item, depth + 1) for item in node.value)
        else:
            total = 1
        if total > MAX_VALUES:
            raise YamlLimitError(f"more than {MAX_VALUES:,} values once its aliases (`*name`) are expanded: an alias "
                                 "bomb, or not a recipe")
        sizes[id(node)] = total
        return total

    size(root, 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong (PyYAML's own text spans several lines, with a caret)."""
    problem = getattr(exc, "problem", None) or _first_line(exc)
    mark = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None)
    return (f"{context}: {problem}" if context and getattr(exc, "problem", None) else problem) + (
        f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def read_text_file(path: Path, what: str = "recipe") -> str:
    """A small regular UTF-8 text file's text; RecipeError naming the file when it is missing, not a regular file (a
    directory, a FIFO that would block, a device such as /dev/zero), larger than MAX_BYTES, or not UTF-8 text."""
    try:
        if not path.exists():
            raise RecipeError([Problem(f"no such {what} file", file=str(path))])
        if path.is_dir():
            raise RecipeError([Problem(f"cannot read {what}: it is a directory", file=str(path))])
        if not path.is_file():
            raise RecipeError([Problem(f"cannot read {what}: not a regular file (a FIFO, a device or a socket)",
                                       file=str(path))])
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:  # no permission, a name too long, ...
        raise RecipeError([Problem(f"cannot read {what}: {exc.strerror or exc}", file=str(path))]) from None
    except ValueError as exc:  # an embedded NUL byte in the path
        raise RecipeError([Problem(f"cannot read {what}: {exc}", file=repr(str(path)))]) from None
    if len(raw) > MAX_BYTES:
        raise RecipeError([Problem(f"larger than any {what} (over {MAX_BYTES:,} bytes): refusing to read it",
                                   file=str(path))])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        kind = "YAML" if what == "recipe" else "UTF-8"
        raise RecipeError([Problem(f"not a {kind} text file: byte 0x{exc.object[exc.start]:02x} at offset "
                                   f"{exc.start} is not UTF-8", file=str(path))]) from None


def load_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Read a YAML file safely. Returns the data and the 1-based line of every key and list item."""
    text = read_text_file(path)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise RecipeError([Problem("not a YAML text file: it holds NUL bytes", file=str(path), line=line)])
    try:
        data, node = load_text(text)
    except YamlLimitError as exc:
        raise RecipeError([Problem(f"refusing this YAML: {exc}", file=str(path))]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or _first_line(exc)
        if re.search(r"^[^#'\"]*[:-]\s*\{recipe_dir\}", text, re.MULTILINE):
            problem += (' (a value starting with {recipe_dir} needs quotes: "{recipe_dir}/data/train.jsonl"; '
                        "unquoted, YAML reads `{` as the start of a mapping)")
        position = getattr(exc, "position", None)  # a reader error (a control character) has no mark
        line = mark.line + 1 if mark else text.count("\n", 0, position) + 1 if position is not None else None
        raise RecipeError([Problem(f"invalid YAML: {problem}", file=str(path), line=line)]) from None
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
