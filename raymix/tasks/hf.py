"""Load a Hugging Face ``datasets`` dataset into :class:`TaskRecord` objects.

``name_or_path`` is resolved in this order:

1. a local directory written by ``Dataset.save_to_disk`` or
   ``DatasetDict.save_to_disk`` -> ``datasets.load_from_disk`` (for a
   ``DatasetDict`` the ``split`` is picked; a bare ``Dataset`` has no splits);
2. a local data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``) or a
   directory of such files -> ``datasets.load_dataset(<builder>, data_files=...)``;
3. anything else -> a hub id, ``datasets.load_dataset(name, split=, revision=)``.

The ``split`` argument names the *source* split to read; the records all get
raymix split ``"train"`` (the pool builder assigns val/test by instance id).
Ids come from ``id_column`` if given, else ``"<source name>-<split>-<row>"``.
A completion column holding a list of strings gives completion = first item
and references = all items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymix.errors import RaymixError
from raymix.tasks.records import TaskRecord

# File suffix -> datasets' packaged builder name.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_hf_dataset(
    name_or_path: str,
    split: str = "train",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    task: str | None = None,
    task_column: str | None = None,
    id_column: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> list[TaskRecord]:
    """Read rows of one split of a local or hub dataset as task records.

    Args:
        name_or_path: local saved dataset, local data file/dir, or hub id.
        split: source split to read.
        prompt_column, completion_column: columns holding the text.
        task: task name for every row (ignored when ``task_column`` is set);
            default: the last path component / last part of the hub id.
        task_column: column whose value is each row's task name.
        id_column: column holding a stable instance id.
        revision: hub revision (branch, tag or commit); unused for local paths.
        limit: keep at most this many rows (in dataset order).

    Raises:
        RaymixError: for missing paths/columns/splits, bad values, or an
            unreachable hub.
    """
    if limit is not None and limit < 1:
        raise RaymixError(f"limit must be >= 1 or None, got {limit}")
    ds = _open(name_or_path, split, revision)
    if len(ds) == 0:
        raise RaymixError(f"dataset {name_or_path!r} split {split!r} has no rows")

    available = list(ds.column_names)
    for role, col in (
        ("prompt_column", prompt_column),
        ("completion_column", completion_column),
        ("task_column", task_column),
        ("id_column", id_column),
    ):
        if col is not None and col not in available:
            raise RaymixError(
                f"dataset {name_or_path!r}: {role} {col!r} not found; "
                f"available columns: {available}"
            )

    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    source = _source_name(name_or_path)
    default_task = task or source
    wanted = [
        c for c in (prompt_column, completion_column, task_column, id_column) if c
    ]
    # Selecting only the needed columns avoids decoding e.g. image columns per row.
    ds = ds.select_columns(list(dict.fromkeys(wanted)))

    records: list[TaskRecord] = []
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(ds):
        where = f"dataset {name_or_path!r} split {split!r} row {i}"
        prompt = _text(row[prompt_column], prompt_column, where)
        refs = _refs(row[completion_column], completion_column, where)
        name = default_task
        if task_column is not None:
            name = _text(row[task_column], task_column, where)
        rid = f"{source}-{split}-{i}"
        if id_column is not None:
            value = row[id_column]
            if value is None or (isinstance(value, str) and not value):
                raise RaymixError(f"{where}: column {id_column!r} is empty")
            rid = str(value)
        if (name, rid) in seen:
            raise RaymixError(f"{where}: id {rid!r} repeats within task {name!r}")
        seen.add((name, rid))
        records.append(TaskRecord(name, rid, prompt, refs[0], "train", refs))
    return records


def _open(name_or_path: str, split: str, revision: str | None) -> Any:
    import datasets  # imported lazily: it is slow to import and only needed here

    path = Path(name_or_path).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # corrupt/partial save_to_disk output
            raise RaymixError(f"{path}: cannot load saved dataset: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RaymixError(
                    f"{path}: saved dataset has no split {split!r}; available: {list(ds)}"
                )
            ds = ds[split]
        return ds

    if path.is_file() or path.is_dir():
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise RaymixError(
                    f"{path}: unsupported data file type {path.suffix!r}; "
                    f"use one of {sorted(BUILDERS)} or a save_to_disk directory"
                )
            args: tuple[str, ...] = (builder,)
            kwargs: dict[str, Any] = {"data_files": {split: str(path)}}
        else:
            # A directory of data files: let datasets infer the builder and splits.
            args, kwargs = (str(path),), {}
        try:
            return datasets.load_dataset(*args, split=split, **kwargs)
        except Exception as e:  # parse errors, unknown split, mixed file types
            raise RaymixError(f"{path}: cannot load local data: {e}") from e

    if _looks_local(name_or_path):
        raise RaymixError(
            f"{name_or_path}: no such file or directory (Hugging Face dataset)"
        )

    try:
        return datasets.load_dataset(name_or_path, split=split, revision=revision)
    except Exception as e:
        # Offline mode, no network, unknown id or bad split all land here; the
        # original message stays attached for the last two.
        raise RaymixError(
            f"cannot load dataset {name_or_path!r} (split {split!r}, revision {revision!r}) "
            f"from the Hugging Face hub: {type(e).__name__}: {e}. If the hub is "
            "unreachable, download it where there is network and set "
            "HF_DATASETS_OFFLINE=1 to use the cache, or pass a local path "
            "(save_to_disk directory or .json/.jsonl/.csv/.parquet file)"
        ) from e


def _is_saved_dataset(path: Path) -> bool:
    # save_to_disk writes state.json (Dataset) or dataset_dict.json (DatasetDict).
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _looks_local(name: str) -> bool:
    """True for strings that are clearly meant as paths, not hub ids."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or Path(name).suffix.lower() in BUILDERS
        or name.count("/") > 1
    )


def _source_name(name_or_path: str) -> str:
    p = Path(name_or_path.rstrip("/"))
    return p.stem if p.suffix.lower() in BUILDERS else p.name


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise RaymixError(
            f"{where}: column {column!r} must hold strings, got {type(value).__name__}"
        )
    if not value.strip():
        raise RaymixError(f"{where}: column {column!r} is empty")
    return value


def _refs(value: Any, column: str, where: str) -> tuple[str, ...]:
    if isinstance(value, list):
        if not value:
            raise RaymixError(f"{where}: column {column!r} holds an empty list")
        return tuple(_text(v, column, where) for v in value)
    return (_text(value, column, where),)
