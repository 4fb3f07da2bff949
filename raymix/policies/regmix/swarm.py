"""RegMix's mixtures: the swarm's Dirichlet samples and the candidates the
optimum is searched over, both within the repetition cap.

Reference: sail-sg/regmix, ``mixture_config/synthesize_mixture.py`` at commit
b004d3a (line numbers below). Its centre is the token distribution raised to
``TEMP`` (:136-138); each sample draws a concentration factor among 15
log-spaced ones between ``MIN_STRENGH`` and ``MAX_STRENGH`` (:152-159) and
then Dirichlet(factor x centre); weights under ``MINIMUM`` are zeroed and the
rest renormalised (:165-167).

What raymix does differently, and why:

* The reference rejects samples above a per-domain bound of
  ``MAXIMUM_USAGE`` times the domain's share (:127-131, :160-164), so that the
  large run repeats no domain too often. raymix's bound is the one its mixer
  applies, ``budget.max_epochs`` at the final run's budget, and a sample over
  it is mapped through the mixer's own water-filling
  (:func:`raymix.policies.base.cap_mixture`) instead of rejected: a tight cap
  then still yields samples, and every mixture is one the final run can train.
* No rounding to multiples of ``MINIMUM`` (:168). A swarm row that repeats
  an earlier one is drawn again, as the reference de-duplicates (:172-174):
  continuous samples do not repeat, but with ``min_weight`` a concentrated
  draw is one-hot, and two one-hot draws on a task would be one proxy run.
* Row i of a sample depends on the seed and i only, so the first k
  mixtures of a swarm of K > k are the swarm of k (a larger swarm reuses a
  smaller one's proxy runs).

Pure NumPy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raymix.config_regmix import RegmixConfig
from raymix.policies.base import cap_mixture, normalise

STRENGTHS = 15
"""Concentration factors log-spaced between the min and max strength (synthesize_mixture.py:154)."""


def dirichlet_centre(train_tokens: np.ndarray, temperature: float) -> np.ndarray:
    """The pool's token distribution raised to ``temperature``, renormalised."""
    p = normalise(np.maximum(np.asarray(train_tokens, dtype=np.float64), 1.0))
    return normalise(p**temperature)


def cap_rows(mixtures: np.ndarray, capacity: np.ndarray, budget: float) -> np.ndarray:
    """Each row as the mixer would apply it at ``budget`` under per-task
    ``capacity`` (tokens): rows within it unchanged, the others water-filled."""
    out = np.array(mixtures, dtype=np.float64)
    over = (out * budget > np.asarray(capacity)[None, :] * (1 + 1e-12)).any(axis=1)
    for i in np.flatnonzero(over):
        out[i], _ = cap_mixture(out[i], capacity, budget)
    return out


def _drop_small(g: np.ndarray, min_weight: float) -> np.ndarray:
    """Rows of Gamma draws with the entries under ``min_weight`` of their row's sum set to 0."""
    total = np.maximum(g.sum(axis=1, keepdims=True), 1e-300)
    return np.where(g / total < min_weight, 0.0, g)


REDRAWS = 1000
"""Redraws of a swarm row that repeats an earlier one before it is kept as it
is (a cap that maps every mixture to one, e.g. a budget of the whole capacity)."""


def sample_mixtures(seed: Sequence[int], centre: np.ndarray, count: int, cfg: RegmixConfig,
                    capacity: np.ndarray, budget: float, distinct: bool = False) -> np.ndarray:
    """``count`` mixtures (rows summing to 1) drawn as RegMix draws its
    swarm, then capped at ``budget`` tokens by ``capacity``. Row i depends
    on ``seed`` and rows up to i only (strengths, Gammas and redraws come
    from generators of ``seed``, each read in row order). ``distinct`` (the
    swarm): a row equal to an earlier one is drawn again (strength and
    Dirichlet, from a fourth generator), as the reference rejects duplicates
    (synthesize_mixture.py:172-174): with weights under ``min_weight``
    dropped, concentrated draws are one-hot and repeat, and a repeated
    mixture is the same proxy run."""
    strengths = np.logspace(np.log10(cfg.min_strength), np.log10(cfg.max_strength), STRENGTHS)
    centre = np.asarray(centre, dtype=np.float64)
    factor = strengths[np.random.default_rng([*seed, 0]).integers(len(strengths), size=count)]
    # Dirichlet(alpha) is a row of independent Gamma(alpha_i, 1) draws, normalised.
    g = np.random.default_rng([*seed, 1]).standard_gamma(factor[:, None] * centre[None, :])
    redraw = np.random.default_rng([*seed, 2])
    g = _drop_small(g, cfg.min_weight)
    for i in np.flatnonzero(g.sum(axis=1) <= 0):
        while g[i].sum() <= 0:  # every Gamma underflowed to 0 at a tiny alpha: draw the row again
            g[i] = _drop_small(redraw.standard_gamma(factor[i] * centre)[None, :], cfg.min_weight)[0]
    out = cap_rows(g / g.sum(axis=1, keepdims=True), capacity, budget)
    if distinct:
        fresh = np.random.default_rng([*seed, 3])
        seen: set[bytes] = set()
        for i in range(count):
            for _ in range(REDRAWS):
                if out[i].tobytes() not in seen:
                    break
                f = strengths[fresh.integers(len(strengths))]
                row = np.zeros(len(centre))
                while row.sum() <= 0:
                    row = _drop_small(fresh.standard_gamma(f * centre)[None, :], cfg.min_weight)[0]
                out[i] = cap_rows((row / row.sum())[None, :], capacity, budget)[0]
            seen.add(out[i].tobytes())
    return out
