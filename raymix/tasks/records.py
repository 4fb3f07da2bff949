"""The one record every task source produces, and the deterministic split.

Every loader (Natural Instructions, JSONL, Hugging Face datasets, the built-in
synthetic suite) yields :class:`TaskRecord` objects; everything downstream
(tokenisation, shards, evaluation) only sees these.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from raymix.errors import RaymixError

SPLITS = ("train", "val", "test")


def read_utf8(path: Path) -> str:
    """A task file's text; non-UTF-8 bytes are an error naming the file, the
    line and the byte offset. A leading byte-order mark (some editors write
    one) is dropped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RaymixError(f"{path}: cannot read file: {e.strerror or e}") from e
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise RaymixError(
            f"{path}:{line}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"(line {line}); re-encode the file as UTF-8"
        ) from e


@dataclass(frozen=True)
class TaskRecord:
    """One supervised example.

    Attributes:
        task: task name; unique within a pool.
        id: instance id, stable across runs (the split is derived from it).
        prompt: the instruction and input shown to the model.
        completion: the reference answer (the only tokens the loss is taken on).
        split: one of ``train``, ``val``, ``test``.
        references: all accepted answers (for exact match); defaults to
            ``(completion,)``.
        choices: answer options for multiple-choice evaluation, if any.
    """

    task: str
    id: str
    prompt: str
    completion: str
    split: str = "train"
    references: tuple[str, ...] = field(default=())
    choices: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.references:
            object.__setattr__(self, "references", (self.completion,))

    def to_row(self) -> dict:
        return {
            "task": self.task,
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "split": self.split,
            "references": list(self.references),
            "choices": list(self.choices),
        }


def _rank(task: str, instance_id: str) -> str:
    return hashlib.sha1(f"{task}\x00{instance_id}".encode()).hexdigest()


def prompt_key(prompt: str) -> str:
    """What makes two prompts the same question: their words, whatever the
    spacing between them."""
    return " ".join(prompt.split())


def assign_splits(
    records: Sequence[TaskRecord],
    val_fraction: float,
    test_fraction: float,
    max_val: int,
    max_test: int,
) -> list[TaskRecord]:
    """Give one task's records a deterministic train/val/test split.

    Records that ask the same prompt (:func:`prompt_key`) are one group, and
    a group lies in one split: a test or validation question is never one
    the model trained on. Small input spaces repeat (a times table, a lookup
    of 40 countries, duplicated instances of a Natural Instructions task),
    and splitting by instance id alone put copies of most of such a task's
    test questions in its training split.

    Groups are ordered by a hash of their first member's id (so the split
    does not depend on file order, and a task without repeats splits as
    by its ids alone); of G groups the first ``min(max_test,
    round(test_fraction*G))`` go to test, the next ``min(max_val,
    round(val_fraction*G))`` to val, the rest to train. A test or val group
    keeps one record (its first, accepting every answer of its copies; the
    copies are dropped: they may be neither trained on nor scored twice), a
    train group all of them. At least one group always stays in train.
    """
    groups: dict[str, list[TaskRecord]] = {}
    for r in sorted(records, key=lambda r: _rank(r.task, r.id)):
        groups.setdefault(prompt_key(r.prompt), []).append(r)
    order = list(groups.values())  # by the rank of each group's first member
    n = len(order)
    n_test = min(max_test, int(round(test_fraction * n)))
    n_val = min(max_val, int(round(val_fraction * n)))
    while n_test + n_val >= n and (n_test or n_val):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    out: list[TaskRecord] = []
    for i, group in enumerate(order):
        split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        if split == "train":
            out.extend(TaskRecord(r.task, r.id, r.prompt, r.completion, split, r.references, r.choices)
                       for r in group)
        else:  # one question, scored against every answer its copies give
            r = group[0]
            refs = tuple(dict.fromkeys(ref for m in group for ref in m.references))
            out.append(TaskRecord(r.task, r.id, r.prompt, r.completion, split, refs, r.choices))
    return out


def group_by_task(records: Iterable[TaskRecord]) -> dict[str, list[TaskRecord]]:
    out: dict[str, list[TaskRecord]] = {}
    for r in records:
        out.setdefault(r.task, []).append(r)
    return out
