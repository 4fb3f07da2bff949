"""Tests for the built-in synthetic instruction suite (raymix.tasks.synthetic)."""

from __future__ import annotations

import re

import pytest

from raymix.errors import RaymixError
from raymix.tasks import synthetic as syn
from raymix.tasks.records import TaskRecord, group_by_task


@pytest.fixture(scope="module")
def suite() -> list[TaskRecord]:
    return syn.generate_suite()


@pytest.fixture(scope="module")
def ood() -> list[TaskRecord]:
    return syn.generate_ood()


def _quoted(prompt: str) -> list[str]:
    return re.findall(r'"([^"]*)"', prompt)


def _ints(prompt: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", prompt)]


def _country(prompt: str) -> str:
    found = [c for c in syn.COUNTRY_CAPITALS if re.search(rf"\b{c}\b", prompt)]
    assert len(found) == 1, prompt
    return found[0]


def test_task_tables() -> None:
    assert len(syn.TRAIN_TASKS) >= 20
    assert len(syn.OOD_TASKS) >= 5
    assert not set(syn.TRAIN_TASKS) & set(syn.OOD_TASKS)
    for name, t in syn.TRAIN_TASKS.items():
        assert t.name == name and not t.ood and t.related_to == ()
    for name, t in syn.OOD_TASKS.items():
        assert t.name == name and t.ood and t.related_to
        assert set(t.related_to) <= set(syn.TRAIN_TASKS)
    sizes = [t.size for t in syn.TRAIN_TASKS.values()]
    assert max(sizes) / min(sizes) >= 30
    rows = syn.describe_suite()
    assert len(rows) == len(syn.TRAIN_TASKS) + len(syn.OOD_TASKS)
    assert set(rows[0]) == {"name", "skill", "size", "difficulty", "ood", "related_to"}


def test_small_tasks_are_the_hard_ones() -> None:
    by_diff: dict[str, list[int]] = {}
    for t in syn.TRAIN_TASKS.values():
        by_diff.setdefault(str(t.difficulty), []).append(t.size)
    assert max(by_diff["hard"]) < min(by_diff["easy"])


def test_default_suite_shape(suite: list[TaskRecord]) -> None:
    groups = group_by_task(suite)
    assert set(groups) == set(syn.TRAIN_TASKS)
    for name, recs in groups.items():
        assert len(recs) == syn.TRAIN_TASKS[name].size
        assert [r.id for r in recs] == [f"{name}-{i:06d}" for i in range(len(recs))]
        assert all(r.split == "train" and r.completion for r in recs)
    assert 60_000 <= len(suite) <= 80_000


def test_prompts_are_short_and_mostly_unique(suite: list[TaskRecord]) -> None:
    for name, recs in group_by_task(suite).items():
        for r in recs:
            assert 3 <= len(r.prompt.split()) <= 40, r.prompt
            assert len(r.completion.split()) <= 10, r.completion
        # Large input spaces must not repeat; lookups are allowed to.
        if syn.TRAIN_TASKS[name].skill != "lookup":
            assert len({r.prompt for r in recs}) >= 0.9 * len(recs), name


def test_several_phrasings_per_task(suite: list[TaskRecord]) -> None:
    for name, recs in group_by_task(suite).items():
        # Masking the inputs leaves the template; every task has >= 2.
        shapes = {re.sub(r'"[^"]*"|\d+|[A-Z][a-z]+(?=[ ?.])', "X", r.prompt) for r in recs}
        assert len(shapes) >= 2, name


def test_deterministic() -> None:
    a = syn.generate_suite(scale=0.05, seed=3)
    b = syn.generate_suite(scale=0.05, seed=3)
    c = syn.generate_suite(scale=0.05, seed=4)
    assert a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert syn.generate_ood(20, seed=1) == syn.generate_ood(20, seed=1)
    assert syn.generate_ood(20, seed=1) != syn.generate_ood(20, seed=2)


def test_task_streams_are_independent() -> None:
    # A task's records do not depend on which other tasks are generated.
    alone = syn.generate_suite(scale=0.02, tasks=["add"])
    full = [r for r in syn.generate_suite(scale=0.02) if r.task == "add"]
    assert alone == full


def test_scale_and_min_size() -> None:
    recs = group_by_task(syn.generate_suite(scale=0.1, min_size=50))
    for name, t in syn.TRAIN_TASKS.items():
        assert len(recs[name]) == max(50, round(t.size * 0.1))
    sub = syn.generate_suite(scale=0.01, tasks=["uppercase", "capital_lookup"], min_size=5)
    assert [len(v) for v in group_by_task(sub).values()] == [120, 5]


def test_bad_arguments() -> None:
    with pytest.raises(RaymixError, match="no_such_task") as err:
        syn.generate_suite(tasks=["add", "no_such_task"])
    assert "uppercase" in str(err.value)  # lists the valid names
    with pytest.raises(RaymixError, match="list_sum"):
        syn.generate_suite(tasks=["list_sum"])  # OOD tasks never join training
    with pytest.raises(RaymixError, match="add"):
        syn.generate_ood(tasks=["add"])
    for kwargs in ({"scale": 0}, {"scale": -1.0}, {"scale": float("nan")},
                   {"min_size": 0}, {"seed": -1}, {"tasks": "add"}):
        with pytest.raises(RaymixError):
            syn.generate_suite(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(RaymixError):
        syn.generate_ood(n_per_task=0)


def _train_answer(task: str, prompt: str) -> str:
    q, n = _quoted(prompt), _ints(prompt)
    if task == "uppercase":
        return q[0].upper()
    if task == "reverse_word":
        return q[0][::-1]
    if task == "first_letter":
        return q[0][0]
    if task == "last_letter":
        return q[0][-1]
    if task == "copy_text":
        return q[0]
    if task == "count_letters":
        return str(len(q[0]))
    if task == "count_char":
        letter, word = (q[0], q[1]) if len(q[0]) == 1 else (q[1], q[0])
        return str(word.count(letter))
    if task == "repeat_word":
        return " ".join([q[0]] * n[0])
    if task == "sort_numbers":
        return ", ".join(map(str, sorted(n)))
    if task in ("list_max", "compare_numbers"):
        return str(max(n))
    if task == "list_min":
        return str(min(n))
    if task == "list_length":
        return str(len(n))
    if task in ("add", "add_three"):
        return str(sum(n))
    if task == "subtract":
        a, b = n if "minus" in prompt or "take away" in prompt else n[::-1]
        return str(a - b)
    if task == "multiply_small":
        return str(n[0] * n[1])
    if task == "successor":
        return str(n[0] + 1)
    if task == "parity":
        return "even" if n[0] % 2 == 0 else "odd"
    if task == "yes_no_compare":
        a, b = n
        greater = "greater" in prompt or "larger" in prompt
        return "yes" if (a > b) == greater else "no"
    if task == "bool_expr":
        expr = q[0].replace("true", "True").replace("false", "False")
        assert re.fullmatch(r"[()A-Za-z ]+", expr)
        return "true" if eval(expr) else "false"  # safe: charset checked above
    if task == "capital_lookup":
        return syn.COUNTRY_CAPITALS[_country(prompt)]
    if task == "antonym_lookup":
        return syn.ANTONYMS[q[0]]
    raise AssertionError(f"no checker for {task}")


def test_training_answers_are_correct() -> None:
    recs = syn.generate_suite(scale=0.05, seed=7)
    checked = set()
    for r in recs:
        assert r.completion == _train_answer(r.task, r.prompt), r
        checked.add(r.task)
    assert checked == set(syn.TRAIN_TASKS)


def _ood_answer(task: str, prompt: str) -> str:
    q, n = _quoted(prompt), _ints(prompt)
    if task == "reverse_uppercase":
        return q[0][::-1].upper()
    if task == "list_sum":
        return str(sum(n))
    if task == "max_parity":
        return "even" if max(n) % 2 == 0 else "odd"
    if task == "capital_first_letter":
        return syn.COUNTRY_CAPITALS[_country(prompt)][0]
    if task == "longer_word":
        return max(q, key=len)
    if task == "antonym_uppercase":
        return syn.ANTONYMS[q[0]].upper()
    if task == "sum_compare":
        return "yes" if n[0] + n[1] > n[2] else "no"
    raise AssertionError(f"no checker for {task}")


def test_ood_answers_and_choices(ood: list[TaskRecord]) -> None:
    groups = group_by_task(ood)
    assert set(groups) == set(syn.OOD_TASKS)
    mc_tasks = set()
    for name, recs in groups.items():
        assert len(recs) == 200
        for r in recs:
            assert r.split == "test"
            assert r.completion == _ood_answer(name, r.prompt), r
            assert r.completion in r.references
            if r.choices:
                mc_tasks.add(name)
                assert r.completion in r.choices
                assert 2 <= len(r.choices) <= 4 and len(set(r.choices)) == len(r.choices)
    assert len(mc_tasks) >= 2
    # Letter answers are accepted in either case.
    assert all(r.references == (r.completion, r.completion.lower())
               for r in groups["capital_first_letter"])


def test_ood_never_in_training_pool(suite: list[TaskRecord], ood: list[TaskRecord]) -> None:
    train_prompts = {r.prompt for r in suite}
    assert not any(r.prompt in train_prompts for r in ood)
    assert not {r.task for r in ood} & {r.task for r in suite}


def test_lookup_tables_are_consistent() -> None:
    # OOD lookups only make sense if they reuse the memorised training tables.
    assert len(syn.COUNTRY_CAPITALS) >= 20
    assert all(syn.ANTONYMS[syn.ANTONYMS[w]] == w for w in syn.ANTONYMS)
    names = list(syn.COUNTRY_CAPITALS) + list(syn.COUNTRY_CAPITALS.values())
    assert len(set(names)) == len(names)
