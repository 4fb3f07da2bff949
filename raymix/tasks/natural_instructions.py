"""Load Super-NaturalInstructions (v2) task files into :class:`TaskRecord` objects.

A task file ``task<N>_<name>.json`` holds a ``Definition`` (the instruction),
``Positive Examples`` (demonstrations) and ``Instances`` (the data). The task
name is the file stem, e.g. ``task190_snli_classification``.

Prompt format (``positive_examples=k``)::

    <definition>

    Input: <example 1 input>
    Output: <example 1 output>

    ... (k examples, each a blank-line separated block)

    Input: <instance input>

With ``k=0`` the prompt is ``"<definition>\\n\\nInput: <instance input>"``. The
completion is the instance's first output; ``references`` holds all of them.
When a task has fewer than ``k`` positive examples, all it has are used.
Records get split ``"train"``: the files carry no split, so the pool builder
assigns one by instance id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from raymix.errors import RaymixError
from raymix.tasks.records import TaskRecord, read_utf8


def task_files(root: Path) -> list[Path]:
    """The task files at ``root``: the file itself, or a directory's
    ``task*.json`` files sorted by name. A task's name is its file's stem."""
    if root.is_dir():
        files = sorted(p for p in root.glob("task*.json") if p.is_file())
        if not files:
            raise RaymixError(
                f"{root}: directory holds no Natural Instructions task*.json files"
            )
        return files
    if root.is_file():
        return [root]
    raise RaymixError(
        f"{root}: no such file or directory (Natural Instructions tasks)"
    )


def check_held_out(suite: str, held_out_dir: Optional[str], suite_tasks: Sequence[str] | None, sources) -> None:
    """A held-out suite's tasks (``held_out_dir``'s, or ``suite_tasks`` of
    them) may not be tasks a run trains on (by name: a Natural Instructions
    task is its file's stem, in the pool as in the suite): their scores
    would be on seen data. ``sources``: the run's ``data.sources``."""
    if not held_out_dir:
        raise RaymixError(f"eval.suite={suite} needs eval.ni_dir (a directory of held-out task files)")
    held_out = {p.stem for p in task_files(Path(held_out_dir).expanduser())}
    if suite_tasks:
        held_out &= set(suite_tasks)
    for i, src in enumerate(sources):
        if src.kind != "natural_instructions" or not src.path:
            continue
        trained = {p.stem for p in task_files(Path(src.path).expanduser())}
        if src.tasks:
            trained &= set(src.tasks)
        both = sorted(held_out & trained)
        if both:
            raise RaymixError(
                f"eval.suite={suite}: eval.ni_dir ({held_out_dir}) holds {len(both)} task(s) that "
                f"data.sources[{i}] ({src.path}) trains on: {', '.join(both[:5])}"
                f"{', ...' if len(both) > 5 else ''}; point eval.ni_dir at tasks left out of training")


def load_natural_instructions(
    path: str | Path,
    positive_examples: int = 0,
    max_instances: int | None = None,
    tasks: Sequence[str] | None = None,
) -> list[TaskRecord]:
    """Read one task file or a directory of ``task*.json`` files.

    Args:
        path: a task file, or a directory whose ``task*.json`` files are all read
            (sorted by name, so the result does not depend on listing order).
        positive_examples: how many positive examples to put in each prompt.
        max_instances: keep at most this many instances per task (file order).
        tasks: only load these task names (file stems); unknown names raise.

    Raises:
        RaymixError: naming the file (and line/field) for any malformed input.
    """
    if positive_examples < 0:
        raise RaymixError(f"positive_examples must be >= 0, got {positive_examples}")
    if max_instances is not None and max_instances < 1:
        raise RaymixError(f"max_instances must be >= 1 or None, got {max_instances}")
    root = Path(path)
    files = task_files(root)

    if tasks is not None:
        by_name = {f.stem: f for f in files}
        unknown = [t for t in tasks if t not in by_name]
        if unknown:
            raise RaymixError(
                f"{root}: unknown Natural Instructions task(s) {unknown}; "
                f"available: {sorted(by_name)}"
            )
        files = [by_name[t] for t in dict.fromkeys(tasks)]

    records: list[TaskRecord] = []
    for f in files:
        records.extend(_load_task_file(f, positive_examples, max_instances))
    return records


def _read_json(path: Path) -> Any:
    text = read_utf8(path)
    try:
        # json.loads accepts NaN/Infinity, which real NI files contain (e.g. URL).
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RaymixError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e


def _text(value: Any) -> str | None:
    """A non-empty string, or None; NI sometimes wraps single strings in lists."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, str) and value.strip():
        return value
    return None


def _load_task_file(
    path: Path, positive_examples: int, max_instances: int | None
) -> list[TaskRecord]:
    task = path.stem
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise RaymixError(
            f"{path}: top level must be a JSON object, got {type(doc).__name__}"
        )

    # Definition is a list of strings in the real data (usually one; a few tasks
    # list paraphrases). Like the reference NI code we use the first one.
    definition = _text(doc.get("Definition"))
    if definition is None:
        raise RaymixError(f"{path}: field 'Definition' is missing or empty")
    definition = definition.strip()

    demos: list[str] = []
    examples = doc.get("Positive Examples") or []
    if positive_examples and not isinstance(examples, list):
        raise RaymixError(f"{path}: field 'Positive Examples' must be a list")
    for j, ex in enumerate(examples[:positive_examples]):
        ex_in = _text(ex.get("input")) if isinstance(ex, dict) else None
        ex_out = _text(ex.get("output")) if isinstance(ex, dict) else None
        if ex_in is None or ex_out is None:
            raise RaymixError(
                f"{path}: 'Positive Examples'[{j}] needs non-empty 'input' and 'output'"
            )
        demos.append(f"Input: {ex_in.strip()}\nOutput: {ex_out.strip()}")

    instances = doc.get("Instances")
    if not isinstance(instances, list):
        raise RaymixError(f"{path}: field 'Instances' is missing or not a list")
    if not instances:
        raise RaymixError(f"{path}: field 'Instances' holds zero instances")
    if max_instances is not None:
        instances = instances[:max_instances]

    header = "\n\n".join([definition, *demos])
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for i, inst in enumerate(instances):
        where = f"{path}: 'Instances'[{i}]"
        if not isinstance(inst, dict):
            raise RaymixError(f"{where} must be an object, got {type(inst).__name__}")
        inp = inst.get("input")
        if not isinstance(inp, str) or not inp.strip():
            raise RaymixError(f"{where} has a missing or empty 'input'")
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs:
            raise RaymixError(f"{where} has a missing or empty 'output' list")
        if not all(isinstance(o, str) and o.strip() for o in outputs):
            raise RaymixError(f"{where} 'output' must be a list of non-empty strings")
        # Real ids look like "task190-<hex>"; fall back to the position if absent.
        inst_id = str(inst.get("id") or f"{task}-{i}")
        if inst_id in seen:
            raise RaymixError(f"{where} repeats instance id {inst_id!r}")
        seen.add(inst_id)
        refs = tuple(o.strip() for o in outputs)
        records.append(
            TaskRecord(
                task=task,
                id=inst_id,
                prompt=f"{header}\n\nInput: {inp.strip()}",
                completion=refs[0],
                references=refs,
            )
        )
    return records
