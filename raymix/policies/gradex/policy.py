"""GradEx as a mixing policy: uniform until the workers' estimation, then a
mixture over the tasks it selected.

Phase 1 serves the uniform mixture (the meta initialisation: multitask
training on all tasks). When ``policy.gradex.meta_share`` of the budget is
spent, rank 0 of the workers estimates fine-tuned target losses of random
task subsets (``raymix.policies.gradex.signal``) and reports the task scores and the
selection as signals; from then on the policy serves a mixture over the
selected tasks only (uniform, or proportional to their size).

Pure: signals in, weights out; no Ray, no torch, no I/O.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from raymix.config import GradexConfig, PolicyConfig
from raymix.errors import RaymixError
from raymix.policies.base import PoolInfo, Signals, register_policy


def subset_tasks(cfg: GradexConfig, num_tasks: int) -> int:
    """Tasks per random subset (``subset_size`` as a share or a count)."""
    size = cfg.subset_size
    return int(round(size * num_tasks)) if size < 1 else int(size)


class GradexPolicy:
    def __init__(self, cfg: GradexConfig, pool: PoolInfo):
        self.cfg = cfg
        self.tasks = pool.tasks
        self.sizes = pool.train_tokens.astype(np.float64)
        self.T = len(pool.tasks)
        self.phase = 1
        self.selected: list[int] = []
        self.scores: list[float] = []

    def initial_weights(self) -> np.ndarray:
        return np.full(self.T, 1.0 / self.T)

    def phase2_weights(self, selected: list[int]) -> np.ndarray:
        w = np.zeros(self.T)
        idx = np.asarray(selected, dtype=np.int64)
        w[idx] = self.sizes[idx] if self.cfg.mixture == "proportional" else 1.0
        if w.sum() <= 0:  # proportional over empty tasks: fall back to equal weights
            w[idx] = 1.0
        return w / w.sum()

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        selection = signals.extra.get("gradex_selection")
        if selection is None or self.phase == 2:
            return None
        selected = sorted({int(i) for i in selection})
        if not selected or min(selected) < 0 or max(selected) >= self.T:
            raise ValueError(f"gradex selection {selection} is not a non-empty list of task indices < {self.T}")
        self.selected = selected
        self.scores = [float(s) for s in signals.extra.get("gradex_scores", [])]
        self.phase = 2
        return self.phase2_weights(selected)

    def state_dict(self) -> dict:
        return {"phase": self.phase, "selected": list(self.selected), "scores": list(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.phase = int(state["phase"])
        self.selected = [int(i) for i in state["selected"]]
        self.scores = [float(s) for s in state["scores"]]


def target_indices(cfg: GradexConfig, pool: PoolInfo) -> Optional[list[int]]:
    """Indices of ``policy.gradex.target`` in the pool (None: every task)."""
    if cfg.target is None:
        return None
    unknown = sorted(set(cfg.target) - set(pool.tasks))
    if unknown:
        raise RaymixError(f"policy.gradex.target: unknown task(s) {unknown}; the pool has {list(pool.tasks)}")
    return sorted(pool.tasks.index(t) for t in set(cfg.target))


def subset_counts(cfg: GradexConfig, num_tasks: int, num_fixed: int) -> tuple[int, int, int]:
    """(tasks per subset, M, K) for a pool: M and K as configured, lowered
    when fewer distinct subsets exist than M + K (small pools): K to at most
    half of them, M to the rest. Raises when no subset leaves a task out."""
    k = subset_tasks(cfg, num_tasks)
    free = num_tasks - num_fixed
    if not num_fixed <= k < num_tasks or k - num_fixed >= free:
        raise RaymixError(f"policy.gradex.subset_size={cfg.subset_size} gives {k} tasks per subset; the pool has "
                          f"{num_tasks} tasks and {num_fixed} target task(s) in every subset, and a subset must "
                          "leave some task out")
    possible = math.comb(free, k - num_fixed)
    if possible < 2:
        raise RaymixError(f"policy.gradex.subset_size={cfg.subset_size}: only {possible} distinct subset(s) of {k} "
                          "tasks exist; scores need subsets with and without each task")
    verify = min(cfg.verify_subsets, possible // 2)
    return k, min(cfg.num_subsets, possible - verify), verify


@register_policy("gradex", signal="raymix.policies.gradex.signal:GradexSignal", fsdp=False,
                 describe="raymix.policies.gradex.signal:describe",
                 report_section="raymix.policies.gradex.signal:report_section")
def gradex(cfg: PolicyConfig, pool: PoolInfo) -> GradexPolicy:
    g = cfg.gradex
    subset_counts(g, len(pool.tasks), len(target_indices(g, pool) or []))  # fail before training
    return GradexPolicy(g, pool)
