"""What a sweep's ``sweep.json`` records and how ``--resume`` reads it
(``raymix.sweep``): the MLflow store the sweep continues in, and the checks
that a resumed sweep computes the trials it started with."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from raymix.config import identity_hash
from raymix.errors import RaymixError


def read_state(state_file: Path) -> dict:
    """A sweep's ``sweep.json`` (what ``--resume`` continues)."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise RaymixError(f"--resume: {state_file} cannot be read ({e}); start the sweep in another --output") from None
    if not isinstance(state, dict):
        raise RaymixError(f"--resume: {state_file} holds no sweep record; start the sweep in another --output")
    return state


def saved_store(state: dict, default: str) -> str:
    """The MLflow store a resumed sweep continues in when none is given: the
    one it was started on (``sweep.json``), or the sweep folder's own
    ``mlflow.db`` when that record names an SQLite file that is gone and
    the folder holds one (a sweep folder moved or copied elsewhere)."""
    saved = state.get("tracking_uri") or default
    if saved.startswith("sqlite:///") and saved != default and not Path(saved[len("sqlite:///"):]).exists() \
            and Path(default[len("sqlite:///"):]).exists():
        return default
    return saved


def space_record(space) -> dict[str, Any]:
    """The part of a space that decides its trials (``base`` and ``grid``),
    as ``sweep.json`` records it for :func:`check_resume_identity`."""
    return {"base": space.base, "grid": space.grid}


def check_resume_identity(space, saved_extra: Sequence[str], extra: Sequence[str], configs,
                          saved_space: Optional[dict] = None) -> None:
    """Refuse a ``--resume`` whose ``--set``, or whose space file edited
    since the sweep started (``saved_space``: its :func:`space_record`, in
    sweeps recorded since), changes what the sweep's trials compute
    (``runtime.*`` and ``tracking.*`` may change: they are not in the
    identity, except the worker count where it sets the global batch);
    nothing is written before this check."""
    now = sorted(identity_hash(c) for c in configs)
    # The space file as it is now, with the sweep's own --set.
    before = sorted(identity_hash(c) for c in space.configs(list(saved_extra)))
    if saved_space is not None:
        recorded = dataclasses.replace(space, base=saved_space["base"], grid=saved_space["grid"])
        try:
            started = sorted(identity_hash(c) for c in recorded.configs(list(saved_extra)))
        except RaymixError:
            started = now  # recorded by a raymix whose config keys differ: the --set check below only
        if started != now and started != before:
            raise RaymixError(f"--resume: the space of sweep {space.name!r} changed since the sweep started in "
                              "fields that change its trials' results (its base and grid then: space_record in "
                              "sweep.json); restore the space file (runtime.* may change), or start the edited "
                              "space in another --output")
    if before == now:
        return
    changed = sorted(set(extra) ^ set(saved_extra))
    raise RaymixError(f"--resume: --set {changed} changes the identity of sweep {space.name!r}'s trials (fields "
                      f"that change results); resume with the sweep's own --set {list(saved_extra)} (runtime.* "
                      "may change, but not runtime.num_workers where train.global_batch_tokens is null: the "
                      "worker count then sets the global batch), or start the new grid in another --output")
