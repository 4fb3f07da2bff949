"""Load user task data from JSON Lines files into :class:`TaskRecord` objects.

Each non-blank line is one JSON object, in one of two shapes:

* ``{"prompt": "...", "completion": "..."}``
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  whose last message must come from the assistant.

A chat conversation is rendered as plain text: each message before the last
becomes ``"<Role>: <content>"`` (``System``, ``User``, ``Assistant``), blocks
are separated by a blank line, and the prompt ends with ``"\\n\\nAssistant:"``
so the model sees whose turn it is. The completion is the last assistant
message's content. Example::

    System: Be brief.

    User: 2+2?

    Assistant:

Optional fields per line: ``task`` (else the ``task`` argument, else the file
stem), ``id`` (string or integer; else ``"<file stem>-<line number>"``),
``split`` (``train``/``val``/``test``; default ``train``), ``references`` and
``choices`` (lists of strings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raymix.errors import RaymixError
from raymix.tasks.records import SPLITS, TaskRecord, read_utf8

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def load_jsonl(path: str | Path, task: str | None = None) -> list[TaskRecord]:
    """Read a ``.jsonl`` file, or every ``*.jsonl`` file in a directory (sorted).

    Raises:
        RaymixError: naming the file and line number of any malformed line.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.glob("*.jsonl") if p.is_file())
        if not files:
            raise RaymixError(f"{root}: directory holds no *.jsonl files")
    elif root.is_file():
        files = [root]
    else:
        raise RaymixError(f"{root}: no such file or directory (JSONL tasks)")

    records: list[TaskRecord] = []
    # (task, id) -> where it was first seen; the split is derived from the id,
    # so a repeated id would silently merge two examples' fates.
    seen: dict[tuple[str, str], str] = {}
    for f in files:
        for where, rec in _load_file(f, task):
            key = (rec.task, rec.id)
            if key in seen:
                raise RaymixError(
                    f"{where}: id {rec.id!r} of task {rec.task!r} already used at {seen[key]}"
                )
            seen[key] = where
            records.append(rec)
    return records


def _load_file(path: Path, default_task: str | None) -> list[tuple[str, TaskRecord]]:
    out: list[tuple[str, TaskRecord]] = []
    # split("\n") rather than splitlines(): the latter also breaks on characters
    # such as U+2028 that may legally appear inside JSON strings.
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RaymixError(
                f"{where}: malformed JSON (line {lineno}, column {e.colno}): {e.msg}"
            ) from e
        if not isinstance(obj, dict):
            raise RaymixError(
                f"{where}: line {lineno} must be a JSON object, got {type(obj).__name__}"
            )
        out.append((where, _record(obj, path, lineno, default_task)))
    if not out:
        raise RaymixError(f"{path}: file holds no records (empty or only blank lines)")
    return out


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        raise RaymixError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise RaymixError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise RaymixError(f"{where}: field {key!r} is empty")
    return value


def _string_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RaymixError(f"{where}: field {key!r} must be a list of strings")
    return tuple(value)


def _render_chat(messages: Any, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise RaymixError(f"{where}: field 'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RaymixError(f"{where}: messages[{j}] must be an object")
        if m.get("role") not in ROLES:
            raise RaymixError(
                f"{where}: messages[{j}] has role {m.get('role')!r}; expected one of {list(ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            raise RaymixError(
                f"{where}: messages[{j}] field 'content' must be a string"
            )
    if messages[-1]["role"] != "assistant":
        raise RaymixError(
            f"{where}: the last message must be from the assistant (it is the completion), "
            f"got role {messages[-1]['role']!r}"
        )
    completion = messages[-1]["content"]
    if not completion.strip():
        raise RaymixError(
            f"{where}: the last assistant message ('completion') is empty"
        )
    history = [m for m in messages[:-1] if m["content"].strip()]
    if not history:
        raise RaymixError(
            f"{where}: no non-empty messages before the last assistant message"
        )
    blocks = [f"{ROLES[m['role']]}: {m['content'].strip()}" for m in history]
    return "\n\n".join([*blocks, "Assistant:"]), completion


def _record(obj: dict, path: Path, lineno: int, default_task: str | None) -> TaskRecord:
    where = f"{path}:{lineno}"
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise RaymixError(
                f"{where}: give either 'messages' or 'prompt'/'completion', not both"
            )
        prompt, completion = _render_chat(obj["messages"], where)
    else:
        prompt = _string(obj, "prompt", where)
        completion = _string(obj, "completion", where)

    task = obj.get("task", default_task or path.stem)
    if not isinstance(task, str) or not task.strip():
        raise RaymixError(f"{where}: field 'task' must be a non-empty string")

    raw_id = obj.get("id", f"{path.stem}-{lineno}")
    # Integer ids are common in exported data; bool is an int subclass, so exclude it.
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not raw_id:
        raise RaymixError(
            f"{where}: field 'id' must be a non-empty string or an integer"
        )

    split = obj.get("split", "train")
    if split not in SPLITS:
        raise RaymixError(
            f"{where}: field 'split' is {split!r}; expected one of {list(SPLITS)}"
        )

    return TaskRecord(
        task=task,
        id=raw_id,
        prompt=prompt,
        completion=completion,
        split=split,
        references=_string_list(obj, "references", where),
        choices=_string_list(obj, "choices", where),
    )
