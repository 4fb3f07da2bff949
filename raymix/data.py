"""The data plane: task sources -> records -> tokenised Parquet shards.

``load_pool`` reads every configured source into :class:`TaskRecord` objects
and splits them; ``prepare_shards`` tokenises them with Ray Data
(``map_batches`` in a pool of tokenizer actors) and writes Parquet shards
partitioned by split and shard group (a large task alone, small tasks
together: :func:`shard_groups`), every row carrying its task index, with
exact token counts in ``stats.json``. The shards are cached by a content hash
of the records, the tokenizer and the template, so a second run with the
same inputs skips the work.

Training does not read through Ray Data: an online policy changes the mixture
while training runs, which a Ray Data pipeline fixes when it is built, and Ray
counts rows where the budget counts tokens. So each worker samples per-task
streams (``raymix.streams``) over the same shards.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from raymix.config import DataConfig, SourceConfig
from raymix.errors import RaymixError
from raymix.shard_cache import CACHE_KEY_VERSION, cache_problem, discard, write_manifest
from raymix.streams import TaskShards
from raymix.tasks.records import TaskRecord, assign_splits, group_by_task
from raymix.tokenizing import TOKENIZER_THREADS, Tokenize, tokenize_args, tokenizer_actors

SMALL_TASK_ROWS = 1024
"""A task with fewer rows than this in a split shares that split's files
with other such tasks (see :func:`shard_groups`); a larger one has files of
its own, read as a stream of chunks."""
SHARED_GROUP_ROWS = 4096
"""Small tasks are put together until their group holds at least this many
rows. A directory per task cost a file per task and split at every step
that touches them all: at 1,000 tasks of 60 examples, 3,000 files written
and hashed when the pool is prepared, and 1,000 Parquet footers per scan of
a split (0.23 s, against 5 ms for the same rows in one file) at each worker's
start and each evaluation. Grouped, a split's file count follows its rows,
not its tasks; a reader of one small task decodes its group's file (4,096
short rows: a few milliseconds, and cached: ``raymix.streams``)."""


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("RAYMIX_CACHE") or "~/.cache/raymix"
    return Path(root).expanduser().resolve()  # absolute: Ray workers run in directories of their own


# ----------------------------------------------------------------------------
# Records


def _load_source(src: SourceConfig) -> list[TaskRecord]:
    if src.kind == "synthetic":
        from raymix.tasks.synthetic import generate_suite

        return generate_suite(scale=src.scale, seed=src.seed, tasks=src.tasks)
    if src.kind == "natural_instructions":
        from raymix.tasks.natural_instructions import load_natural_instructions

        return load_natural_instructions(
            src.path, src.positive_examples, src.max_instances, src.tasks
        )
    if src.kind == "jsonl":
        from raymix.tasks.jsonl import load_jsonl

        return load_jsonl(src.path, task=src.task)
    from raymix.tasks.hf import load_hf_dataset

    return load_hf_dataset(
        src.path,
        split=src.split,
        prompt_column=src.prompt_column,
        completion_column=src.completion_column,
        task=src.task,
        task_column=src.task_column,
        id_column=src.id_column,
        revision=src.revision,
    )


def load_pool(cfg: DataConfig) -> list[TaskRecord]:
    """All sources' records, subsampled per ``task_sizes`` and split by instance id."""
    by_task: dict[str, list[TaskRecord]] = {}
    origin: dict[str, str] = {}
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}] ({src.kind}{': ' + src.path if src.path else ''})"
        groups = group_by_task(_load_source(src))
        if not groups:
            raise RaymixError(f"{where}: no tasks found")
        for task, recs in groups.items():
            if task in by_task:
                raise RaymixError(
                    f"duplicate task name {task!r}: in {origin[task]} and in {where}; "
                    "rename one (e.g. the jsonl 'task' field or the file name)"
                )
            if src.task_sizes and task in src.task_sizes:
                want = src.task_sizes[task]
                rng = random.Random(f"{src.seed}:{task}")
                recs = sorted(recs, key=lambda r: r.id)
                recs = rng.sample(recs, min(want, len(recs)))
            by_task[task] = recs
            origin[task] = where
        if src.task_sizes:
            unknown = sorted(set(src.task_sizes) - set(groups))
            if unknown:
                raise RaymixError(f"{where}.task_sizes: unknown task(s) {unknown}")
    out: list[TaskRecord] = []
    for task, recs in by_task.items():
        if not recs:
            raise RaymixError(f"task {task!r} in {origin[task]} has no instances")
        if any(r.split != "train" for r in recs):
            out.extend(recs)  # the source gave its own splits
        else:
            out.extend(
                assign_splits(recs, cfg.val_fraction, cfg.test_fraction, cfg.max_val, cfg.max_test)
            )
    return out


def records_fingerprint(records: list[TaskRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_row(), sort_keys=True).encode())
    return h.hexdigest()


def _hash_files(h, paths: list[Path]) -> None:
    for p in sorted(paths):
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)


def source_fingerprint(src: SourceConfig, where: str) -> str:
    """A hash of what a source's records are made from, cheap to compute.

    Files are hashed by content; the synthetic suite by its parameters and
    its generator's source code (so a changed generator invalidates caches);
    a hub dataset by its source fields (name, split, ``revision``: only a
    pinned commit follows the hub's data).
    """
    from dataclasses import asdict

    h = hashlib.sha256(json.dumps(asdict(src), sort_keys=True).encode())
    if src.kind == "synthetic":
        return h.hexdigest()  # its generator is code: pool_fingerprint hashes it
    path = Path(src.path).expanduser()
    if src.kind == "hf" and not path.exists():
        return h.hexdigest()  # a hub id: name, split and revision identify it
    if not path.exists():
        raise RaymixError(f"{where}.path: {src.path} does not exist")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    _hash_files(h, files)
    return h.hexdigest()


def saved_tokenizer_hash(directory: Path) -> str:
    """A saved tokenizer's content: every file ``save_pretrained`` wrote
    (vocabulary, merges, special tokens, chat template), by name and bytes.
    The shards' key names a tokenizer by it, not by its path or hub id:
    another tokenizer there (a retrained vocabulary, a new chat template)
    makes other tokens."""
    return _files_hash([p for p in Path(directory).iterdir() if p.is_file()])


def _files_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    _hash_files(h, paths)
    return h.hexdigest()


def pool_fingerprint(cfg: DataConfig) -> str:
    """What the pool's records depend on: the sources, the split settings
    and the code that reads and splits them (every module of
    :mod:`raymix.tasks`: the loaders, the synthetic generator and the split
    rule), so that a changed loader or split cannot reuse a cache of records
    made by the old one."""
    import raymix.tasks

    parts = [
        source_fingerprint(src, f"data.sources[{i}]") for i, src in enumerate(cfg.sources)
    ]
    parts.append(json.dumps([cfg.val_fraction, cfg.test_fraction, cfg.max_val, cfg.max_test]))
    parts.append(_files_hash(list(Path(raymix.tasks.__file__).parent.glob("*.py"))))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------
# Tokenisation (runs inside Ray Data actors)


def shard_groups(rows: Sequence[int]) -> list[list[int]]:
    """The task indices of each shard group of one split, given each task's
    row count in it, in pool order: a task with at least
    :data:`SMALL_TASK_ROWS` rows alone, smaller ones together (in pool order,
    leaving out tasks with no rows) until their group holds
    :data:`SHARED_GROUP_ROWS` rows."""
    groups: list[list[int]] = []
    shared: list[int] = []
    held = 0
    for i, n in enumerate(rows):
        if n <= 0:
            continue
        if n >= SMALL_TASK_ROWS:
            groups.append([i])
            continue
        shared.append(i)
        held += n
        if held >= SHARED_GROUP_ROWS:
            groups.append(shared)
            shared, held = [], 0
    if shared:
        groups.append(shared)
    return groups


def assign_shards(recs: Sequence[TaskRecord], index: dict[str, int]) -> tuple[dict[str, list[list[int]]], list[int]]:
    """Each split's shard groups (:func:`shard_groups`) and each record's group."""
    rows = {split: np.zeros(len(index), dtype=np.int64) for split in ("train", "val", "test")}
    for r in recs:
        rows[r.split][index[r.task]] += 1
    groups = {split: shard_groups(n.tolist()) for split, n in rows.items()}
    group_of = {(split, i): k for split, gs in groups.items() for k, g in enumerate(gs) for i in g}
    return groups, [group_of[(r.split, index[r.task])] for r in recs]


@dataclass(frozen=True)
class PreparedPool:
    """Where the shards are and what they hold."""

    root: str
    tasks: tuple[str, ...]
    stats: dict
    """{split: {task: {examples, tokens, completion_tokens, truncated, dropped}}},
    ``tasks`` (the pool's order) and ``shards`` ({split: the task indices of
    each shard group}: :func:`shard_groups`)."""
    cache_hit: bool
    seconds: float

    def shards(self, split: str, task: str) -> TaskShards:
        """The files that hold a task's rows of a split (none when it has no
        rows there), and whether they hold other tasks' rows too."""
        return self._shards.get(split, {}).get(self.task_index[task], TaskShards((), None))

    @functools.cached_property
    def _shards(self) -> dict[str, dict[int, TaskShards]]:
        out: dict[str, dict[int, TaskShards]] = {}
        for split, groups in self.stats.get("shards", {}).items():
            out[split] = {}
            for k, group in enumerate(groups):
                files = tuple(sorted(glob.glob(os.path.join(self.root, f"split={split}", f"shard={k}", "*.parquet"))))
                for i in group:
                    out[split][i] = TaskShards(files, i if len(group) > 1 else None)
        return out

    @functools.cached_property
    def task_index(self) -> dict[str, int]:
        """Task name -> its index (``tasks.index`` is O(T) a call: O(T^2) over a pool)."""
        return {t: i for i, t in enumerate(self.tasks)}

    def read_split_rows(self, split: str, columns: list[str]) -> tuple[np.ndarray, dict[str, list]]:
        """Every task's rows of a split in one scan (as ``raymix.streams.read_split``
        reads one task's: ordered by id, dropped rows left out), grouped by
        task in pool order: (each row's task index, the columns). One
        multi-threaded scan instead of a Python call per task."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        where = os.path.join(self.root, f"split={split}")
        if not os.path.isdir(where):
            return np.zeros(0, dtype=np.int64), {c: [] for c in columns}
        cache = self.__dict__.get("_split_tables")
        table = cache.get(split) if cache is not None else None
        if table is None or not set(columns) <= set(table.column_names):
            wanted = (columns + (table.column_names if table is not None else [])
                      + self.__dict__.get("_split_columns", []))
            table = pads.dataset(where, format="parquet", partitioning="hive").to_table(
                columns=list(dict.fromkeys(wanted + ["status", "id", "task_idx"])))
            table = table.filter(pc.not_equal(table["status"], "dropped")).sort_by([("task_idx", "ascending"),
                                                                                     ("id", "ascending")])
            if cache is not None:
                cache[split] = table
        return table.column("task_idx").to_numpy().astype(np.int64), {c: table.column(c).to_pylist()
                                                                       for c in columns}

    @contextlib.contextmanager
    def splits_read_once(self, columns: Sequence[str] = ()):
        """Within the block, each split is read from disk once (with
        ``columns`` and whatever else a reader asks for) and served from
        memory after: the final evaluation reads the test split for its
        losses and again for exact match, and a scan of a pool of thousands
        of tasks costs a file open per task (0.3 s per split at 1,000 tasks,
        against 0.02-0.07 s at 20). Outside it nothing is held."""
        self.__dict__["_split_tables"] = {}
        self.__dict__["_split_columns"] = list(columns)
        try:
            yield self
        finally:
            self.__dict__.pop("_split_tables", None)
            self.__dict__.pop("_split_columns", None)

    def completion_per_example(self, default: float) -> np.ndarray:
        """Per task, the mean completion tokens of a training example (from
        the pool's statistics; ``default`` where they are missing)."""
        train = self.stats.get("train", {})
        return np.array([train[t]["completion_tokens"] / train[t]["examples"]
                         if train.get(t, {}).get("examples") and train[t].get("completion_tokens") else default
                         for t in self.tasks], dtype=np.float64)

    def train_tokens(self) -> np.ndarray:
        return np.array([self.stats["train"][t]["tokens"] for t in self.tasks], dtype=np.int64)

    def train_examples(self) -> np.ndarray:
        return np.array([self.stats["train"][t]["examples"] for t in self.tasks], dtype=np.int64)

    @property
    def pool_tokens(self) -> int:
        return int(self.train_tokens().sum())


def prepare_shards(
    records: Callable[[], list[TaskRecord]],
    pool_fp: str,
    tokenizer_name: str,
    tokenizer_fingerprint: str,
    cfg: DataConfig,
    concurrency: int = 1,
) -> PreparedPool:
    """Tokenise the pool with Ray Data into cached per-task Parquet shards.

    ``records`` is only called on a cache miss; ``pool_fp`` (from
    :func:`pool_fingerprint`) identifies the records without loading them.
    """
    import inspect

    import pyarrow as pa
    import pyarrow.dataset as pads
    import ray

    import raymix.tokenizing
    from raymix.models import render_completion, render_prompt, uses_chat_template

    t0 = time.perf_counter()
    # The code that turns records into tokens is part of the key: the
    # tokenising actor, the prompt and answer templates.
    code = hashlib.sha256("".join(inspect.getsource(f) for f in (
        raymix.tokenizing, render_prompt, render_completion, uses_chat_template)).encode()).hexdigest()
    key = hashlib.sha256(
        json.dumps(
            [
                CACHE_KEY_VERSION,
                pool_fp,
                tokenizer_fingerprint,
                code,
                cfg.template,
                cfg.max_seq_len,
            ]
        ).encode()
    ).hexdigest()[:20]
    root = cache_root(cfg) / "shards" / key
    stats_file = root / "stats.json"
    if root.exists():  # stats.json missing is one of its problems
        problem = cache_problem(root)
        if problem is None:
            stats = json.loads(stats_file.read_text())
            return PreparedPool(str(root), tuple(stats["tasks"]), stats, True, time.perf_counter() - t0)
        # The cache is derived data: rebuilt from the sources, which are
        # untouched, rather than read into a crash mid-run.
        print(f"[raymix] pool cache {root}: {problem}; rebuilding it", file=sys.stderr, flush=True)
        discard(root)

    recs = records()
    tasks = tuple(dict.fromkeys(r.task for r in recs))
    index = {t: i for i, t in enumerate(tasks)}
    groups, shard = assign_shards(recs, index)
    # An Arrow table, not a pandas frame: Ray Data's blocks are Arrow, so
    # from_arrow slices it without a copy, where from_pandas converted every
    # block again in a task (with the frame's own build, about 2 s of the
    # embedded default's 560,800 rows; python -m raymix.bench data_plane).
    frame = pa.table(
        {
            "task_idx": pa.array([index[r.task] for r in recs], type=pa.int32()),
            "shard": pa.array(shard, type=pa.int32()),
            "split": pa.array([r.split for r in recs], type=pa.string()),
            "id": pa.array([r.id for r in recs], type=pa.string()),
            "prompt": pa.array([r.prompt for r in recs], type=pa.string()),
            "completion": pa.array([r.completion for r in recs], type=pa.string()),
            "references": pa.array([list(r.references) for r in recs], type=pa.list_(pa.string())),
        }
    )
    tokenize = tokenize_args(tokenizer_name, cfg.template, cfg.max_seq_len)
    tmp = root.parent / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Read before the dataset exists: read after it, 2 free CPUs counted as 1.
    actors, actor_cpus = tokenizer_actors(ray.available_resources().get("CPU", 1), concurrency)
    chunk = max(2000, -(-len(frame) // 64))
    ds = ray.data.from_arrow([frame.slice(i, chunk) for i in range(0, len(frame), chunk)])
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={**tokenize, "threads": 1},
        batch_size=1024,
        batch_format="numpy",
        # Calls at once per actor, each encoding on its own thread (see
        # TOKENIZER_THREADS); the UDF itself, not only Ray's batching, runs
        # concurrently (enable_true_multi_threading): Tokenize only reads
        # its state after __init__.
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=TOKENIZER_THREADS,
                                           enable_true_multi_threading=True),
        num_cpus=actor_cpus,
    )
    # Blocks in input order: the calls run concurrently, and the Parquet
    # files (named by write task, which the streams read in name order)
    # would otherwise hold the rows in an order that changes between builds
    # of the same cache, and with it what a seed draws.
    ds.context.execution_options.preserve_order = True
    ds.write_parquet(str(tmp), partition_cols=["split", "shard"], ray_remote_args={"num_cpus": 0.1})

    table = pads.dataset(str(tmp), format="parquet", partitioning="hive").to_table(
        columns=["split", "task_idx", "n_tokens", "prompt_len", "status"]
    )
    frame = table.to_pandas()
    frame["task_idx"] = frame["task_idx"].astype(int)
    frame["completion_tokens"] = frame["n_tokens"] - frame["prompt_len"]
    # One grouping pass (a mask per split and task was O(T x rows): minutes at thousands of tasks).
    frame["ok"] = frame["status"] != "dropped"
    for col in ("n_tokens", "completion_tokens"):
        frame[col] = frame[col].where(frame["ok"], 0)
    frame["truncated"] = frame["status"] == "truncated"
    frame["dropped"] = ~frame["ok"]
    sums = frame.groupby(["split", "task_idx"])[["ok", "n_tokens", "completion_tokens", "truncated", "dropped"]].sum()
    found = {key: row for key, row in zip(sums.index, sums.itertuples(index=False))}
    stats: dict = {}
    for split in ("train", "val", "test"):
        stats[split] = {}
        for i, task in enumerate(tasks):
            row = found.get((split, i))
            stats[split][task] = {
                "examples": int(row.ok) if row is not None else 0,
                "tokens": int(row.n_tokens) if row is not None else 0,
                "completion_tokens": int(row.completion_tokens) if row is not None else 0,
                "truncated": int(row.truncated) if row is not None else 0,
                "dropped": int(row.dropped) if row is not None else 0,
            }
    empty = [t for t in tasks if stats["train"][t]["examples"] == 0]
    if empty:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RaymixError(
            f"task(s) {empty} have no training examples that fit data.max_seq_len="
            f"{cfg.max_seq_len}; raise data.max_seq_len or remove them"
        )
    stats["tasks"] = list(tasks)
    stats["shards"] = groups
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    write_manifest(tmp)
    # Rename last: a crash before this line leaves only a .tmp directory,
    # never a cache entry without its stats.
    try:
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedPool(str(root), tasks, stats, False, time.perf_counter() - t0)


def pool_summary(pool: PreparedPool) -> dict:
    """Pool statistics for logs: N, per-task tokens, truncation and drops."""
    train = pool.stats["train"]
    return {
        "pool_tokens": pool.pool_tokens,
        "num_tasks": len(pool.tasks),
        "tokens_per_task": {t: train[t]["tokens"] for t in pool.tasks},
        "examples_per_task": {t: train[t]["examples"] for t in pool.tasks},
        "truncated": sum(pool.stats[s][t]["truncated"] for s in ("train", "val", "test") for t in pool.tasks),
        "dropped": sum(pool.stats[s][t]["dropped"] for s in ("train", "val", "test") for t in pool.tasks),
        "size_ratio": float(max(train[t]["tokens"] for t in pool.tasks) / max(1, min(train[t]["tokens"] for t in pool.tasks))),
    }
