"""Load a recipe's data: a Hub dataset or local files, a train and an optional held-out split, mapped columns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.errors import did_you_mean
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import data_format

if TYPE_CHECKING:
    from datasets import Dataset


# Every function takes `key`: the recipe section holding the data (`data`, or e.g. `preferences` in an eval recipe).


def check_data_files(loaded: LoadedRecipe, key: str = "data") -> None:
    """Fail early (before anything is loaded or written) when a local data file or a named split is missing."""
    data = getattr(loaded.recipe, key)
    files = data.files or {}
    for field, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
        if files and split is not None and split not in files:
            raise loaded.error(f"{key}.{field}", f"no split {split!r} among {key}.files ({', '.join(files)})"
                                                 f"{did_you_mean(split, files)}")
    for split, paths in files.items():
        for path in paths:
            if not Path(path).is_file():
                raise loaded.error(
                    f"{key}.files",
                    f"no such file: {path} (split {split!r}; relative paths start at the current directory, "
                    f"{Path.cwd()}; write \"{{recipe_dir}}/...\" for a path next to the recipe file)",
                )


def load_splits(loaded: LoadedRecipe, key: str = "data") -> tuple[Dataset, Dataset | None]:
    """The training split and the held-out split (given, carved off with the seed, or None)."""
    data = getattr(loaded.recipe, key)
    check_data_files(loaded, key)
    train = _load_split(loaded, data.train_split, key, "train_split")
    held_out = None
    if data.eval_split:
        held_out = _load_split(loaded, data.eval_split, key, "eval_split")
    elif data.eval_size:
        size = data.eval_size if data.eval_size < 1 else int(data.eval_size)
        if isinstance(size, int) and size >= len(train):
            raise loaded.error(f"{key}.eval_size", f"{size} rows asked for, but the training split has {len(train)}")
        parts = train.train_test_split(test_size=size, seed=loaded.recipe.seed, shuffle=True)
        train, held_out = parts["train"], parts["test"]
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if held_out is not None and data.max_eval_samples:
        held_out = held_out.select(range(min(data.max_eval_samples, len(held_out))))
    return train, held_out


def _load_split(loaded: LoadedRecipe, split: str, key: str, field: str) -> Dataset:
    import datasets

    data = getattr(loaded.recipe, key)
    if data.files:
        builder = data_format(data.files[split][0])
        for path in data.files[split]:
            problem = check_text_file(path, builder)
            if problem:
                raise loaded.error(f"{key}.files", f"split {split!r}: {problem}")
        try:
            dataset = datasets.load_dataset(builder, data_files={split: data.files[split]}, split=split)
        except Exception as exc:  # malformed JSON / CSV / parquet: the user's file, so a user error
            raise loaded.error(f"{key}.files", f"cannot read the {split!r} files: {_first_line(exc)}") from None
        if len(dataset) == 0:
            raise loaded.error(f"{key}.files", f"the {split!r} files hold no rows ({', '.join(data.files[split])})")
        return dataset
    try:
        return datasets.load_dataset(data.dataset, name=data.subset, data_dir=data.data_dir, revision=data.revision,
                                     split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise loaded.error(f"{key}.{field}", f"{data.dataset!r} has no split {split!r}: {_first_line(exc)}") \
                from None
        raise loaded.error(f"{key}.dataset", f"cannot load {data.dataset!r}: {_first_line(exc)}") from None
    except Exception as exc:  # not found, offline, gated: say which dataset and why
        raise loaded.error(f"{key}.dataset", f"cannot load Hub dataset {data.dataset!r}: {_first_line(exc)}") \
            from None


def check_text_file(path: str, builder: str) -> str | None:
    """What is wrong with a local JSON-lines, JSON or CSV file (optionally gzipped), naming the line: not UTF-8, a
    line that is not JSON, no rows at all. None when it reads. (The `datasets` readers fail on these with messages
    that name neither the file nor the line.)"""
    import gzip
    import json
    import zlib

    if builder not in ("json", "csv"):
        return None
    opener = gzip.open if path.endswith(".gz") else open
    whole_json = builder == "json" and ".jsonl" not in path
    rows, chunks = 0, []
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1});"
                            " save the file as UTF-8")
                if whole_json:
                    chunks.append(line)
                if not line.strip():
                    continue
                rows += 1
                if builder == "json" and not whole_json:
                    problem = _json_line_problem(line, path, number)
                    if problem:
                        return problem
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated gzip file
        return f"{path}: cannot be read: {_first_line(exc)}"
    if rows == 0:
        return f"{path} is empty: no rows"
    if whole_json:
        try:
            json.loads("".join(chunks))
        except ValueError:  # not one JSON document: then JSON lines, as `datasets` also accepts in a .json file
            for number, line in enumerate(chunks, 1):
                problem = _json_line_problem(line, path, number) if line.strip() else None
                if problem:
                    return problem
    return None


def _json_line_problem(line: str, path: str, number: int) -> str | None:
    import json

    try:
        json.loads(line.rstrip("\r\n"))
    except ValueError as exc:
        return f"{path}:{number}: not JSON: {getattr(exc, 'msg', exc)} (column {getattr(exc, 'colno', '?')})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def select_columns(loaded: LoadedRecipe, dataset: Dataset, split: str, required: Sequence[str],
                   optional: Sequence[str] = (), key: str = "data") -> Dataset:
    """Keep the columns of the given roles, renamed to the role names (`data.columns` maps role -> column)."""
    mapped = getattr(loaded.recipe, key).columns
    available = dataset.column_names
    sources: dict[str, str] = {}
    for role in (*required, *optional):
        source = getattr(mapped, role, None)
        if source is not None:
            if source not in available:
                raise loaded.error(
                    f"{key}.columns.{role}",
                    f"the {split} data has no column {source!r} (it has: {', '.join(available)})"
                    f"{did_you_mean(source, available)}",
                )
            sources[role] = source
        elif role in available:
            sources[role] = role
        elif role in required:
            raise loaded.error(
                f"{key}.columns",
                f"the {split} data has no `{role}` column (it has: {', '.join(available)}); "
                f"map one with `{key}.columns.{role}: <column>`",
            )
    dataset = dataset.select_columns(list(dict.fromkeys(sources.values())))
    renames = {source: role for role, source in sources.items() if source != role}
    return dataset.rename_columns(renames) if renames else dataset


def roles_present(loaded: LoadedRecipe, dataset: Dataset, roles: Sequence[str], key: str = "data") -> set[str]:
    """Which roles the data provides, mapped or under their own name."""
    mapped = getattr(loaded.recipe, key).columns
    return {r for r in roles if getattr(mapped, r, None) is not None or r in dataset.column_names}
