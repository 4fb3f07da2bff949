"""IDEAL's volumes: the initial per-task token volumes, their update from
influence scores, and the static mixture one round trains on.

IDEAL is multi-round (``raymix.driver.ideal`` drives the rounds); inside a round the
mixture is static, its token shares volumes / budget. The registered ``ideal``
policy is that round-1 mixture, so the mixer can run it like any other.

Pure: no Ray, no torch, no I/O.
"""

from __future__ import annotations

import numpy as np

from raymix.config import IdealConfig, PolicyConfig
from raymix.policies.base import PoolInfo, cap_mixture, example_weights, register_policy, tokens_per_example
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


def capped_volumes(volumes: np.ndarray, pool: PoolInfo, max_epochs: float) -> np.ndarray:
    """The token volumes a round trains under the repetition cap
    (``budget.max_epochs``): the volumes themselves where no task's exceeds
    ``max_epochs`` times its training tokens, else the mixer's water-filling
    of them (a capped task at its capacity, its excess spread over the others
    in proportion to their volumes), summing exactly to the budget.

    The next round steps from these, the volumes the scored model was
    trained on: stepped from the planned ones, a capped task's cut would be
    absorbed by its excess over the cap and change nothing."""
    v = np.asarray(volumes, dtype=np.float64)
    budget = int(pool.budget_tokens)
    shares, spill = cap_mixture(v / v.sum(), pool.train_tokens.astype(np.float64) * max_epochs, budget)
    if not (spill > 0).any():
        return np.asarray(volumes, dtype=np.int64)
    return round_to_total(shares, budget)


def round_weights(volumes: np.ndarray, pool: PoolInfo) -> dict[str, float]:
    """The static mixture a round trains its token volumes with: per-example
    weights proportional to n_j / (tokens per example of task j), whose token
    shares are n_j / budget (weights n_j / budget drew examples, not tokens,
    in those shares: a task of long examples got more than its volume)."""
    w = example_weights(np.asarray(volumes, dtype=np.float64), tokens_per_example(pool))
    return {t: float(v) for t, v in zip(pool.tasks, w)}


@register_policy("ideal", driver="raymix.driver.ideal:run_ideal")
def ideal(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """Round 1 of IDEAL: the static mixture of the initial volumes (later
    rounds run as ``static`` with the updated volumes; see ``raymix.driver.ideal``)."""
    return StaticPolicy(example_weights(initial_volumes(cfg.ideal, pool), tokens_per_example(pool)))
