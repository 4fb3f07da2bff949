"""Tests for building the task pool from JSONL sources (raymix.data.load_pool)
and for the token-based learning-rate schedule (raymix.loop.step)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raymix.config import DataConfig, SourceConfig
from raymix.data import load_pool, records_fingerprint
from raymix.errors import RaymixError
from raymix.loop.step import TokenCosineSchedule
from raymix.tasks.records import TaskRecord


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(task: str, n: int, **extra) -> list[dict]:
    return [
        {"task": task, "id": f"{task}-{i}", "prompt": f"q{i} of {task}?", "completion": f"a{i}", **extra}
        for i in range(n)
    ]


def jsonl_cfg(*paths: Path, task_sizes: dict | None = None, seed: int = 0, **kw) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(kind="jsonl", path=str(p), task_sizes=task_sizes, seed=seed) for p in paths],
        **kw,
    )


def splits_of(records: list[TaskRecord]) -> dict[tuple[str, str], str]:
    return {(r.task, r.id): r.split for r in records}


# --------------------------------------------------------------------------- splits


def test_splits_are_deterministic_and_independent_of_line_order(tmp_path: Path) -> None:
    rows = qa_rows("qa", 40)
    f1 = write_jsonl(tmp_path / "one" / "data.jsonl", rows)
    f2 = write_jsonl(tmp_path / "two" / "data.jsonl", list(reversed(rows)))
    rng = np.random.default_rng(0)
    f3 = write_jsonl(tmp_path / "three" / "data.jsonl", [rows[i] for i in rng.permutation(40)])

    a = load_pool(jsonl_cfg(f1))
    b = load_pool(jsonl_cfg(f1))
    c = load_pool(jsonl_cfg(f2))
    d = load_pool(jsonl_cfg(f3))  # the seed does not move the split
    assert len(a) == 40
    assert splits_of(a) == splits_of(b) == splits_of(c) == splits_of(d)
    counts = Counter(r.split for r in a)
    assert counts == {"train": 32, "val": 4, "test": 4}
    # the content travels with the id
    by_id = {r.id: r for r in c}
    for r in a:
        assert by_id[r.id].prompt == r.prompt and by_id[r.id].completion == r.completion


def test_split_fractions_and_caps(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("qa", 100))
    recs = load_pool(jsonl_cfg(f, val_fraction=0.2, test_fraction=0.3, max_val=64, max_test=10))
    assert Counter(r.split for r in recs) == {"train": 70, "val": 20, "test": 10}


def test_split_per_task(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("big", 50) + qa_rows("small", 10))
    recs = load_pool(jsonl_cfg(f))
    per = Counter((r.task, r.split) for r in recs)
    assert per == {
        ("big", "train"): 40,
        ("big", "val"): 5,
        ("big", "test"): 5,
        ("small", "train"): 8,
        ("small", "val"): 1,
        ("small", "test"): 1,
    }


def test_source_splits_are_kept(tmp_path: Path) -> None:
    rows = qa_rows("qa", 10)
    for i, r in enumerate(rows):
        r["split"] = "val" if i in (0, 1, 2) else "test" if i == 9 else "train"
    f = write_jsonl(tmp_path / "data.jsonl", rows)
    recs = load_pool(jsonl_cfg(f))
    assert {r.id: r.split for r in recs} == {r["id"]: r["split"] for r in rows}


def test_a_question_lies_in_one_split(tmp_path: Path) -> None:
    """Copies of one prompt (under other ids, other spacing) share a split:
    no test or validation question is one the model trains on. A test or
    val question keeps one record that accepts every answer of its copies;
    train keeps every copy. Splitting by instance id alone put copies of
    most test questions of a repeating task into train."""
    rows = [{"task": "rep", "id": f"rep-{i}", "prompt": f"q{i % 30} ?" if i % 2 else f"q{i % 30}  ?",
             "completion": f"a{i % 30}" if i < 240 else f"alt{i % 30}"} for i in range(300)]
    f = write_jsonl(tmp_path / "data.jsonl", rows)
    recs = load_pool(jsonl_cfg(f))
    key = lambda r: " ".join(r.prompt.split())  # noqa: E731
    by_split = {s: [r for r in recs if r.split == s] for s in ("train", "val", "test")}
    # 30 distinct questions: 3 to test, 3 to val (a tenth each), 24 to train with all their copies
    assert [len({key(r) for r in by_split[s]}) for s in ("train", "val", "test")] == [24, 3, 3]
    assert len(by_split["test"]) == len(by_split["val"]) == 3 and len(by_split["train"]) == 240
    held = {key(r) for r in by_split["val"] + by_split["test"]}
    assert not held & {key(r) for r in by_split["train"]}
    for r in by_split["val"] + by_split["test"]:
        q = int(key(r)[1:].split()[0])
        assert set(r.references) == {f"a{q}", f"alt{q}"}, r
    # deterministic, whatever the file order
    g = write_jsonl(tmp_path / "rev" / "data.jsonl", list(reversed(rows)))
    assert {(r.id, r.split) for r in load_pool(jsonl_cfg(g))} == {(r.id, r.split) for r in recs}


def test_the_embedded_default_tests_no_question_it_trains_on() -> None:
    """The synthetic suite's small input spaces (times tables, lookups of 40
    countries) repeat prompts: none of a test or val prompt is in train."""
    recs = load_pool(DataConfig(sources=[SourceConfig(kind="synthetic", scale=0.5)]))
    by_task: dict = {}
    for r in recs:
        by_task.setdefault(r.task, {}).setdefault(r.split, set()).add(" ".join(r.prompt.split()))
    for task, splits in by_task.items():
        assert splits.get("test") and splits.get("val"), task
        assert not (splits["test"] | splits["val"]) & splits["train"], task


def test_task_from_source_config_and_file_stem(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "id": i} for i in range(5)]
    f = write_jsonl(tmp_path / "stemname.jsonl", rows)
    recs = load_pool(jsonl_cfg(f))
    assert {r.task for r in recs} == {"stemname"}
    cfg = DataConfig(sources=[SourceConfig(kind="jsonl", path=str(f), task="named")])
    assert {r.task for r in load_pool(cfg)} == {"named"}


# --------------------------------------------------------------------------- errors


def test_duplicate_task_name_across_sources(tmp_path: Path) -> None:
    f1 = write_jsonl(tmp_path / "a.jsonl", qa_rows("shared", 5))
    f2 = write_jsonl(tmp_path / "b.jsonl", qa_rows("shared", 5))
    with pytest.raises(RaymixError) as ei:
        load_pool(jsonl_cfg(f1, f2))
    msg = str(ei.value)
    assert "duplicate task name" in msg
    assert "'shared'" in msg
    assert "data.sources[0]" in msg and "data.sources[1]" in msg


def test_distinct_task_names_across_sources(tmp_path: Path) -> None:
    f1 = write_jsonl(tmp_path / "a.jsonl", qa_rows("one", 5))
    f2 = write_jsonl(tmp_path / "b.jsonl", qa_rows("two", 7))
    recs = load_pool(jsonl_cfg(f1, f2))
    assert Counter(r.task for r in recs) == {"one": 5, "two": 7}


def test_missing_jsonl_file(tmp_path: Path) -> None:
    with pytest.raises(RaymixError, match="no such file"):
        load_pool(jsonl_cfg(tmp_path / "absent.jsonl"))


# --------------------------------------------------------------------------- task_sizes


def test_task_sizes_subsample(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("big", 50) + qa_rows("other", 20))
    cfg = jsonl_cfg(f, task_sizes={"big": 12})
    recs = load_pool(cfg)
    per = Counter(r.task for r in recs)
    assert per == {"big": 12, "other": 20}
    big_ids = {r.id for r in recs if r.task == "big"}
    assert big_ids <= {f"big-{i}" for i in range(50)}
    assert len(big_ids) == 12
    # deterministic for the source's seed, different for another
    again = {r.id for r in load_pool(cfg) if r.task == "big"}
    assert again == big_ids
    other_seed = {r.id for r in load_pool(jsonl_cfg(f, task_sizes={"big": 12}, seed=1)) if r.task == "big"}
    assert other_seed != big_ids
    # independent of file order
    g = write_jsonl(
        tmp_path / "rev" / "data.jsonl", list(reversed(qa_rows("big", 50) + qa_rows("other", 20)))
    )
    rev = {r.id for r in load_pool(jsonl_cfg(g, task_sizes={"big": 12})) if r.task == "big"}
    assert rev == big_ids


def test_task_sizes_larger_than_task_keeps_all(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("t", 6))
    recs = load_pool(jsonl_cfg(f, task_sizes={"t": 100}))
    assert sorted(r.id for r in recs) == sorted(f"t-{i}" for i in range(6))


def test_task_sizes_unknown_task(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("t", 6))
    with pytest.raises(RaymixError) as ei:
        load_pool(jsonl_cfg(f, task_sizes={"t": 3, "nosuch": 2}))
    assert "task_sizes" in str(ei.value)
    assert "nosuch" in str(ei.value)


# --------------------------------------------------------------------------- fingerprint


def test_records_fingerprint(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.jsonl", qa_rows("t", 10))
    a = load_pool(jsonl_cfg(f))
    b = load_pool(jsonl_cfg(f))
    assert records_fingerprint(a) == records_fingerprint(b)
    changed = list(a)
    r = changed[0]
    changed[0] = TaskRecord(r.task, r.id, r.prompt, r.completion + "!", r.split)
    assert records_fingerprint(changed) != records_fingerprint(a)
    assert len(records_fingerprint(a)) == 64


# --------------------------------------------------------------------------- LR schedule


def test_cosine_schedule_key_points() -> None:
    s = TokenCosineSchedule(peak=1e-3, warmup=0.1, min_ratio=0.1)
    # The schedule is closed-form float64 (a cosine and a few products):
    # ~1e-16 relative, so pytest.approx's default rel 1e-6 here and below.
    assert s(0.0) == pytest.approx(1e-5)  # 1% of peak, never 0
    assert 0 < s(0.0) < 0.05 * 1e-3
    assert s(0.05) == pytest.approx(0.5e-3)  # halfway through warm-up
    assert s(0.1) == pytest.approx(1e-3)  # warm-up end: peak
    assert s(0.55) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert s(1.0) == pytest.approx(1e-4)  # min_ratio * peak
    # clamped outside [0, 1]
    assert s(-1.0) == pytest.approx(s(0.0))
    assert s(2.0) == pytest.approx(1e-4)


def test_cosine_schedule_monotone() -> None:
    s = TokenCosineSchedule(peak=3e-3, warmup=0.05, min_ratio=0.1)
    warm = [s(p) for p in np.linspace(0.0, 0.05, 50, endpoint=False)]
    assert all(b >= a for a, b in zip(warm, warm[1:]))
    decay = [s(p) for p in np.linspace(0.05, 1.0, 500)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert max(decay) == pytest.approx(3e-3)
    assert min(decay) == pytest.approx(3e-4)
    assert all(3e-5 - 1e-15 <= v <= 3e-3 + 1e-15 for v in warm)
    assert all(3e-4 - 1e-15 <= v <= 3e-3 + 1e-15 for v in decay)


def test_cosine_schedule_without_warmup() -> None:
    s = TokenCosineSchedule(peak=2.0, warmup=0.0, min_ratio=0.0)
    assert s(0.0) == pytest.approx(2.0)
    assert s(0.5) == pytest.approx(1.0)
    assert s(1.0) == pytest.approx(0.0, abs=1e-12)
    assert s(0.25) == pytest.approx(1.0 + math.cos(math.pi * 0.25))


# --------------------------------------------------------------------------- cache keys


def test_the_pool_fingerprint_covers_the_code_that_reads_and_splits_records(monkeypatch) -> None:
    """Every module of raymix.tasks (the loaders, the split rule) is part of
    the pool's fingerprint, for file sources too: a changed split may not
    reuse shards cut by the old one."""
    import raymix.data
    from raymix.data import pool_fingerprint

    hashed: list[str] = []
    real = raymix.data._hash_files
    monkeypatch.setattr(raymix.data, "_hash_files", lambda h, paths: (hashed.extend(p.name for p in paths),
                                                                      real(h, paths)))
    pool_fingerprint(DataConfig(sources=[SourceConfig(kind="synthetic")]))
    assert {"records.py", "natural_instructions.py", "synthetic.py", "jsonl.py"} <= set(hashed)


def test_another_tokenizer_at_the_same_path_is_another_shard_cache(monkeypatch, tmp_path: Path) -> None:
    """The shards' tokenizer key is the saved tokenizer's content, not its
    name and size: a tokenizer retrained in place (same vocabulary size,
    other ids) or given a chat template tokenises differently."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import raymix.data
    from raymix.config import load_config
    from raymix.driver.setup import prepare_model_and_data

    def save(words: list[str], chat_template=None) -> None:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       bos_token="<s>", eos_token="</s>")
        if chat_template:
            fast.chat_template = chat_template
        fast.save_pretrained(str(tmp_path / "tok"))

    keys = []

    def stop(records, pool_fp, tok_name, tok_fp, data, concurrency=1):
        keys.append(tok_fp)
        raise KeyboardInterrupt  # before any tokenising

    monkeypatch.setattr(raymix.data, "prepare_shards", stop)
    cfg = load_config(None, [f"model.tokenizer={tmp_path / 'tok'}", "data.sources=[{kind: synthetic, scale: 0.01}]"])
    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(100)]
    for variant in (dict(words=words), dict(words=words), dict(words=words[:4] + words[4:][::-1]),
                    dict(words=words, chat_template="{{ messages[0]['content'] }} A:")):
        save(**variant)
        with pytest.raises(KeyboardInterrupt):
            prepare_model_and_data(cfg, tmp_path / "out")
    assert keys[0] == keys[1] and len(set(keys)) == 3, keys
