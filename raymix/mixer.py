"""The mixer: the one owner of the task distribution, the policy's state and
the token ledger.

:class:`Mixer` is plain Python (tested without Ray); :func:`start_mixer_actor`
wraps it in a Ray actor that rank 0 of the training workers talks to. Workers
send ledger deltas and per-task losses every ``train.sync_every`` steps and
receive the current versioned mixture in the same call; they apply a new
version one interval later, so the call never blocks a training step.

The served mixture is the policy's proposal after the repetition cap: a task
may not be trained on more than ``budget.max_epochs`` times its size, and the
weight above that spills over to the other tasks (logged as ``spill``).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from raymix.config import PolicyConfig
from raymix.ledger import TokenLedger
from raymix.policies import PoolInfo, Signals, build_policy, cap_mixture, normalise


class Mixer:
    def __init__(self, policy_cfg: PolicyConfig, pool: PoolInfo, max_epochs: float):
        self.pool = pool
        self.policy = build_policy(policy_cfg, pool)
        self.ledger = TokenLedger(pool.tasks)
        self.capacity = pool.train_tokens.astype(np.float64) * max_epochs
        self.spill = np.zeros(len(pool.tasks))
        self.version = 0
        self.proposed = normalise(self.policy.initial_weights())
        self.weights = self._capped(self.proposed)
        self.schedule: list[tuple[int, dict[str, float]]] = []
        self.loss_sum = np.zeros(len(pool.tasks))
        self.loss_count = np.zeros(len(pool.tasks))
        self.update_seconds = 0.0

    # -- the mixture ---------------------------------------------------------
    def _capped(self, proposed: np.ndarray) -> np.ndarray:
        remaining_budget = max(0.0, self.pool.budget_tokens - self.ledger.train_total)
        remaining_cap = self.capacity - self.ledger.train
        if remaining_budget <= 0:
            # The budget is spent: nothing more is sampled, so keep serving
            # what was last applied rather than an uncapped proposal.
            return self.weights
        try:
            capped, spill = cap_mixture(proposed, remaining_cap, remaining_budget)
        except ValueError:
            # Capacity is exhausted only when the budget was checked too
            # loosely; keep training on what is left rather than stall.
            capped, spill = normalise(np.maximum(remaining_cap, 0) + 1e-12), np.zeros_like(proposed)
        self.spill = spill
        return capped

    def mixture(self) -> dict:
        return {"version": self.version, "weights": self.weights.tolist()}

    def applied(self, version: int, token_offset: int, weights: list[float]) -> None:
        """Workers applied mixture ``version`` at ``token_offset`` train tokens."""
        entry = (int(token_offset), {t: float(w) for t, w in zip(self.pool.tasks, weights)})
        if not self.schedule or self.schedule[-1][1] != entry[1]:
            self.schedule.append(entry)

    # -- reports from workers -------------------------------------------------
    def report(
        self,
        train_tokens: list[int],
        loss_sum: Optional[list[float]] = None,
        loss_count: Optional[list[float]] = None,
        meta_tokens: Optional[list[int]] = None,
        meta: Optional[dict] = None,
    ) -> dict:
        """Add a ledger delta, interval losses and meta signals (learned
        policies); let the policy update; return the served mixture."""
        t0 = time.perf_counter()
        self.ledger.add_train(train_tokens)
        if meta_tokens is not None:
            self.ledger.add_meta(meta_tokens)
        interval_loss = None
        if loss_sum is not None and loss_count is not None:
            ls, lc = np.asarray(loss_sum), np.asarray(loss_count)
            self.loss_sum += ls
            self.loss_count += lc
            with np.errstate(invalid="ignore", divide="ignore"):
                interval_loss = np.where(lc > 0, ls / np.maximum(lc, 1), np.nan)
        new = self.policy.update(Signals(self.ledger.train.copy(), interval_loss, dict(meta or {})))
        if new is not None:
            self.proposed = normalise(new)
        # Re-cap every report: a task nearing its cap must stop being sampled
        # even when the policy's proposal is unchanged.
        capped = self._capped(self.proposed)
        if not np.allclose(capped, self.weights, rtol=0, atol=1e-9):
            self.weights = capped
            self.version += 1
        self.update_seconds += time.perf_counter() - t0
        return self.mixture()

    # -- state ----------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "tasks": list(self.pool.tasks),
            "ledger": self.ledger.to_dict(),
            "train_tokens": self.ledger.train_total,
            "meta_tokens": self.ledger.meta_total,
            "mixture_schedule": [[o, w] for o, w in self.schedule],
            "final_weights": dict(zip(self.pool.tasks, self.weights.tolist())),
            "spill_tokens": dict(zip(self.pool.tasks, self.spill.tolist())),
            "mixer_update_seconds": self.update_seconds,
        }

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "ledger": self.ledger.state_dict(),
            "version": self.version,
            "proposed": self.proposed.tolist(),
            "weights": self.weights.tolist(),
            "schedule": [[o, w] for o, w in self.schedule],
            "loss_sum": self.loss_sum.tolist(),
            "loss_count": self.loss_count.tolist(),
            "spill": self.spill.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.ledger = TokenLedger.from_state_dict(state["ledger"])
        self.version = int(state["version"])
        self.proposed = np.asarray(state["proposed"])
        self.weights = np.asarray(state["weights"])
        self.schedule = [(int(o), dict(w)) for o, w in state["schedule"]]
        self.loss_sum = np.asarray(state["loss_sum"])
        self.loss_count = np.asarray(state["loss_count"])
        self.spill = np.asarray(state["spill"])


MIXER_NAMESPACE = "raymix"


def start_mixer_actor(name: str, policy_cfg: PolicyConfig, pool: PoolInfo, max_epochs: float):
    """The mixer as a named Ray actor (no CPU reserved: it is idle between reports)."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(Mixer)
    return actor_cls.options(name=name, namespace=MIXER_NAMESPACE).remote(
        policy_cfg, pool, max_epochs
    )
