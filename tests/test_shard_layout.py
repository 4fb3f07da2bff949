"""The shard cache's layout: small tasks share files (a ``task_idx`` column
tells their rows apart), large ones have their own, and every reader (the
training streams, per-task reads, one scan of a split) finds exactly a
task's rows whichever it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_groups_keep_large_tasks_alone_and_gather_small_ones(monkeypatch) -> None:
    from raymix import data

    monkeypatch.setattr(data, "SMALL_TASK_ROWS", 10)
    monkeypatch.setattr(data, "SHARED_GROUP_ROWS", 12)
    # Hand-walked: 2 and 6 reach SMALL_TASK_ROWS; 0, 3 and 4 fill a group
    # (3 + 5 + 4 = 12); 5 and 7 are what is left; 1 has no rows.
    assert data.shard_groups([3, 0, 20, 5, 4, 9, 10, 1]) == [[2], [0, 3, 4], [6], [5, 7]]
    assert data.shard_groups([]) == [] and data.shard_groups([0, 0]) == []


@pytest.mark.ray
def test_every_reader_finds_exactly_each_tasks_rows(tmp_path_factory, monkeypatch) -> None:
    from conftest import prepare_pool

    from raymix import data
    from raymix.streams import MixtureSampler, TaskStream, read_split

    # Thresholds scaled down so that a pool small enough for a test has both
    # kinds of task (patched in this process, where the groups are made).
    monkeypatch.setattr(data, "SMALL_TASK_ROWS", 20)
    monkeypatch.setattr(data, "SHARED_GROUP_ROWS", 40)
    src = tmp_path_factory.mktemp("src") / "tasks.jsonl"
    sizes = [60, 60] + [4 + (k % 5) * 3 for k in range(28)]  # two large tasks, 28 small ones
    lines = []
    for k, n in enumerate(sizes):
        for i in range(n):
            split = "val" if i % 10 == 1 else "test" if i % 10 == 2 else "train"
            lines.append(json.dumps({"task": f"t{k:02d}", "id": f"{k}-{i}", "split": split,
                                     "prompt": f"task {k} item {i}:", "completion": f"{k * i % 97}"}))
    src.write_text("\n".join(lines) + "\n")
    # The tokenizer actors Ray Data was given: on 2 free CPUs one, running
    # two calls at once, each encoding on its own thread (see
    # raymix.tokenizing.TOKENIZER_THREADS), its blocks kept in order; and the
    # free CPUs were read before the dataset existed (read after it, they counted 1).
    import ray
    import ray.data

    events: list = []
    map_batches, from_arrow, available = ray.data.Dataset.map_batches, ray.data.from_arrow, ray.available_resources

    def counted(self, fn, *args, **kwargs):
        c = kwargs["compute"]
        events.append(("actors", c.min_size, c.max_size, c.max_concurrent_calls_per_actor,
                       c.enable_true_multi_threading, kwargs.get("num_cpus"),
                       kwargs["fn_constructor_kwargs"].get("threads")))
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", counted)
    write_parquet = ray.data.Dataset.write_parquet

    def written(self, *args, **kwargs):
        # Concurrent calls finish out of order; the files (read in name order,
        # named by write task) must hold the blocks in input order, or two
        # builds of one cache would give a seed different draws.
        events.append(("ordered", self.context.execution_options.preserve_order))
        return write_parquet(self, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", written)
    monkeypatch.setattr(ray.data, "from_arrow", lambda *a, **k: events.append("dataset") or from_arrow(*a, **k))
    monkeypatch.setattr(ray, "available_resources", lambda: events.append("free") or available())
    pool, _, _ = prepare_pool(tmp_path_factory, [f"data.sources=[{{kind: jsonl, path: {src}}}]",
                                                 "model.vocab_size=512", "runtime.num_cpus=2"])
    assert events[:3] == ["free", "dataset", ("actors", 1, 1, 2, True, 0.9, 1)], events  # later reads: Ray Data's own
    assert ("ordered", True) in events, events
    root = Path(pool.root)
    groups = pool.stats["shards"]
    assert [[0], [1]] == groups["train"][:2] and all(len(g) > 1 for g in groups["train"][2:])
    for split, gs in groups.items():
        assert sorted(p.name for p in (root / f"split={split}").iterdir()) == sorted(f"shard={k}" for k in range(len(gs)))
        assert sorted(i for g in gs for i in g) == [i for i, t in enumerate(pool.tasks)
                                                    if pool.stats[split][t]["examples"]]
    files = {split: sum(1 for _ in (root / f"split={split}").rglob("*.parquet")) for split in groups}
    assert files["train"] < len(pool.tasks) and files["val"] < len(pool.tasks)

    for split in ("train", "val", "test"):
        owner, rows = pool.read_split_rows(split, ["input_ids", "id"])
        for i, t in enumerate(pool.tasks):
            mine = np.flatnonzero(owner == i)
            alone = read_split(pool.shards(split, t), ["input_ids", "id"])
            assert alone["id"] == [rows["id"][j] for j in mine]
            assert all(x.startswith(f"{int(t[1:])}-") for x in alone["id"])  # the task's own rows
            assert len(alone["id"]) == pool.stats[split][t]["examples"]
            if split == "train":
                # One pass of the task's stream is its rows, each once.
                stream = TaskStream(pool.shards(split, t), seed=3)
                drawn = sorted(tuple(stream.next()[0].tolist()) for _ in range(len(alone["id"])))
                assert drawn == sorted(tuple(x) for x in alone["input_ids"]) and stream.epoch == 0
    # The sampler's preloaded streams draw what streams reading their own files draw.
    shards = [pool.shards("train", t) for t in pool.tasks]
    weights = np.full(len(pool.tasks), 1 / len(pool.tasks))
    a, b = MixtureSampler(shards, seed=5), MixtureSampler(shards, seed=5)
    for s in b.streams:
        s._kept.clear()
        s._kept_rows = 0
    for _ in range(20):
        da, db = a.draw(weights, 2, 4), b.draw(weights, 2, 4)
        assert all(np.array_equal(x[0], y[0]) and all(np.array_equal(p[0], q[0]) for p, q in zip(x[1], y[1]))
                   for x, y in zip(da, db))


def test_tokenizer_actors_give_each_encoder_its_threads() -> None:
    """One actor per TOKENIZER_THREADS free CPUs (at least one, at most the
    concurrency asked), each reserving 0.9 CPU, so that the writes' tenths
    fit beside them."""
    from raymix.tokenizing import TOKENIZER_THREADS, tokenizer_actors

    assert TOKENIZER_THREADS == 2
    assert tokenizer_actors(1, 4) == (1, 0.9)
    assert tokenizer_actors(2, 4) == (1, 0.9)
    assert tokenizer_actors(3, 4) == (1, 0.9)
    assert tokenizer_actors(16, 4) == (4, 0.9)
    assert tokenizer_actors(16, 100) == (8, 0.9)
    for free in (1, 2, 3, 7, 16, 64):
        actors, each = tokenizer_actors(free, 100)
        assert actors * each + 0.1 <= free


def test_tokenize_calls_at_once_give_the_rows_of_calls_in_turn(tmp_path: Path, monkeypatch) -> None:
    """``prepare_shards``'s actors run TOKENIZER_THREADS calls of Tokenize at
    once on one instance (each encoding on its own thread): the rows must be
    those of the same calls made one after another, through the Rust encoder
    alone and through transformers' tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    from raymix.models import train_tokenizer
    from raymix.tokenizing import TOKENIZER_THREADS, Tokenize, tokenize_args

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]

    def text(i: int, n: int) -> str:
        return " ".join(words[(i * k) % 6] for k in range(n))

    texts = [text(i, 1 + i % 37) for i in range(3000)]
    _, tok_dir = train_tokenizer(lambda: texts, 300, tmp_path, "concurrent-calls")
    n = 200
    refs = np.empty(n, dtype=object)  # a column of lists, as Ray Data hands over list<string>
    refs[:] = [["x"] for _ in range(n)]
    batches = [{"task_idx": np.arange(n) % 3, "shard": np.zeros(n, dtype=int), "split": np.array(["train"] * n),
                "id": np.array([f"{b}-{i}" for i in range(n)]),
                "prompt": np.array(texts[b * n:(b + 1) * n], dtype=object),
                "completion": np.array([text(i, 1 + (i * 7) % 41) for i in range(b * n, (b + 1) * n)], dtype=object),
                "references": refs}
               for b in range(15)]
    args = tokenize_args(tok_dir, "plain", 40)
    assert "encoder" in args
    # What threads=1 sets, set here so that it ends with this test, not this process.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    for kwargs in (args, {k: v for k, v in args.items() if k != "encoder"}):  # Rust encoder; transformers'
        tok = Tokenize(**kwargs, threads=1)
        in_turn = [tok(b) for b in batches]
        with ThreadPoolExecutor(TOKENIZER_THREADS) as pool:
            at_once = list(pool.map(tok, batches))
        assert all(a.equals(b) for a, b in zip(at_once, in_turn))
        assert {s for t in in_turn for s in t["status"].to_pylist()} == {"ok", "truncated", "dropped"}
