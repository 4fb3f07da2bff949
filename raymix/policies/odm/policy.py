"""Online Data Mixing (Albalak et al. 2023, arXiv:2312.02406).

Each task is an arm of a multi-armed bandit; the reward of an arm is its
training loss (a task still poorly fit has more to teach). Reference:
alon-albalak/online-data-mixing, ``megatron/data/data_sampling_utils.py``
(line numbers below are of its newest stored commit, edbfdad).

Exploration: eps_t = min(1/K, sqrt(ln K / (K t))) (data_sampling_utils.py:504),
and the mixture is p = (1 - K eps_t) q + eps_t, q the exploitation part:

* ``smoothed_mean`` (the paper's, README.md:15; ``group_update`` :501-528):
  R_i <- a R_i + (1-a) exp(L_i) for the tasks seen in the interval, and
  q = R / sum R (the group update's eps' factor cancels in the normalisation).
* ``exp3`` (``group_update`` :421-453): R_i += s L_i / p_i (importance
  weighting by the probability the task was sampled with), and
  q = softmax(eps_{t-1} R).

What raymix does differently, and why:

* One bandit update per report to the mixer (every ``train.sync_every``
  steps) on the interval's mean loss per task, where the reference updates
  every iteration on the minibatch's per-domain mean loss
  (megatron/training.py:1258-1267). Tasks not seen in the interval (NaN)
  are not updated, as domains absent from a minibatch are not. For
  ``exp3`` this coarsens the reference's estimator rather than changing
  it: both add L_i / p_i once per update to each task seen, which in
  expectation is P(seen) L_i / p_i, with P(seen) = 1 - (1 - p_i)^n over
  the update's n draws. A task drawn many times per update gains about
  L_i / p_i, a rarely drawn one about n L_i, so larger n (an interval of
  ``sync_every`` steps, not one minibatch) favours rarely drawn tasks more.
  ``smoothed_mean``, the default and the paper's, has no importance weight.
* The step counter t: the share of the budget spent times
  ``horizon_steps`` (default: the reference run's 100,000 iterations), so
  eps at a given share of training is what the reference had; null counts
  updates. Warm-up is ``warmup_share`` of the budget (reference: 2,000 of
  100,000 steps). The smoothed mean already absorbs warm-up losses (the
  reference collects nothing before its first update, so its first mixture
  puts every task not in that minibatch at eps).
* The probabilities for importance weighting are the policy's own last
  proposal; the mixer's repetition cap may have served slightly different
  ones.

Pure NumPy: signals in, weights out.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from raymix.config import OdmConfig, PolicyConfig
from raymix.policies.base import PoolInfo, Signals, normalise, register_policy


def exploration(K: int, t: float) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))) (data_sampling_utils.py:504)."""
    if K <= 1:
        return 1.0
    return min(1.0 / K, math.sqrt(math.log(K) / (K * max(t, 1e-12))))


class OdmPolicy:
    def __init__(self, cfg: OdmConfig, pool: PoolInfo):
        self.cfg = cfg
        self.K = len(pool.tasks)
        self.budget = float(pool.budget_tokens)
        n = np.maximum(pool.train_tokens.astype(np.float64), 1.0)
        self.p = normalise(n if cfg.init == "proportional" else np.ones(self.K))
        self.reward = np.zeros(self.K)  # R: smoothed mean of exp(loss), or cumulative estimated reward
        self.eps = 1.0 / self.K  # the reference's initial eps (data_sampling_utils.py:469)
        self.updates = 0
        self.t = 0.0
        self.last: dict = {}

    def initial_weights(self) -> np.ndarray:
        return self.p.copy()

    def step_counter(self, total: int) -> float:
        """t of eps_t: budget share times the horizon, or the update count."""
        if self.cfg.horizon_steps is None:
            return float(self.updates)
        return max(1.0, total / max(self.budget, 1.0) * self.cfg.horizon_steps)

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        if signals.train_loss is None:
            return None
        loss = np.asarray(signals.train_loss, dtype=np.float64)
        seen = np.isfinite(loss)
        if not seen.any():
            return None
        warm = signals.total < self.cfg.warmup_share * self.budget
        if self.cfg.variant == "smoothed_mean":
            a = self.cfg.smoothing
            self.reward[seen] = a * self.reward[seen] + (1 - a) * np.exp(loss[seen])
        if warm:
            return None
        self.updates += 1
        self.t = self.step_counter(signals.total)
        prev_eps, self.eps = self.eps, exploration(self.K, self.t)
        if self.cfg.variant == "exp3":
            self.reward[seen] += self.cfg.reward_scale * loss[seen] / self.p[seen]
            z = prev_eps * self.reward
            q = np.exp(z - z.max())
        else:
            q = self.reward.copy()
            if q.sum() <= 0:
                q = np.ones(self.K)
        q = q / q.sum()
        self.p = (1 - self.K * self.eps) * q + self.eps
        self.p = self.p / self.p.sum()
        self.last = {"t": self.t, "eps": self.eps, "explore_share": self.K * self.eps}
        return self.p.copy()

    def summary(self) -> dict:
        """What ``summary.json`` reports: the counter t and eps of the last update."""
        return {"odm": {"t": self.t, "eps": self.eps, "explore_share": self.K * self.eps,
                        "updates": self.updates, "variant": self.cfg.variant,
                        "reward": self.reward.tolist()}}

    def state_dict(self) -> dict:
        return {"p": self.p.tolist(), "reward": self.reward.tolist(), "eps": self.eps, "updates": self.updates,
                "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.p = np.asarray(state["p"], dtype=np.float64)
        self.reward = np.asarray(state["reward"], dtype=np.float64)
        self.eps = float(state["eps"])
        self.updates = int(state["updates"])
        self.t = float(state["t"])


def describe(summary: dict) -> list[str]:
    """The CLI's lines after a run: the bandit's counter and exploration."""
    o = summary.get("odm", {})
    return [f"ODM ({o.get('variant')}): {o.get('updates')} updates, t={o.get('t', 0):.0f}, "
            f"eps={o.get('eps', 0):.4f}, K*eps={o.get('explore_share', 0):.3f} (the share spread uniformly)"]


@register_policy("odm", describe="raymix.policies.odm.policy:describe")
def odm(cfg: PolicyConfig, pool: PoolInfo) -> OdmPolicy:
    return OdmPolicy(cfg.odm, pool)
