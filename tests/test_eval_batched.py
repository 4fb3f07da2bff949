"""The pool's own evaluation batches examples of all tasks together (sorted
by length): per-task losses and greedy answers equal those of one task at a
time, the way it was done before, whatever the batch composition."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=6",
    "model.vocab_size=512",
    "runtime.num_workers=0",
    "eval.suite=null",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(prepared):
    import torch
    from transformers import AutoModelForCausalLM

    from raymix.models import load_tokenizer

    _, tok_dir, init_dir = prepared
    torch.manual_seed(0)
    # float64 parameters: the paths differ only by the float32 loss arithmetic (see the tolerance).
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float64)
    with torch.no_grad():  # away from the initialisation, so that losses differ between tasks
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, load_tokenizer(tok_dir)


def _per_task_losses(model, pool, split: str, pad_id: int, batch_size: int) -> dict[str, float]:
    """The reference: each task's examples alone, in their own batches."""
    from raymix.loss import token_nll
    from raymix.streams import collate, read_split

    out = {}
    for task in pool.tasks:
        rows = read_split(pool.shards(split, task), ["input_ids", "prompt_len"])
        ex = [(np.asarray(i, dtype=np.int64), int(p)) for i, p in zip(rows["input_ids"], rows["prompt_len"])]
        total = count = 0.0
        for s in range(0, len(ex), batch_size):
            nll, cnt = token_nll(model, collate(ex[s : s + batch_size], pad_id), "cpu")
            total, count = total + float(nll.detach().sum()), count + float(cnt.sum())
        out[task] = total / count if count else float("nan")
    return out


@pytest.mark.parametrize("split", ["val", "test"])
def test_batched_losses_equal_per_task(prepared, model_and_tokenizer, split: str) -> None:
    from raymix.loop.evaluation import split_losses

    pool = prepared[0]
    model, tok = model_and_tokenizer
    batched = split_losses(model, pool, split, tok.pad_token_id, 4)
    reference = _per_task_losses(model, pool, split, tok.pad_token_id, 4)
    assert list(batched) == list(reference) == list(pool.tasks)
    values = np.array(list(reference.values()))
    assert np.isfinite(values).all() and values.std() > 0.01  # distinct per task: a swapped task would show
    # token_nll's per-token NLLs are float32 (it casts the logits), and each row's sum is float32: a
    # row's NLL carries up to n * u relative rounding (u = 6e-8, n its completion tokens, here < 40),
    # which another batch composition (padding, kernel blocking) rounds differently. Measured: 6e-8.
    np.testing.assert_allclose(list(batched.values()), values, rtol=40 * 6e-8)


def test_batched_greedy_answers_equal_one_task_at_a_time(prepared, model_and_tokenizer) -> None:
    from raymix.loop.evaluation import exact_match, greedy_answers, split_examples

    pool = prepared[0]
    model, tok = model_and_tokenizer
    owner, examples, _ = split_examples(pool, "test", 3)
    prompts = [ids[:p] for ids, p in examples]
    together = greedy_answers(model, tok, prompts, 4, 8)
    alone = []
    for i in range(len(pool.tasks)):
        alone += greedy_answers(model, tok, [p for p, o in zip(prompts, owner) if o == i], 4, 8)
    assert together == alone and len(set(together)) > 1
    # Grouped by an expected answer length first (exact_match's order): the same answers.
    expected = np.random.default_rng(0).integers(1, 9, size=len(prompts)).astype(float)
    assert greedy_answers(model, tok, prompts, 4, 8, expected=expected) == alone
    em = exact_match(model, tok, pool, 3, 4, 8)
    assert list(em) == list(pool.tasks) and all(0.0 <= v <= 1.0 for v in em.values())


def test_one_scan_of_a_split_equals_per_task_reads(tmp_path, monkeypatch) -> None:
    """``PreparedPool.read_split_rows`` (one scan of a split) gives each task's
    rows as ``read_split`` does (ordered by id, dropped rows left out), grouped
    by task in pool order, and ``split_examples`` its first ``limit`` of each.
    Shards written here in the cache's layout, without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymix.data import PreparedPool
    from raymix.loop.evaluation import split_examples
    from raymix.streams import read_split

    rng = np.random.default_rng(0)
    tasks = tuple(f"t{i}" for i in range(12))
    # The cache's layout: tasks 0-5 share the files of group 0, the others
    # have a group each.
    groups = [list(range(6))] + [[i] for i in range(6, 12)]
    schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("prompt_len", pa.int64()), ("status", pa.string()),
                        ("id", pa.string()), ("task_idx", pa.int32())])
    for k, group in enumerate(groups):
        d = tmp_path / "split=val" / f"shard={k}"
        d.mkdir(parents=True)
        for part in range(2):  # two files per group, ids interleaved between them
            rows: dict[str, list] = {c: [] for c in schema.names}
            for i in group:
                n = int(rng.integers(0, 4))
                ids = [f"{i}-{int(x):03d}" for x in rng.permutation(100)[:n]]
                rows["input_ids"] += [list(rng.integers(1, 50, size=int(rng.integers(3, 9)))) for _ in ids]
                rows["prompt_len"] += [2] * n
                rows["status"] += [str(s) for s in rng.choice(["ok", "dropped"], size=n)]
                rows["id"] += ids
                rows["task_idx"] += [i] * n
            order = rng.permutation(len(rows["id"]))  # tasks' rows mixed within a shared file
            pq.write_table(pa.table({c: [v[j] for j in order] for c, v in rows.items()}, schema=schema),
                           d / f"part{part}.parquet")
    pool = PreparedPool(str(tmp_path), tasks, {"shards": {"val": groups}}, True, 0.0)
    assert pool.shards("val", "t0").task_idx == 0 and pool.shards("val", "t7").task_idx is None
    owner, rows = pool.read_split_rows("val", ["input_ids", "prompt_len"])
    for i, t in enumerate(tasks):
        alone = read_split(pool.shards("val", t), ["input_ids", "prompt_len"])
        mine = np.flatnonzero(owner == i)
        assert [rows["input_ids"][j] for j in mine] == alone["input_ids"]
    assert list(owner) == sorted(owner) and len(set(owner.tolist())) > 1
    o, ex, _ = split_examples(pool, "val", 1)
    assert o == sorted(set(owner.tolist()))  # the first example of every task that has one
    assert [list(e[0]) for e in ex] == [rows["input_ids"][int(np.flatnonzero(owner == i)[0])] for i in o]
    assert pool.read_split_rows("test", ["input_ids"])[0].size == 0  # no such split

    # Within splits_read_once a split is scanned once (with the columns it
    # names) and served from memory after; outside it nothing is held.
    import pyarrow.dataset as pads

    scans: list = []
    real = pads.dataset
    monkeypatch.setattr(pads, "dataset", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    with pool.splits_read_once(["input_ids", "prompt_len", "id"]):
        again = pool.read_split_rows("val", ["input_ids", "prompt_len"])
        by_id = pool.read_split_rows("val", ["id"])
    assert len(scans) == 1 and list(again[0]) == list(owner) and again[1]["input_ids"] == rows["input_ids"]
    assert len(by_id[1]["id"]) == len(owner) and "_split_tables" not in pool.__dict__
    pool.read_split_rows("val", ["input_ids"])
    assert len(scans) == 2


def test_curve_points_read_the_bounded_count_of_every_task(prepared) -> None:
    """Above ``eval.curve_max_examples`` a curve point reads fewer examples of
    each task, at least one of every task (the worst case needs them all),
    spread over the ranks."""
    from raymix.config import EvalConfig
    from raymix.loop.evaluation import CurveEvaluator, split_examples

    pool = prepared[0]
    T = len(pool.tasks)
    available = np.bincount(split_examples(pool, "val")[0], minlength=T)
    assert available.min() >= 2
    for bound, each in ((10**6, 8), (2 * T, 2), (1, 1)):
        per_task = EvalConfig(curve_max_examples=bound).curve_per_task(T)
        assert per_task == each
        ranks = [CurveEvaluator(pool, per_task, r, 2, 0, 16, "cpu") for r in range(2)]
        counts = np.bincount(ranks[0].owner + ranks[1].owner, minlength=T)
        np.testing.assert_array_equal(counts, np.minimum(available, each))
        assert ranks[0].owner and ranks[1].owner  # both ranks read a share
