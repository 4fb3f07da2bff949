"""Per-task example streams over the tokenised shards, the sampler that
draws training examples from the mixture, and batch collation.

A :class:`TaskStream` reads its task's Parquet files (:class:`TaskShards`: a
large task's own, or a group's that small tasks share) a chunk at a time
(memory stays bounded by ``chunk_rows`` per task), shuffles within the
chunk, and starts a new seeded pass over the files when it runs out (a
repeat, capped by the mixer). Signals that read their own examples on every
rank take every ``world``-th row for their rank. The training sampler reads
small tasks' files together when it starts (:func:`preload_small`), so that
a pool of thousands of tiny tasks does not open a file per task inside the
training loop.

Training reads through a :class:`MixtureSampler`: every rank draws the whole
step's tasks for all ranks from one shared generator and walks every task's
stream in one global order, taking its own examples and skipping the other
ranks'. The data positions are therefore global (the n-th example of a task
is the same whatever the worker count) and identical on every rank: a
checkpoint written by N workers resumes on M, no example of a task is
trained twice before its stream wraps, and with one worker the draws are
those of a single process.
"""

from __future__ import annotations

import functools
import glob
import os
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

COLUMNS = ["input_ids", "prompt_len", "status"]
"""The columns a stream reads."""

SHARED_COLUMNS = COLUMNS + ["id", "task_idx"]
"""The columns kept of a file that several tasks share (:func:`shared_file`)."""

SHARED_FILES_CACHED = 32
"""Files shared by small tasks, decoded once per process and kept (least
recently used first out): every stream of one of their tasks, and every
policy's, reads its rows from the same decoded table. A shared file holds
about ``raymix.data.SHARED_GROUP_ROWS`` rows of small tasks."""


@dataclass(frozen=True)
class TaskShards:
    """Where one task's rows of a split are: Parquet ``files``, and the task
    index to keep of their rows when other tasks share them (None: every row
    is the task's)."""

    files: tuple[str, ...]
    task_idx: Optional[int] = None

    @classmethod
    def of(cls, shards: TaskShards | str) -> TaskShards:
        """``shards`` itself, or the files of a directory that holds one task's files alone."""
        if isinstance(shards, str):
            return cls(tuple(sorted(glob.glob(os.path.join(shards, "*.parquet")))), None)
        return shards


@dataclass(frozen=True)
class SharedFile:
    """A file that small tasks share, read once: its table
    (:data:`SHARED_COLUMNS`), every row decoded (flat token ids, their
    offsets, prompt lengths, kept or dropped) and each task's row indices."""

    table: object
    values: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    kept: np.ndarray
    rows: dict

    def task_rows(self, task_idx: int) -> np.ndarray:
        """A task's row indices, in file order (maybe none)."""
        return self.rows.get(task_idx, np.zeros(0, dtype=np.int64))

    def decoded(self, task_idx: int) -> tuple[int, Decoded]:
        """A task's row count (dropped rows included) and its kept rows as :func:`_decode` gives them."""
        rows = self.task_rows(task_idx)
        keep = rows[self.kept[rows]]
        return len(rows), (TokenRows(self.values, self.offsets[keep], self.offsets[keep + 1]), self.prompt_len[keep])


@functools.lru_cache(maxsize=SHARED_FILES_CACHED)
def _shared_file(path: str, mtime_ns: int, size: int) -> SharedFile:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=SHARED_COLUMNS).combine_chunks()
    col = table.column("input_ids").chunk(0) if table.num_rows else None
    owner = table.column("task_idx").to_numpy()
    order = np.argsort(owner, kind="stable")  # each task's rows in file order
    tasks, starts = np.unique(owner[order], return_index=True)
    bounds = list(starts) + [len(order)]
    return SharedFile(
        table,
        col.values.to_numpy().astype(np.int64) if col is not None else np.zeros(0, dtype=np.int64),
        col.offsets.to_numpy() if col is not None else np.zeros(1, dtype=np.int64),
        table.column("prompt_len").to_numpy(),
        _kept_mask(table.column("status")),
        {int(t): order[bounds[j] : bounds[j + 1]] for j, t in enumerate(tasks)})


def shared_file(path: str) -> SharedFile:
    """A shared file, read and decoded once per process (cached by path,
    modification time and size; :data:`SHARED_FILES_CACHED` of them)."""
    st = os.stat(path)
    return _shared_file(path, st.st_mtime_ns, st.st_size)


PRELOAD_BYTES = 1 << 20
"""A task whose train files hold at most this many bytes on disk in all is
read, when the :class:`MixtureSampler` starts, in one Arrow dataset scan
together with every other such task. Thousands of small tasks otherwise cost
a file open and a decode each at their first draw, inside the training loop
(0.84 s of draws at 1,000 tasks against 0.11 s at 20, over 458 steps of 16
examples per worker, 0.67 s of it opening and decoding 1,006 files; one scan
of the same files takes about 0.2 s). A stream keeps what fits in its
``chunk_rows`` bound, as it would after its first pass; a larger task's files
are streamed as before. 1 MiB: far above a small task's file (tens of KB),
so the scan reads small tasks only."""


class TokenRows:
    """A chunk's examples as token ids (int64), each sliced from one flat
    array when it is read. The list of 8,192 slices this replaces cost about
    1.6 ms per chunk to build, and the status column as Python strings
    another 0.9 ms: together about two thirds of a chunk's decode, paid at
    every stream's first draw of a file (a signal's streams included: ADAPT's
    first meta step on the embedded default decodes a chunk per large task)."""

    __slots__ = ("values", "starts", "ends")

    def __init__(self, values: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.values, self.starts, self.ends = values, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j) -> np.ndarray:
        return self.values[self.starts[j] : self.ends[j]]


Decoded = tuple[TokenRows, np.ndarray]
"""A decoded chunk: its kept rows' token ids and prompt lengths."""


def _kept_mask(status) -> np.ndarray:
    """Rows whose status is not "dropped" (a null status is kept), from an Arrow column."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.not_equal(status, "dropped"), True).to_numpy(zero_copy_only=False).astype(bool)


class _FirstChunk:
    """A file's first chunk, decoded, and the file's row count: shared by
    every stream of the process that starts the file while one holds it."""

    __slots__ = ("ids", "plen", "rows", "file_rows", "__weakref__")

    def __init__(self, ids: TokenRows, plen: np.ndarray, rows: int, file_rows: int):
        self.ids, self.plen, self.rows, self.file_rows = ids, plen, rows, file_rows

    def __iter__(self):  # unpacks as the (ids, prompt lengths) of a decoded chunk
        return iter((self.ids, self.plen))


_FIRST_CHUNKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
"""(path, mtime, size, chunk_rows) -> the :class:`_FirstChunk` a stream
holds now. A signal's streams read the same files as the training sampler's
(ADAPT's training examples per task), each in its own order: a stream that
starts a file whose first chunk another holds reads those rows without a
decode. On the embedded default, where ADAPT's first meta step decodes a
chunk per large task, 2 of its 11 large tasks were shared this way (the
others' training streams had started another file of the task first).
Weak references: a chunk that no stream holds is not kept, so memory stays
bounded by ``chunk_rows`` per stream, and streams that share one hold it
once."""


def _first_chunk_key(path: str, chunk_rows: int) -> tuple:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size, chunk_rows


def _decode(batch) -> Decoded:
    """A record batch's kept rows: token ids (int64) and prompt lengths."""
    keep = np.flatnonzero(_kept_mask(batch.column("status")))
    col = batch.column("input_ids")
    # The flat values and the list offsets: no per-token Python objects.
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy().astype(np.int64)
    plen = np.asarray(batch.column("prompt_len").to_numpy())[keep]
    return TokenRows(values, offsets[keep], offsets[keep + 1]), plen


def preload_small(streams: list[TaskStream], max_bytes: int = PRELOAD_BYTES) -> int:
    """Decode, before the first draw, the files of every stream that has not
    started and whose files sum to at most ``max_bytes`` bytes: each file
    that small tasks share once (:func:`shared_file`), the others in one
    dataset scan; give each stream what fits in its bound (see
    :data:`PRELOAD_BYTES`); the files read. The draws are those of streams
    that read their files themselves: a kept file is the same chunk their
    first pass would have decoded and kept."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    owner: dict[str, tuple[TaskStream, int]] = {}
    shared: set[str] = set()
    for s in streams:
        if s.epoch != 0 or s.served != 0 or s._kept:
            continue
        if s.task_idx is not None:  # a small task's rows in shared files
            for fi, f in enumerate(s.files):
                s.keep(fi, *shared_file(f).decoded(s.task_idx))
            shared.update(s.files)
        elif sum(os.path.getsize(f) for f in s.files) <= max_bytes:
            owner.update({f: (s, fi) for fi, f in enumerate(s.files)})
    read = len(shared)
    if not owner:
        return read
    parts: dict[str, list] = {}
    try:
        # scan_batches tags each batch with its file (its fragment); one
        # file's batches come in the file's row order.
        for tagged in pads.dataset(list(owner), format="parquet").scanner(columns=COLUMNS).scan_batches():
            parts.setdefault(tagged.fragment.path, []).append(tagged.record_batch)
    except (pa.ArrowException, OSError):
        # Files one scan cannot read together (schemas that differ between
        # tasks): each stream reads its own at its first draw, as it would
        # without this; a file that is unreadable fails there, naming it.
        return read
    for path, batches in parts.items():
        if path not in owner:
            continue
        table = pa.Table.from_batches(batches).combine_chunks()
        if table.num_rows == 0:
            continue
        s, fi = owner[path]
        if s.fits(table.num_rows):
            s.keep(fi, table.num_rows, _decode(table.to_batches()[0]))
    return read + len(parts)


class TaskStream:
    def __init__(self, shards: TaskShards | str, seed: int, rank: int = 0, world: int = 1, chunk_rows: int = 8192):
        """``shards``: the task's files (:meth:`raymix.data.PreparedPool.shards`),
        or a directory that holds them alone."""
        source = TaskShards.of(shards)
        self.files, self.task_idx = list(source.files), source.task_idx
        if not self.files:
            where = (shards if isinstance(shards, str) else "the files given (does the task have rows in this split? "
                     "PreparedPool.shards names none for a task without)")
            raise FileNotFoundError(f"no shards in {where}")
        self.seed, self.rank, self.world, self.chunk_rows = seed, rank, world, chunk_rows
        self.epoch = 0
        self.served = 0  # examples served in this epoch (for resume)
        # Files decoded once and kept, while they hold at most ``chunk_rows``
        # rows in all: a small task's stream wraps many times in a run, and
        # re-reading its file at every pass cost a file open and a decode per
        # pass (with thousands of small tasks, a large share of the loop).
        # The memory bound per task stays ``chunk_rows`` rows.
        self._kept: dict[int, Decoded | _FirstChunk] = {}
        self._kept_rows = 0
        self._iter = self._examples()

    def _chunks(self, epoch: int) -> Iterator[Decoded]:
        import pyarrow.parquet as pq

        rng = np.random.default_rng([self.seed, epoch])
        for fi in rng.permutation(len(self.files)):
            if fi in self._kept:
                yield self._kept[fi]
                continue
            if self.task_idx is not None:
                # A small task in a shared file: its rows, from the file
                # decoded once for every task that shares it.
                rows, decoded = shared_file(self.files[fi]).decoded(self.task_idx)
                self.keep(fi, rows, decoded)
                yield decoded
                continue
            key = _first_chunk_key(self.files[fi], self.chunk_rows)
            # Held by this frame while the stream reads the chunk (and by
            # ``_kept`` when it is the whole file), so that another stream
            # starting the file meanwhile shares it.
            head = _FIRST_CHUNKS.get(key)
            batches = None
            if head is None:
                # use_threads=False: read on this thread. With Arrow's pool,
                # each chunk of 8,192 rows at ADAPT's first meta step took
                # 10-67 ms on both workers of a 2-core run (hand-offs between
                # threads that wait for a core); on this thread 3-4 ms on one
                # worker and 3-68 ms on the other in the same run, against
                # 6 ms (read and decode) in a process alone.
                pf = pq.ParquetFile(self.files[fi])
                batches = self._batches(pf)
                batch = next(batches, None)
                if batch is None:
                    continue
                head = _FirstChunk(*_decode(batch), batch.num_rows, pf.metadata.num_rows)
                _FIRST_CHUNKS[key] = head
            yield head
            if head.rows == head.file_rows:  # the whole file came as this one chunk (kept: still shared)
                self.keep(fi, head.file_rows, head)
                continue
            if batches is None:  # the first chunk came shared: read on after it
                batches = self._batches(pq.ParquetFile(self.files[fi]))
                next(batches)
            head = None  # a large file's other chunks are not held
            for batch in batches:
                yield _decode(batch)

    def _batches(self, pf):
        """A Parquet file's rows in chunks of ``chunk_rows``, read on this thread (see :meth:`_chunks`)."""
        return pf.iter_batches(batch_size=self.chunk_rows, columns=COLUMNS, use_threads=False)

    def fits(self, rows: int) -> bool:
        """Whether ``rows`` more rows stay within the ``chunk_rows`` bound of kept files."""
        return rows <= self.chunk_rows - self._kept_rows

    def keep(self, fi: int, rows: int, decoded: Decoded) -> bool:
        """Hold file ``fi``'s decoded rows (``rows`` of them, dropped ones
        included) for later passes, if they fit in the bound; whether they did."""
        if fi in self._kept or not self.fits(rows):
            return fi in self._kept
        self._kept[fi] = decoded
        self._kept_rows += rows
        return True

    def _examples(self) -> Iterator[tuple[np.ndarray, int]]:
        while True:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            offset = 0
            produced = False
            for ids, plen in self._chunks(self.epoch):
                order = rng.permutation(len(ids))
                for j, i in enumerate(order):
                    # Ranks split each chunk's shuffled order between them,
                    # counting positions across chunks so small tasks
                    # (chunks shorter than ``world``) are split fairly too.
                    if (offset + j) % self.world == self.rank:
                        produced = True
                        self.served += 1
                        yield ids[i], int(plen[i])
                offset += len(order)
            if not produced:  # fewer rows than ranks, and none fell to this one: it reads them all
                for ids, plen in self._chunks(self.epoch):
                    for i in range(len(ids)):
                        self.served += 1
                        yield ids[i], int(plen[i])
            self.epoch += 1
            self.served = 0

    def next(self) -> tuple[np.ndarray, int]:
        return next(self._iter)

    def skip(self) -> None:
        """Pass over the next example (another rank's)."""
        next(self._iter)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        """Fast-forward to the saved position (deterministic given the seed)."""
        self.epoch, target = int(state["epoch"]), int(state["served"])
        self.served = 0
        self._iter = self._examples()
        for _ in range(target):
            next(self._iter)


class MixtureSampler:
    """Each optimizer step's examples, drawn for all ``world`` ranks at once.

    The task of every example of the step (``accum`` micro-batches of
    ``micro_batch`` examples per rank) comes from one generator that is the
    same on every rank, so every rank knows which examples the others take:
    it walks each task's stream in the global order (micro-batch, then rank,
    then slot), taking its own examples and skipping the others'. The state
    (the generator and every stream's position) is the same on every rank
    and does not depend on ``world``."""

    def __init__(self, shards: list[TaskShards | str], seed: int, rank: int = 0, world: int = 1):
        # The seeds of the single-process sampler this replaced: with one
        # worker the draws and the example order are unchanged.
        self.streams = [TaskStream(d, seed=seed * 100003 + i) for i, d in enumerate(shards)]
        preload_small(self.streams)
        self.rng = np.random.default_rng([seed, 0, 7])
        self.rank, self.world = rank, world

    def draw(self, weights: np.ndarray, accum: int, micro_batch: int
             ) -> list[tuple[np.ndarray, list[tuple[np.ndarray, int]]]]:
        """This rank's ``accum`` micro-batches: (task index per example, examples)."""
        rng_before = self.rng.bit_generator.state
        tasks = self.rng.choice(len(self.streams), size=(accum, self.world, micro_batch), p=weights)
        # What undo_draw restores: the generator, and the streams this draw moves.
        self._before_draw = (rng_before, {int(i): self.streams[i].state_dict() for i in np.unique(tasks)})
        mine = []
        for a in range(accum):
            for r in range(self.world):
                if r == self.rank:
                    mine.append((tasks[a, r], [self.streams[i].next() for i in tasks[a, r]]))
                else:
                    for i in tasks[a, r]:
                        self.streams[i].skip()
        return mine

    def undo_draw(self) -> None:
        """Back to before the last :meth:`draw` (a refused step's examples are
        drawn again by the next one); the streams it did not touch are left
        alone, so it costs nothing on the steps that are kept."""
        rng_state, streams = self._before_draw
        self.rng.bit_generator.state = rng_state
        for i, state in streams.items():
            self.streams[i].load_state_dict(state)

    def positions(self) -> list[dict]:
        """Per task: the pass over its examples (``epoch``) and how many of
        that pass have been drawn (``served``), over all ranks."""
        return [s.state_dict() for s in self.streams]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "streams": self.positions()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for stream, st in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(st)


def collate(examples: list[tuple[np.ndarray, int]], pad_id: int, pad_to_multiple: int = 8):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
    prompt and padding, so the loss is on completion tokens only)."""
    import torch

    longest = max(len(ids) for ids, _ in examples)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for row, (ids, plen) in enumerate(examples):
        t = torch.from_numpy(ids)
        input_ids[row, : len(ids)] = t
        mask[row, : len(ids)] = 1
        labels[row, plen : len(ids)] = t[plen:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def read_split(shards: TaskShards | str, columns: list[str]) -> dict[str, list]:
    """All rows of one task's split (validation and test sets are small),
    ordered by id, dropped rows left out. ``shards`` as for :class:`TaskStream`."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    source = TaskShards.of(shards)
    if not source.files:
        return {c: [] for c in columns}
    wanted = list(dict.fromkeys(columns + ["status", "id"]))
    if source.task_idx is None:
        table = pads.dataset(list(source.files), format="parquet").to_table(columns=wanted)
    elif set(columns) <= set(SHARED_COLUMNS):
        parts = [shared_file(f) for f in source.files]
        table = pa.concat_tables([p.table.take(p.task_rows(source.task_idx)).select(wanted) for p in parts])
    else:
        table = pads.dataset(list(source.files), format="parquet").to_table(
            columns=wanted, filter=pads.field("task_idx") == source.task_idx)
    table = table.sort_by("id")
    keep = [s != "dropped" for s in table.column("status").to_pylist()]
    return {c: [v for v, k in zip(table.column(c).to_pylist(), keep) if k] for c in columns}
