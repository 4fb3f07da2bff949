"""Aioli (Chen et al. 2024, arXiv:2411.05735), mixer side.

Reference: HazyResearch/aioli, ``trainer/aioli_trainer.py`` (line numbers of
its newest stored commit). Each round:

1. the per-task losses L on a fixed validation set (``val_loss``, read by the
   worker-side signal; :310-315);
2. for every probed task j, in ``sweeps`` random orders (:123), a short
   segment of real training on the probe mixture f on j and (1-f)/(m-1) on
   each other probed task (:125-126), then the losses again; the loss drop
   L_before - L_after is added to column j of G (:160), G /= sweeps (:164);
3. A from the probe mixtures W: sum_k W[j,k] A[i,k] = G[i,j] (:166-177);
   normalised to non-negative entries summing to 1 (:324-330);
4. p <- p0 exp(eta colsum(A_ema)), A_ema <- (1-ema) A + ema A_ema (:334-340),
   or without ema p <- p exp(eta colsum A) (:342-345);
5. the rest of the round trains on p.

Probe mixtures take effect exactly on schedule: each is the mixer's answer
to a signal report, which the loop applies at once.

What raymix does differently, and why:

* Round length and probe budget as shares: ``round_share`` of the budget
  per round (the reference's 250 of 5,000 steps); probe segments keep the
  reference's step count (4 steps) since a segment must move the losses.
* ``tasks_per_round`` probed tasks per round (a seeded sample), not all K:
  an all-task sweep at K=23 is 4 x 4 x 23 = 368 steps. The probe mixtures
  then put no weight outside the sample, A is fitted for the sampled
  columns, and the update moves weight among the sampled tasks only (they
  keep the total they held, the others keep theirs). With
  ``tasks_per_round: null`` this is the reference.
* The ema is kept on A's column sums per task (the update only reads
  them, and it is linear), so rounds over different samples combine.
* Tasks without validation data have no loss to lower: their rows of G are 0.

Pure NumPy: signals in, weights out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.config import AioliConfig, PolicyConfig
from raymix.policies.base import PoolInfo, Signals, normalise, register_policy


def probed_count(cfg: AioliConfig, K: int) -> int:
    return K if cfg.tasks_per_round is None else min(K, cfg.tasks_per_round)


def num_probes(cfg: AioliConfig, K: int) -> int:
    """Probe segments per round (the signal and the policy agree on it)."""
    return cfg.sweeps * probed_count(cfg, K)


def probe_mixture(K: int, probed: np.ndarray, j: int, f: float) -> np.ndarray:
    """f on task j, (1-f)/(m-1) on each other probed task, 0 elsewhere."""
    w = np.zeros(K)
    m = len(probed)
    w[probed] = (1 - f) / (m - 1) if m > 1 else 0.0
    w[j] = f if m > 1 else 1.0
    return w


def fit_mixing_law(G: np.ndarray, W: np.ndarray) -> np.ndarray:
    """A (rows: all tasks; columns: the probed ones) with A W^T = G, i.e.
    sum_k W[j,k] A[i,k] = G[i,j] for every probe mixture row W[j]."""
    return np.linalg.solve(W, G.T).T


def normalise_law(A: np.ndarray) -> np.ndarray:
    """Shift to non-negative entries, scale to sum 1 (aioli_trainer.py:324-330)."""
    A = A.copy()
    if A.min() < 0:
        A -= A.min()
    s = A.sum()
    return A / s if s > 0 else A


class AioliPolicy:
    def __init__(self, cfg: AioliConfig, pool: PoolInfo):
        self.cfg = cfg
        self.K = len(pool.tasks)
        self.tasks = pool.tasks
        n = np.maximum(pool.train_tokens.astype(np.float64), 1.0)
        self.p0 = normalise(n if cfg.init == "proportional" else np.ones(self.K))
        self.p = self.p0.copy()
        self.colsum = np.zeros(self.K)  # A's column sums (the ema of them with ``ema`` set)
        self.rounds = 0
        self.probed = np.zeros(0, dtype=np.int64)
        self.order = np.zeros(0, dtype=np.int64)
        self.G = np.zeros((self.K, 0))
        self.before = np.zeros(self.K)
        self.last: dict = {}

    def initial_weights(self) -> np.ndarray:
        return self.p.copy()

    def _start_round(self, losses: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, self.rounds])
        m = probed_count(self.cfg, self.K)
        self.probed = np.sort(rng.choice(self.K, size=m, replace=False)) if m < self.K else np.arange(self.K)
        self.order = np.concatenate([rng.permutation(self.probed) for _ in range(self.cfg.sweeps)])
        self.G = np.zeros((self.K, m))
        self.before = losses
        return probe_mixture(self.K, self.probed, int(self.order[0]), self.cfg.one_hot_factor)

    def _end_round(self) -> np.ndarray:
        cfg, S = self.cfg, self.probed
        G = self.G / cfg.sweeps
        W = np.stack([probe_mixture(self.K, S, int(j), cfg.one_hot_factor)[S] for j in S])
        A = fit_mixing_law(G, W) if cfg.one_hot_factor < 1 else G.copy()
        if cfg.normalise:
            A = normalise_law(A)
        cs = A.sum(axis=0)
        first = self.rounds == 0
        if cfg.ema is not None:
            self.colsum[S] = cs if first else (1 - cfg.ema) * cs + cfg.ema * self.colsum[S]
            target = self.p0[S] * np.exp(cfg.eta * self.colsum[S])
        else:
            base = self.p0[S] if first else self.p[S]
            target = base * np.exp(cfg.eta * cs)
        p = self.p.copy()
        p[S] = p[S].sum() * target / target.sum()
        self.p = p / p.sum()
        self.rounds += 1
        self.last = {"A": A.tolist(), "probed": S.tolist()}
        return self.p.copy()

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        if "probe_index" not in signals.extra:
            return None
        k = int(signals.extra["probe_index"])
        losses = np.asarray(signals.extra["val_loss"], dtype=np.float64)
        losses = np.where(np.isfinite(losses), losses, 0.0)  # no validation data: no drop to count
        if k == 0:
            return self._start_round(losses)
        j = int(self.order[k - 1])
        col = int(np.searchsorted(self.probed, j))
        self.G[:, col] += self.before - losses
        self.before = losses
        if k < len(self.order):
            return probe_mixture(self.K, self.probed, int(self.order[k]), self.cfg.one_hot_factor)
        return self._end_round()

    def summary(self) -> dict:
        return {"aioli": {"rounds": self.rounds, "colsum": dict(zip(self.tasks, self.colsum.tolist())),
                          "last_probed": [self.tasks[i] for i in self.probed],
                          "weights": dict(zip(self.tasks, self.p.tolist()))}}

    def state_dict(self) -> dict:
        return {"p": self.p.tolist(), "colsum": self.colsum.tolist(), "rounds": self.rounds,
                "probed": self.probed.tolist(), "order": self.order.tolist(), "G": self.G.tolist(),
                "before": self.before.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.p = np.asarray(state["p"], dtype=np.float64)
        self.colsum = np.asarray(state["colsum"], dtype=np.float64)
        self.rounds = int(state["rounds"])
        self.probed = np.asarray(state["probed"], dtype=np.int64)
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.G = np.asarray(state["G"], dtype=np.float64).reshape(self.K, len(self.probed))
        self.before = np.asarray(state["before"], dtype=np.float64)


def describe(summary: dict) -> list[str]:
    a = summary.get("aioli", {})
    return [f"Aioli: {a.get('rounds')} rounds fitted; last probed tasks {a.get('last_probed')}"]


@register_policy("aioli", signal="raymix.policies.aioli.signal:AioliSignal", fsdp=False,
                 describe="raymix.policies.aioli.policy:describe")
def aioli(cfg: PolicyConfig, pool: PoolInfo) -> AioliPolicy:
    return AioliPolicy(cfg.aioli, pool)
