"""Static mixtures: uniform, size-proportional, temperature, UniMax, fixed
weights, and replay of a recorded schedule."""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.config import PolicyConfig
from raymix.errors import RaymixError
from raymix.policies.base import (
    PoolInfo,
    Signals,
    cap_mixture,
    example_weights,
    normalise,
    register_policy,
    tokens_per_example,
)


class StaticPolicy:
    """A fixed mixture; ``update`` never changes it."""

    def __init__(self, weights: np.ndarray):
        self.weights = normalise(weights)

    def initial_weights(self) -> np.ndarray:
        return self.weights.copy()

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        return None

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)


@register_policy("uniform", static=True)
def uniform(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    return StaticPolicy(np.ones(len(pool.tasks)))


@register_policy("proportional", static=True)
def proportional(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """p_i proportional to the task's training tokens."""
    return StaticPolicy(pool.train_tokens.astype(np.float64))


@register_policy("temperature", static=True)
def temperature(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """p_i proportional to n_i^(1/t): t=1 is proportional, t->inf uniform."""
    n = pool.train_tokens.astype(np.float64)
    return StaticPolicy(n ** (1.0 / cfg.temperature))


@register_policy("unimax", static=True)
def unimax(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """UniMax (Chung et al., 2023): the budget's tokens spread uniformly, no
    task beyond ``unimax_epochs`` epochs, the excess given to the remaining
    tasks; served as the per-example weights that give those token shares."""
    cap = pool.train_tokens.astype(np.float64) * cfg.unimax_epochs
    try:
        shares, _ = cap_mixture(np.ones(len(pool.tasks)), cap, pool.budget_tokens)
        w = example_weights(shares, tokens_per_example(pool))
    except ValueError:
        raise RaymixError(
            f"policy.unimax_epochs={cfg.unimax_epochs} caps the pool at {cap.sum():.0f} tokens, "
            f"below the budget of {pool.budget_tokens}; raise policy.unimax_epochs"
        ) from None
    return StaticPolicy(w)


def _weights_from_mapping(mapping: dict, pool: PoolInfo, where: str) -> np.ndarray:
    unknown = sorted(set(mapping) - set(pool.tasks))
    if unknown:
        raise RaymixError(f"{where}: unknown task(s) {unknown}; the pool has {list(pool.tasks)}")
    w = np.array([float(mapping.get(t, 0.0)) for t in pool.tasks])
    if (w < 0).any() or w.sum() <= 0:
        raise RaymixError(f"{where}: weights must be >= 0 with a positive sum")
    return w


@register_policy("static", static=True)
def static(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    if not cfg.weights:
        raise RaymixError("policy.weights is required for policy 'static' ({task: weight})")
    return StaticPolicy(_weights_from_mapping(cfg.weights, pool, "policy.weights"))


class SchedulePolicy:
    """Replays ``[(token_offset, {task: weight}), ...]``: the format every run
    records as ``mixture_schedule``, so a learned mixture can be fed back in."""

    def __init__(self, stages: list[tuple[int, np.ndarray]]):
        self.stages = stages
        self.stage = 0

    def initial_weights(self) -> np.ndarray:
        return self.stages[0][1].copy()

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        nxt = self.stage
        while nxt + 1 < len(self.stages) and signals.total >= self.stages[nxt + 1][0]:
            nxt += 1
        if nxt == self.stage:
            return None
        self.stage = nxt
        return self.stages[nxt][1].copy()

    def state_dict(self) -> dict:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])


@register_policy("schedule", static=True)
def schedule(cfg: PolicyConfig, pool: PoolInfo) -> SchedulePolicy:
    if not cfg.schedule:
        raise RaymixError("policy.schedule is required for policy 'schedule'")
    stages = []
    for i, item in enumerate(cfg.schedule):
        where = f"policy.schedule[{i}]"
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)):
            raise RaymixError(f"{where}: expected [token_offset, {{task: weight}}], got {item!r}")
        stages.append((int(item[0]), normalise(_weights_from_mapping(item[1], pool, where))))
    offsets = [s[0] for s in stages]
    if offsets[0] != 0 or offsets != sorted(offsets):
        raise RaymixError("policy.schedule: offsets must start at 0 and increase")
    return SchedulePolicy(stages)
