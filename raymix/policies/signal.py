"""The worker-side extension point: what a policy computes on the training
workers, and how the loop drives it.

A policy that needs work on the workers (ADAPT's meta step, GradEx's
estimation; a reference model's losses or probe segments next) names a
factory in its registry entry (``register_policy(..., signal=...)``). The
training loop builds it once per worker from a :class:`SignalContext` and,
after every optimizer step, calls :meth:`WorkerSignal.observe`, then
:meth:`WorkerSignal.due`; when due, :meth:`WorkerSignal.compute` (on every
rank: it may run collectives), reports rank 0's result to the mixer actor,
whose policy turns it into a new mixture that applies at once, and logs
:meth:`WorkerSignal.metrics`. The loop never knows which policy it runs.

:class:`NoSignal` does nothing and is a base class for signals that need
only some of the hooks. This module imports neither torch nor Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from raymix.config import RunConfig


@dataclass(frozen=True)
class SignalContext:
    """What a worker-side signal is built from."""

    model: Any
    """The unwrapped model being trained (its parameters are the live ones)."""
    run: RunConfig
    pool: Any
    """The prepared pool (``raymix.data.PreparedPool``): shard folders, statistics."""
    budget_tokens: int
    rank: int
    world: int
    distributed: bool
    """A process group exists: all-reduce across ``world`` ranks."""
    pad_id: int
    device: Any


@dataclass(frozen=True)
class StepView:
    """The loop's state after an optimizer step, identical on every rank."""

    step: int
    train_tokens: int
    budget_tokens: int
    lr: float
    """The learning rate of the step just taken."""
    weights: np.ndarray
    """The mixture the step sampled from."""
    stats: np.ndarray
    """Per task, over all ranks: [tokens, completion-token NLL sum, completion-token count]."""


class WorkerSignal(Protocol):
    def observe(self, view: StepView) -> None:
        """Called after every optimizer step, on every rank."""

    def due(self, view: StepView) -> bool:
        """Whether :meth:`compute` runs now. Must be the same on every rank
        (decide from ``view`` and state that every rank shares)."""

    def compute(self, view: StepView) -> Optional[dict]:
        """The signals for the mixer-side policy (``Signals.extra``); rank 0's
        are sent. A ``meta_tokens`` list (per task) is added to the ledger."""

    def metrics(self, signals: Optional[dict], weights: np.ndarray, timing: dict[str, float]) -> dict[str, float]:
        """MLflow metrics after a computation, on rank 0, once the mixture it
        led to (``weights``) applies; ``timing``: ``step_seconds`` (the
        computation and the mixer's reply) and ``time_share`` (of the loop so far).
        Per-task numbers go under a key template holding ``{task}`` as a
        ``raymix.metrics_view.PerTask`` (one metric per task, or aggregates
        above ``tracking.per_task_metrics_max_tasks``)."""

    def stops_run(self) -> bool:
        """After a computation: whether the run ends here, short of the budget."""

    def summary(self) -> dict:
        """Keys this signal adds to the run's ``summary.json`` (rank 0)."""

    def state_dict(self) -> dict:
        """State shared by the ranks (rank 0's is saved), as top-level
        checkpoint keys that no other part uses."""

    def load_state_dict(self, state: dict) -> None:
        """Restore from the whole checkpoint's top-level keys."""

    def rank_state_dict(self) -> dict:
        """This rank's own state (its streams, its random state)."""

    def load_rank_state_dict(self, state: dict) -> None: ...


class NoSignal:
    """A signal that is never due and holds no state (static policies have
    none at all; subclass it to implement only some hooks)."""

    def observe(self, view: StepView) -> None:
        pass

    def due(self, view: StepView) -> bool:
        return False

    def compute(self, view: StepView) -> Optional[dict]:
        return None

    def metrics(self, signals: Optional[dict], weights: np.ndarray, timing: dict[str, float]) -> dict[str, float]:
        return {}

    def stops_run(self) -> bool:
        return False

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass
