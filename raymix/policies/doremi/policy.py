"""DoReMi's task weights (Xie et al. 2023, arXiv:2305.10429), mixer side.

Reference: sangmichaelxie/doremi, ``doremi/trainer.py`` (line numbers of its
newest stored commit). Each update, per task i, the score s_i is the mean
over the task's completion tokens of the per-token excess loss
max(0, l_proxy - l_ref) (trainer.py:252); a task absent from the batch keeps
its score (:254). Then

    log alpha <- log alpha + eta s,  renormalised      (trainer.py:257-258)
    alpha <- (1 - c) alpha + c / K                      (trainer.py:259)
    avg   <- running mean of alpha (from alpha_0)       (trainer.py:160)

and the proxy run's output is ``avg``, the mixture a final run trains on.

What raymix does differently, and why:

* ``mode: sample``: the run samples from (1 - floor) alpha + floor / K. The
  reference samples from a fixed baseline and reweights the per-token loss
  by alpha (trainer.py:345-363); raymix's training step does not weight
  per-task losses, and the policy never changes the loop.
* A task absent from an update keeps its score, as in the reference, but
  is not moved: the exponentiated-gradient step runs over the tasks present,
  which keep the total weight they held. (In the reference an absent task's
  kept score, initially log |V| (doremi/train.py:273), keeps pushing its
  weight up at every step it is absent.) Scores start at 0.
* Zero excess loss everywhere (the trained model at least as good as the
  reference on every token) leaves alpha where it is, as in the reference;
  ``doremi/zero_excess_tasks`` reports how many tasks are at zero.

Pure NumPy: signals in, weights out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.config import DoremiConfig, PolicyConfig
from raymix.policies.base import PoolInfo, Signals, normalise, register_policy


def dro_step(alpha: np.ndarray, scores: np.ndarray, present: np.ndarray, eta: float, smoothing: float
             ) -> np.ndarray:
    """One exponentiated-gradient step on log alpha over the ``present``
    tasks (their total weight kept), then the smoothing toward uniform."""
    alpha = np.asarray(alpha, dtype=np.float64).copy()
    K = len(alpha)
    if present.any():
        mass = alpha[present].sum()
        z = np.log(np.clip(alpha[present], 1e-300, None)) + eta * scores[present]
        z = np.exp(z - z.max())
        alpha[present] = mass * z / z.sum()
    return (1 - smoothing) * alpha + smoothing / K


class DoremiPolicy:
    def __init__(self, cfg: DoremiConfig, pool: PoolInfo):
        self.cfg = cfg
        self.tasks = pool.tasks
        self.K = len(pool.tasks)
        n = np.maximum(pool.train_tokens.astype(np.float64), 1.0)
        self.alpha = normalise(n if cfg.baseline == "proportional" else np.ones(self.K))
        self.avg = self.alpha.copy()
        self.counter = 1  # the reference's update_counter starts at 1 with avg = alpha_0 (train.py:272-274)
        self.scores = np.zeros(self.K)
        self.last: dict = {}

    def sampled(self) -> np.ndarray:
        return (1 - self.cfg.floor) * self.alpha + self.cfg.floor / self.K

    def initial_weights(self) -> np.ndarray:
        return self.sampled()

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        if "excess" not in signals.extra:
            return None
        excess = np.asarray(signals.extra["excess"], dtype=np.float64)
        present = np.isfinite(excess)
        self.scores[present] = np.clip(excess[present], 0.0, None)
        self.alpha = dro_step(self.alpha, self.scores, present, self.cfg.eta, self.cfg.smoothing)
        self.counter += 1
        self.avg = (self.avg * (self.counter - 1) + self.alpha) / self.counter
        self.last = {"zero_excess_tasks": int((self.scores[present] <= 0).sum()), "present": int(present.sum())}
        return self.sampled()

    def summary(self) -> dict:
        """The proxy run's output: the averaged weights (feed them to a final
        run as ``policy.name=static``, ``policy.weights``)."""
        return {"doremi": {"weights": dict(zip(self.tasks, self.avg.tolist())),
                           "last_alpha": dict(zip(self.tasks, self.alpha.tolist())),
                           "scores": dict(zip(self.tasks, self.scores.tolist())),
                           "updates": self.counter - 1}}

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.tolist(), "avg": self.avg.tolist(), "counter": self.counter,
                "scores": self.scores.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.avg = np.asarray(state["avg"], dtype=np.float64)
        self.counter = int(state["counter"])
        self.scores = np.asarray(state["scores"], dtype=np.float64)


def describe(summary: dict) -> list[str]:
    """The CLI's lines after a run: the proxy's averaged weights, every round's tokens."""
    d = summary.get("doremi", {})
    lines = [f"DoReMi: {d.get('updates')} DRO updates; averaged weights (the final round's mixture):"]
    lines += [f"  {t:<40} {w:.4f}" for t, w in sorted(d.get("weights", {}).items(), key=lambda kv: -kv[1])]
    for r in summary.get("doremi_rounds", []):
        lines.append(f"  round {r['round']:<9} ({r['policy']}): {r['train_tokens']} train tokens, "
                     f"{r['meta_tokens']} meta tokens")
    return lines


@register_policy("doremi", signal="raymix.policies.doremi.signal:DoremiSignal", fsdp=False,
                 driver="raymix.driver.doremi:run_doremi", describe="raymix.policies.doremi.policy:describe")
def doremi(cfg: PolicyConfig, pool: PoolInfo) -> DoremiPolicy:
    return DoremiPolicy(cfg.doremi, pool)
