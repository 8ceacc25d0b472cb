"""Load a recipe's data: a Hub dataset or local files, a train and an optional held-out split, mapped columns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.errors import did_you_mean
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import BUILDERS, data_format, split_names

if TYPE_CHECKING:
    from datasets import Dataset


# Every function takes `key`: the recipe section holding the data (`data`, or e.g. `preferences` in an eval recipe).


def check_data_files(loaded: LoadedRecipe, key: str = "data") -> None:
    """Fail early (before anything is loaded or written) when a local data file or a named split is missing, or a
    mixture's fractions are set on some entries only."""
    data = getattr(loaded.recipe, key)
    files = data.files or {}
    for field, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
        for name in split_names(split) if files and split is not None else []:
            if name not in files:
                raise loaded.error(f"{key}.{field}", f"no split {name!r} among {key}.files ({', '.join(files)})"
                                                     f"{did_you_mean(name, files)}")
    _check_files_exist(loaded, files, f"{key}.files")
    fractions = [entry.fraction is not None for entry in data.datasets]
    if any(fractions) and not all(fractions):
        index = fractions.index(False)
        raise loaded.error(f"{key}.datasets.{index}", "no `fraction`, but other entries have one: set a fraction on "
                                                      "every entry of the mixture or on none")
    for index, entry in enumerate(data.datasets):
        _check_files_exist(loaded, entry.data_files or {}, f"{key}.datasets.{index}.data_files")


def _check_files_exist(loaded: LoadedRecipe, files: dict[str, list[str]], files_key: str) -> None:
    for split, paths in files.items():
        for path in paths:
            if Path(path).exists() and not Path(path).is_file():
                kind = "a directory" if Path(path).is_dir() else "not a regular file (a FIFO, a device or a socket)"
                raise loaded.error(files_key, f"{path} is {kind}: expected a data file (split {split!r})")
            if not Path(path).is_file():
                raise loaded.error(
                    files_key,
                    f"no such file: {path} (split {split!r}; relative paths start at the current directory, "
                    f"{Path.cwd()}; write \"{{recipe_dir}}/...\" for a path next to the recipe file)",
                )


def column_mapping(section):
    """The section's `columns` (role -> column) as they apply to the loaded data: a mixture's entries were mapped
    onto the roles as they loaded, so nothing is left to map."""
    return type(section.columns)() if section.datasets else section.columns


def load_splits(loaded: LoadedRecipe, key: str = "data") -> tuple[Dataset, Dataset | None]:
    """The training split (a mixture's entries concatenated) and the held-out split (given, carved off with the
    seed, or None)."""
    data = getattr(loaded.recipe, key)
    check_data_files(loaded, key)
    if data.datasets:
        train = _load_mixture(loaded, key)
    else:
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
    data = getattr(loaded.recipe, key)
    if data.files:
        return _read_local(loaded, data.files, split, None, f"{key}.files", f"{key}.{field}", data.sample_by)
    return _load_dataset(loaded, data.dataset, split, f"{key}.dataset", f"{key}.{field}", name=data.subset,
                         data_dir=data.data_dir, revision=data.revision)


def _load_dataset(loaded: LoadedRecipe, path: str, split: str, path_key: str, split_key: str, **options) -> Dataset:
    """`datasets.load_dataset` on a Hub dataset (or a local dataset dir); a failure names the recipe key to fix."""
    import datasets

    try:
        return datasets.load_dataset(path, split=split, **options)
    except ValueError as exc:
        if "split" in str(exc).lower() or "instruction" in str(exc).lower():
            raise loaded.error(split_key, f"{path!r} has no split {split!r}: {_first_line(exc)}") from None
        raise loaded.error(path_key, f"cannot load {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # not found, offline, gated: say which dataset and why
        raise loaded.error(path_key, f"cannot load dataset {path!r}: {_first_line(exc)}") from None


def _read_local(loaded: LoadedRecipe, files: dict[str, list[str]], split: str, builder: str | None, files_key: str,
                split_key: str, sample_by: str | None) -> Dataset:
    """The split (or slice: `train[:10%]`, which `datasets` cuts) of local files, each checked first so that a
    broken file is named with its line."""
    import datasets

    wanted = {name: files[name] for name in split_names(split)}
    builder = builder or data_format(next(iter(wanted.values()))[0])
    for paths in wanted.values():
        for path in paths:
            problem = check_text_file(path, builder)
            if problem:
                raise loaded.error(files_key, f"split {split!r}: {problem}")
    options = {"sample_by": sample_by or "line"} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=wanted, split=split, **options)
    except ValueError as exc:
        if "instruction" in str(exc).lower():  # a slice that selects nothing, or an unknown rounding
            raise loaded.error(split_key, f"{split!r}: {_first_line(exc)}") from None
        raise loaded.error(files_key, f"cannot read the {split!r} files: {_first_line(exc)}") from None
    except Exception as exc:  # malformed JSON / CSV / parquet: the user's file, so a user error
        raise loaded.error(files_key, f"cannot read the {split!r} files: {_first_line(exc)}") from None
    if builder == "text":  # blank lines (paragraph breaks, a trailing newline) are not documents
        dataset = dataset.filter(lambda row: bool(row["text"].strip()), desc="Leaving out blank lines")
    if len(dataset) == 0:
        listed = ", ".join(p for paths in wanted.values() for p in paths)
        raise loaded.error(files_key, f"the {split!r} files hold no rows ({listed})")
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# mixtures (TRL's `datasets:` shape)
# ---------------------------------------------------------------------------------------------------------------
def _load_mixture(loaded: LoadedRecipe, key: str) -> Dataset:
    """Every entry loaded and mapped onto the roles, cut to its share when fractions are set, then concatenated."""
    import datasets

    section = getattr(loaded.recipe, key)
    parts, roles = [], []
    for index, entry in enumerate(section.datasets):
        where = f"{key}.datasets.{index}"
        dataset, given = _onto_roles(loaded, _load_entry(loaded, entry, where, section.sample_by), entry, key, where)
        if roles and given != roles[0]:
            raise loaded.error(where, f"gives the roles {', '.join(sorted(given)) or 'none'}, but {key}.datasets.0 "
                                      f"gives {', '.join(sorted(roles[0]))}: every entry must give the same roles "
                                      "(map them with `columns`)")
        parts.append(dataset)
        roles.append(given)
    shared = set.intersection(*(set(p.column_names) for p in parts))  # other columns: those every entry has
    parts = [p.select_columns([c for c in p.column_names if c in shared]) for p in parts]
    if section.datasets[0].fraction is not None:
        parts = _cut_to_fractions(parts, [entry.fraction for entry in section.datasets])
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:  # the same column with different types
        features = "; ".join(f"datasets.{i}: {dict(p.features)}" for i, p in enumerate(parts))
        raise loaded.error(f"{key}.datasets", f"the entries' columns differ in type ({_first_line(exc)}): "
                                              f"{features}") from None


def _load_entry(loaded: LoadedRecipe, entry, where: str, sample_by: str | None) -> Dataset:
    if entry.data_files is not None and (entry.path is None or entry.path in BUILDERS):
        return _read_local(loaded, entry.data_files, entry.split, entry.path, f"{where}.data_files", f"{where}.split",
                           sample_by)
    return _load_dataset(loaded, entry.path, entry.split, f"{where}.path", f"{where}.split", name=entry.name,
                         data_dir=entry.data_dir, data_files=entry.data_files, revision=entry.revision)


def _onto_roles(loaded: LoadedRecipe, dataset: Dataset, entry, key: str, where: str) -> tuple[Dataset, set[str]]:
    """The entry's columns renamed to the roles they fill (its own `columns`, else the section's; a column already
    named like a role fills it), with its other columns kept; and the roles it gives."""
    own = entry.columns is not None
    mapping = entry.columns if own else getattr(loaded.recipe, key).columns
    roles = list(type(mapping).model_fields)
    sources = _role_sources(loaded, mapping, dataset.column_names, roles, f"{where if own else key}.columns", where)
    others = [c for c in dataset.column_names if c not in roles and c not in sources.values()]
    return _renamed_to_roles(dataset, sources, others), set(sources)


def _cut_to_fractions(parts: list[Dataset], fractions: list[float]) -> list[Dataset]:
    """TRL's rule for `fraction`: shares normalised to 1; the mixture is as large as it can be with no entry giving
    a row twice; each entry gives its first rows."""
    shares = [f / sum(fractions) for f in fractions]
    size = min(len(part) / share for part, share in zip(parts, shares))
    return [part.select(range(round(share * size))) for part, share in zip(parts, shares)]


def check_text_file(path: str, builder: str) -> str | None:
    """What is wrong with a local JSON-lines, JSON or CSV file (optionally gzipped), naming the line: not UTF-8, a
    line that is not JSON, no rows at all. None when it reads. (The `datasets` readers fail on these with messages
    that name neither the file nor the line.)"""
    import gzip
    import json
    import zlib

    if builder not in ("json", "csv", "text"):
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
    sources = _role_sources(loaded, column_mapping(getattr(loaded.recipe, key)), dataset.column_names,
                            (*required, *optional), f"{key}.columns", f"the {split} data", required)
    dataset = _renamed_to_roles(dataset, sources)
    _check_role_values(loaded, dataset, sources, split, key)
    return dataset


TEXT_ROLES = ("text", "prompt", "completion", "chosen", "rejected", "messages")


def _check_role_values(loaded: LoadedRecipe, dataset: Dataset, sources: dict[str, str], split: str, key: str) -> None:
    """Every row's value of a text role is text (`text`), a list of messages (`messages`) or either (the others), and
    none is missing: a number or a null would otherwise fail deep inside TRL or the tokenizer (AttributeError:
    'NoneType' object has no attribute 'endswith') or be read as a conversation."""
    from datasets import Value

    for role, column in sources.items():
        if role not in TEXT_ROLES:
            continue
        feature = dataset.features[role]
        text = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        listed = not isinstance(feature, Value)
        where = f"{key}.columns.{role}" if column != role else key
        if not (listed if role == "messages" else text or (listed and role != "text")):
            expected = {"messages": "a list of messages", "text": "text"}.get(role, "text or a list of messages")
            found = feature.dtype if isinstance(feature, Value) else type(feature).__name__
            raise loaded.error(where, f"the {split} data's `{column}` column holds {found} values; expected {expected}")
        missing = sum(value is None for value in dataset[role])
        if missing:
            raise loaded.error(where, f"the {split} data: {missing} of {len(dataset)} rows have no `{column}` (null or "
                                      "absent); every row needs one")


def _role_sources(loaded: LoadedRecipe, mapping, available: Sequence[str], roles: Sequence[str], columns_key: str,
                  what: str, required: Sequence[str] = ()) -> dict[str, str]:
    """Role -> the column that fills it: the one `mapping` names (which must exist), else a column named like the
    role; a `required` role filled by neither is an error at `columns_key`."""
    sources: dict[str, str] = {}
    for role in roles:
        source = getattr(mapping, role, None)
        if source is not None:
            if source not in available:
                raise loaded.error(f"{columns_key}.{role}", f"{what} has no column {source!r} (it has: "
                                                            f"{', '.join(available)}){did_you_mean(source, available)}")
            sources[role] = source
        elif role in available:
            sources[role] = role
        elif role in required:
            raise loaded.error(columns_key, f"{what} has no `{role}` column (it has: {', '.join(available)}); map "
                                            f"one with `{columns_key}.{role}: <column>`")
    return sources


def _renamed_to_roles(dataset: Dataset, sources: dict[str, str], others: Sequence[str] = ()) -> Dataset:
    """The role columns (renamed to their roles) and `others`, nothing else."""
    dataset = dataset.select_columns(list(dict.fromkeys([*sources.values(), *others])))
    renames = {source: role for role, source in sources.items() if source != role}
    return dataset.rename_columns(renames) if renames else dataset


def roles_present(loaded: LoadedRecipe, dataset: Dataset, roles: Sequence[str], key: str = "data") -> set[str]:
    """Which roles the data provides, mapped or under their own name."""
    mapped = column_mapping(getattr(loaded.recipe, key))
    return {r for r in roles if getattr(mapped, r, None) is not None or r in dataset.column_names}
