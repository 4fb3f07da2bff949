"""Tests for the per-task example streams, collation and split reading
(raymix.streams), on tiny Parquet shards written here."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import raymix.streams as streams_module
from raymix.streams import MixtureSampler, TaskStream, collate, preload_small, read_split

SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("status", pa.string()),
        ("id", pa.string()),
        ("references", pa.list_(pa.string())),
    ]
)


def row(key: int, status: str = "ok") -> dict:
    """Row ``key``: input_ids [key, key+1000, key+2000] (the first id identifies it)."""
    return {
        "input_ids": [key, key + 1000, key + 2000],
        "prompt_len": 1,
        "status": status,
        "id": f"id-{key:04d}",
        "references": [f"ref{key}", f"alt{key}"],
    }


def write_shards(d: Path, files: list[list[dict]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(files):
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, d / f"part-{i:03d}.parquet", row_group_size=5)
    return d


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, set[int]]:
    """Three files, 40 rows, keys 0..39; every 7th row is dropped."""
    rows = [row(k, "dropped" if k % 7 == 3 else ("truncated" if k % 5 == 0 else "ok")) for k in range(40)]
    d = write_shards(tmp_path / "task", [rows[:13], rows[13:30], rows[30:]])
    keep = {k for k in range(40) if k % 7 != 3}
    return d, keep


def take(stream: TaskStream, n: int) -> list[int]:
    out = []
    for _ in range(n):
        ids, plen = stream.next()
        assert ids.dtype == np.int64
        assert plen == 1
        out.append(int(ids[0]))
    return out


def test_epoch_yields_every_kept_row_once(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=3, chunk_rows=4)
    first = take(s, len(keep))
    assert sorted(first) == sorted(keep)
    assert len(set(first)) == len(first)
    assert s.state_dict() == {"epoch": 0, "served": len(keep)}


def test_second_epoch_repeats_in_another_order(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=3, chunk_rows=4)
    e1 = take(s, len(keep))
    e2 = take(s, len(keep))
    assert s.state_dict() == {"epoch": 1, "served": len(keep)}
    assert sorted(e2) == sorted(keep)
    assert e2 != e1
    e3 = take(s, len(keep))
    assert sorted(e3) == sorted(keep)


def test_never_yields_dropped_rows(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=0, chunk_rows=3)
    seen = take(s, 5 * len(keep))
    assert all(k % 7 != 3 for k in seen)
    assert set(seen) == keep


def test_same_seed_same_order_other_seed_differs(shards) -> None:
    d, keep = shards
    a = take(TaskStream(str(d), seed=11), len(keep))
    b = take(TaskStream(str(d), seed=11), len(keep))
    c = take(TaskStream(str(d), seed=12), len(keep))
    assert a == b
    assert a != c


def test_rows_are_shuffled(shards) -> None:
    d, keep = shards
    order = take(TaskStream(str(d), seed=5, chunk_rows=100), len(keep))
    assert order != sorted(order)


@pytest.mark.parametrize("chunk_rows", [2, 3, 8192])
def test_two_ranks_split_an_epoch(shards, chunk_rows: int) -> None:
    d, keep = shards
    r0 = TaskStream(str(d), seed=9, rank=0, world=2, chunk_rows=chunk_rows)
    r1 = TaskStream(str(d), seed=9, rank=1, world=2, chunk_rows=chunk_rows)
    n0 = (len(keep) + 1) // 2
    n1 = len(keep) // 2
    a = take(r0, n0)
    b = take(r1, n1)
    assert set(a).isdisjoint(b)
    assert set(a) | set(b) == keep
    assert len(set(a)) == n0 and len(set(b)) == n1
    # both then start epoch 1
    assert r0.state_dict() == {"epoch": 0, "served": n0}
    take(r0, 1)
    assert r0.state_dict() == {"epoch": 1, "served": 1}


def test_fewer_rows_than_ranks_every_rank_reads_all(tmp_path: Path) -> None:
    d = write_shards(tmp_path / "tiny", [[row(1)]])
    for rank in (0, 1, 2):
        s = TaskStream(str(d), seed=0, rank=rank, world=3)
        assert take(s, 3) == [1, 1, 1]


def test_resume_from_state_dict(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=4, chunk_rows=4)
    take(s, len(keep) + 7)  # into epoch 1
    state = s.state_dict()
    assert state == {"epoch": 1, "served": 7}
    expected = take(s, 40)

    r = TaskStream(str(d), seed=4, chunk_rows=4)
    r.load_state_dict(state)
    assert r.state_dict() == state
    assert take(r, 40) == expected


def test_resume_at_epoch_boundary(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=4)
    take(s, len(keep))
    state = s.state_dict()
    expected = take(s, 5)
    r = TaskStream(str(d), seed=4)
    r.load_state_dict(state)
    assert take(r, 5) == expected


def test_resume_rank_one(shards) -> None:
    d, keep = shards
    s = TaskStream(str(d), seed=2, rank=1, world=2, chunk_rows=4)
    take(s, 6)
    state = s.state_dict()
    expected = take(s, 30)
    r = TaskStream(str(d), seed=2, rank=1, world=2, chunk_rows=4)
    r.load_state_dict(state)
    assert take(r, 30) == expected


def test_no_shards_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no shards"):
        TaskStream(str(tmp_path), seed=0)


# --------------------------------------------------------------------------- collate


def test_collate_pads_and_masks() -> None:
    examples = [
        (np.array([5, 6, 7, 8, 9], dtype=np.int64), 2),
        (np.array([11, 12, 13], dtype=np.int64), 1),
        (np.arange(20, 30, dtype=np.int64), 0),
    ]
    b = collate(examples, pad_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    for t in b.values():
        assert t.dtype == torch.long
        assert t.shape == (3, 16)  # longest is 10 -> padded to a multiple of 8
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids[0].tolist() == [5, 6, 7, 8, 9] + [0] * 11
    assert ids[1].tolist() == [11, 12, 13] + [0] * 13
    assert ids[2].tolist() == list(range(20, 30)) + [0] * 6
    assert mask.sum(dim=1).tolist() == [5, 3, 10]
    assert mask[0].tolist() == [1] * 5 + [0] * 11
    assert labels[0].tolist() == [-100, -100, 7, 8, 9] + [-100] * 11
    assert labels[1].tolist() == [-100, 12, 13] + [-100] * 13
    assert labels[2].tolist() == list(range(20, 30)) + [-100] * 6


@pytest.mark.parametrize("longest, expected", [(1, 8), (8, 8), (9, 16), (16, 16), (17, 24)])
def test_collate_length_multiple_of_8(longest: int, expected: int) -> None:
    b = collate(
        [(np.arange(1, longest + 1, dtype=np.int64), 0), (np.array([1], dtype=np.int64), 0)], pad_id=99
    )
    assert b["input_ids"].shape == (2, expected)
    assert b["input_ids"][1, 1:].eq(99).all()


def test_collate_custom_multiple() -> None:
    b = collate([(np.arange(1, 6, dtype=np.int64), 1)], pad_id=0, pad_to_multiple=4)
    assert b["input_ids"].shape == (1, 8)
    b = collate([(np.arange(1, 6, dtype=np.int64), 1)], pad_id=0, pad_to_multiple=1)
    assert b["input_ids"].shape == (1, 5)


def test_collate_from_stream(shards) -> None:
    d, _ = shards
    s = TaskStream(str(d), seed=0)
    ex = [s.next() for _ in range(4)]
    b = collate(ex, pad_id=-1)
    assert b["input_ids"].shape == (4, 8)
    for r, (ids, _) in enumerate(ex):
        assert b["input_ids"][r, :3].tolist() == ids.tolist()
        assert b["labels"][r, :3].tolist() == [-100, int(ids[1]), int(ids[2])]


# --------------------------------------------------------------------------- read_split


def test_read_split_sorted_without_dropped(tmp_path: Path) -> None:
    keys = [7, 2, 9, 4, 1, 8]
    rows = [row(k, "dropped" if k in (9, 1) else "ok") for k in keys]
    d = write_shards(tmp_path / "val", [rows[:3], rows[3:]])
    out = read_split(str(d), ["input_ids", "prompt_len", "references"])
    assert set(out) == {"input_ids", "prompt_len", "references"}
    assert [ids[0] for ids in out["input_ids"]] == [2, 4, 7, 8]
    assert out["prompt_len"] == [1, 1, 1, 1]
    assert out["references"] == [["ref2", "alt2"], ["ref4", "alt4"], ["ref7", "alt7"], ["ref8", "alt8"]]


def test_read_split_missing_dir_is_empty(tmp_path: Path) -> None:
    assert read_split(str(tmp_path / "nope"), ["input_ids", "references"]) == {
        "input_ids": [],
        "references": [],
    }


# -- the training sampler: global data positions ------------------------------


@pytest.fixture
def three_tasks(tmp_path: Path) -> list[str]:
    """Task t has rows keyed t*100 + 0..(40+5t): sizes 40, 45, 50, more than
    any test here draws from one task (36 examples in all at most): no wrap."""
    return [str(write_shards(tmp_path / f"t{t}", [[row(t * 100 + k) for k in range(40 + 5 * t)]]))
            for t in range(3)]


def consumed(samplers: list[MixtureSampler], steps: int, accum: int = 2, mbs: int = 3) -> list[int]:
    """Draw ``steps`` steps on every rank's sampler; the first ids of all examples taken."""
    weights = np.array([0.5, 0.3, 0.2])
    keys = []
    for _ in range(steps):
        for s in samplers:
            for idx, examples in s.draw(weights, accum, mbs):
                assert len(idx) == len(examples) == mbs
                for i, (ids, _) in zip(idx, examples):
                    assert int(ids[0]) // 100 == i  # the example belongs to the drawn task
                    keys.append(int(ids[0]))
    return keys


def global_order(dirs: list[str], seed: int, counts: dict[int, int]) -> dict[int, list[int]]:
    """The first ``counts[t]`` examples of task t in its one global order."""
    out = {}
    for t, n in counts.items():
        stream = TaskStream(dirs[t], seed=seed * 100003 + t)
        out[t] = take(stream, n)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_ranks_take_disjoint_prefixes_of_one_order(three_tasks, world: int) -> None:
    """Over all ranks, each task's examples are the first n of its global
    order, each once, whatever the worker count."""
    samplers = [MixtureSampler(three_tasks, seed=5, rank=r, world=world) for r in range(world)]
    keys = consumed(samplers, steps=2 if world > 1 else 3)
    by_task: dict[int, list[int]] = {}
    for k in keys:
        by_task.setdefault(k // 100, []).append(k)
    positions = samplers[0].positions()
    for s in samplers[1:]:
        assert s.positions() == positions  # identical on every rank
    expected = global_order(three_tasks, 5, {t: len(v) for t, v in by_task.items()})
    for t, got in by_task.items():
        assert positions[t] == {"epoch": 0, "served": len(got)}
        assert sorted(got) == sorted(expected[t]) and len(set(got)) == len(got)


def test_sampler_one_worker_matches_single_process_draws(three_tasks) -> None:
    """With one worker the sampler draws what one process drawing per
    micro-batch from generator [seed, 0, 7] would (the order runs had before)."""
    weights = np.array([0.5, 0.3, 0.2])
    rng = np.random.default_rng([5, 0, 7])
    streams = [TaskStream(d, seed=5 * 100003 + t) for t, d in enumerate(three_tasks)]
    before = [int(streams[i].next()[0][0]) for _ in range(4) for i in rng.choice(3, size=3, p=weights)]
    sampler = MixtureSampler(three_tasks, seed=5)
    after = [int(ids[0]) for _ in range(2) for _, ex in sampler.draw(weights, 2, 3) for ids, _ in ex]
    assert after == before


def test_undo_draw_draws_the_refused_examples_again(three_tasks) -> None:
    """After ``undo_draw`` the next draw is the one undone, and the
    positions are those before it (a refused step's examples are trained by
    the next step)."""
    weights = np.array([0.5, 0.3, 0.2])
    sampler = MixtureSampler(three_tasks, seed=5)
    sampler.draw(weights, 2, 3)
    before = sampler.positions()
    refused = [int(ids[0]) for _, ex in sampler.draw(weights, 2, 3) for ids, _ in ex]
    sampler.undo_draw()
    assert sampler.positions() == before
    assert [int(ids[0]) for _, ex in sampler.draw(weights, 2, 3) for ids, _ in ex] == refused


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2), (3, 2)])
def test_sampler_state_resumes_on_another_worker_count(three_tasks, first: int, then: int) -> None:
    """A state saved by ``first`` workers continues on ``then``: the union
    of all examples is still each task's global prefix, none taken twice."""
    before = [MixtureSampler(three_tasks, seed=9, rank=r, world=first) for r in range(first)]
    keys = consumed(before, steps=1)
    state = before[0].state_dict()
    after = [MixtureSampler(three_tasks, seed=9, rank=r, world=then) for r in range(then)]
    for s in after:
        s.load_state_dict(state)
    keys += consumed(after, steps=1)
    counts: dict[int, int] = {}
    for k in keys:
        counts[k // 100] = counts.get(k // 100, 0) + 1
    expected = global_order(three_tasks, 9, counts)
    for t in counts:
        got = [k for k in keys if k // 100 == t]
        assert sorted(got) == sorted(expected[t]) and len(set(got)) == len(got)
        assert after[0].positions()[t]["served"] == counts[t]


def test_small_files_are_decoded_once_and_give_the_same_draws(shards, monkeypatch) -> None:
    """Files that fit in one chunk are kept after their first pass: later
    passes open no file, and the draws are those of a stream that re-reads
    every pass (same seeds, same order)."""
    d, keep = shards
    opened: list[str] = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    kept = TaskStream(str(d), seed=3, chunk_rows=64)
    draws = take(kept, 4 * len(keep))
    assert len(opened) == 3 and kept.state_dict() == {"epoch": 3, "served": len(keep)}  # four passes
    del kept
    gc.collect()  # its chunks are no longer shared (see test_streams_share_a_file_s_first_chunk)
    reread = TaskStream(str(d), seed=3, chunk_rows=64)
    reread._kept_rows = reread.chunk_rows  # no room to keep anything: every pass reads its files
    opened.clear()
    assert take(reread, 4 * len(keep)) == draws
    assert len(opened) == 3 * 4
    # A file larger than the room left is not kept: the bound holds.
    bounded = TaskStream(str(d), seed=3, chunk_rows=15)
    take(bounded, 2 * len(keep))
    assert bounded._kept_rows <= 15


def test_streams_share_a_file_s_first_chunk(shards, monkeypatch) -> None:
    """A stream that starts a file while another holds its first chunk
    (a signal's stream beside the training sampler's) decodes nothing: it
    reads the same rows in its own order, so its draws are those of a
    stream alone; once no stream holds the chunk, it is read again."""
    d, keep = shards
    alone = take(TaskStream(str(d), seed=5, chunk_rows=64), 2 * len(keep))
    gc.collect()
    decoded: list[int] = []
    real = streams_module._decode
    monkeypatch.setattr(streams_module, "_decode", lambda batch: decoded.append(batch.num_rows) or real(batch))
    first = TaskStream(str(d), seed=3, chunk_rows=64)
    take(first, 1)
    assert len(decoded) == 1  # the first file's chunk
    second = TaskStream(str(d), seed=5, chunk_rows=64)
    assert take(second, 2 * len(keep)) == alone
    assert len(decoded) == 3  # the two files the first stream had not read; the one it holds was shared
    # Files of several chunks: the first chunk shared while held, the others read by each stream.
    a, b = TaskStream(str(d), seed=3, chunk_rows=4), TaskStream(str(d), seed=3, chunk_rows=4)
    first_draw = take(a, 1)
    decoded.clear()
    assert take(b, 1) == first_draw and decoded == []
    assert take(a, 8) == take(b, 8) and len(decoded) >= 4  # each stream reads on after the first chunk
    del first, second, a, b
    gc.collect()
    decoded.clear()
    take(TaskStream(str(d), seed=3, chunk_rows=64), 1)
    assert len(decoded) == 1


def test_sampler_reads_small_tasks_in_one_scan_with_the_same_draws(tmp_path: Path, monkeypatch) -> None:
    """The sampler decodes small tasks' files together when it starts: its
    draws open no file afterwards and equal those of streams that read their
    own files (same seeds); a task above the byte bound, or with more rows
    than a stream keeps, is streamed as before."""
    dirs = [str(write_shards(tmp_path / f"t{t}", [[row(t * 100 + k) for k in range(8 + t)],
                                                  [row(t * 100 + 50 + k, "dropped" if k == 1 else "ok")
                                                   for k in range(5)]]))
            for t in range(4)]
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    opened: list[str] = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))

    def draws(sampler: MixtureSampler) -> list[int]:
        return [int(ids[0]) for _ in range(12) for _, ex in sampler.draw(weights, 2, 3) for ids, _ in ex]

    preloaded = MixtureSampler(dirs, seed=4)
    assert all(len(s._kept) == 2 for s in preloaded.streams)  # both files of every task, before any draw
    got = draws(preloaded)
    assert opened == []  # 72 draws: several passes over every task, no file opened
    monkeypatch.setattr("raymix.streams.preload_small", lambda streams, max_bytes=0: 0)
    assert draws(MixtureSampler(dirs, seed=4)) == got
    assert len(opened) == 8  # without it: each file opened at its task's first pass
    monkeypatch.undo()

    big = [TaskStream(d, seed=1) for d in dirs]
    assert preload_small(big, max_bytes=1) == 0 and not any(s._kept for s in big)  # above the byte bound
    tight = [TaskStream(d, seed=1, chunk_rows=9) for d in dirs]
    preload_small(tight)
    assert [s._kept_rows for s in tight] == [8, 9, 5, 5]  # what fits in 9 rows: first files of 8-11 rows, or the 5-row one
