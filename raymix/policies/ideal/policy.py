"""IDEAL's volumes: the initial per-task token volumes, their update from
influence scores, and the static mixture one round trains on.

IDEAL is multi-round (``raymix.driver.ideal`` drives the rounds); inside a round the
mixture is static, weights = volumes / budget. The registered ``ideal``
policy is that round-1 mixture, so the mixer can run it like any other.

Pure: no Ray, no torch, no I/O.
"""

from __future__ import annotations

import numpy as np

from raymix.config import IdealConfig, PolicyConfig
from raymix.policies.base import PoolInfo, register_policy
from raymix.policies.static import StaticPolicy


def round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Non-negative reals scaled to sum to ``total``, rounded to integers by
    largest remainders so the integer sum is exactly ``total``."""
    v = np.asarray(values, dtype=np.float64)
    if np.any(v < 0) or not np.all(np.isfinite(v)) or v.sum() <= 0:
        raise ValueError("volumes must be finite, non-negative, with a positive sum")
    scaled = v * (total / v.sum())
    floor = np.floor(scaled)
    short = int(round(total - floor.sum()))
    order = np.argsort(-(scaled - floor), kind="stable")
    floor[order[:short]] += 1
    return floor.astype(np.int64)


def initial_volumes(cfg: IdealConfig, pool: PoolInfo) -> np.ndarray:
    """Round 1's token volumes n_j, summing exactly to the budget."""
    if cfg.init == "uniform":
        base = np.ones(len(pool.tasks))
    else:
        base = pool.train_tokens.astype(np.float64)
    return round_to_total(base, int(pool.budget_tokens))


def next_volumes(volumes: np.ndarray, scores: np.ndarray, cfg: IdealConfig, budget: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(β, the next round's volumes): β_j = -m·s_j/max|s|, n_j ← (1+β_j)·n_j,
    renormalised to the budget with exact integer rounding."""
    # Imported here: raymix.policies.ideal.influence needs torch, and every process that
    # builds a policy (the mixer actor among them) imports this module.
    from raymix.policies.ideal.influence import ideal_step, ideal_volumes

    beta = ideal_step(scores, cfg.m)
    return beta, ideal_volumes(volumes, scores, cfg.m, budget=int(budget), integer=True)


def round_weights(volumes: np.ndarray, tasks: tuple[str, ...], budget: int) -> dict[str, float]:
    """The static mixture of a round: ``{task: n_j / budget}``."""
    return {t: float(v) / float(budget) for t, v in zip(tasks, volumes)}


@register_policy("ideal", driver="raymix.driver.ideal:run_ideal")
def ideal(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """Round 1 of IDEAL: the static mixture of the initial volumes (later
    rounds run as ``static`` with the updated volumes; see ``raymix.driver.ideal``)."""
    return StaticPolicy(initial_volumes(cfg.ideal, pool).astype(np.float64))
