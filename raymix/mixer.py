"""The mixer: the one owner of the task distribution, the policy's state and
the token ledger.

:class:`Mixer` is plain Python (tested without Ray); :func:`start_mixer_actor`
wraps it in a Ray actor that rank 0 of the training workers talks to. Workers
send ledger deltas and per-task losses every ``train.sync_every`` steps and
receive the current versioned mixture in the same call; they apply a new
version one interval later, so the call never blocks a training step.

The served mixture is the policy's proposal after the repetition cap: a task
may not be trained on more than ``budget.max_epochs`` times its size, and the
weight above that spills over to the other tasks (logged as ``spill``). A
mixture's weights are the probabilities each example is drawn from a task
with; the cap plans in the tokens they give each task (a task of long
examples takes more tokens per draw: ``raymix.policies.cap_weights``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Optional

import numpy as np

from raymix.config import PolicyConfig
from raymix.ledger import TokenLedger
from raymix.policies import (
    PoolInfo,
    Signals,
    build_policy,
    cap_weights,
    example_weights,
    normalise,
    tokens_per_example,
)


class Mixer:
    def __init__(self, policy_cfg: PolicyConfig, pool: PoolInfo, max_epochs: float):
        self._init_args = (policy_cfg, pool, max_epochs)
        self.pool = pool
        self.policy = build_policy(policy_cfg, pool)
        self.ledger = TokenLedger(pool.tasks)
        self.capacity = pool.train_tokens.astype(np.float64) * max_epochs
        self.per_example = tokens_per_example(pool)  # weights are per example; capacities are tokens
        self.spill = np.zeros(len(pool.tasks))
        self.version = 0
        self.proposed = normalise(self.policy.initial_weights())
        self.weights = self._capped(self.proposed)
        self.schedule: list[tuple[int, dict[str, float]]] = []
        self.loss_sum = np.zeros(len(pool.tasks))
        self.loss_count = np.zeros(len(pool.tasks))
        self.update_seconds = 0.0
        self.restores = 0
        """Checkpoint restores this mixer has seen; not part of its state,
        so it outlives :meth:`reset` and :meth:`load_state_dict`."""

    # -- the mixture ---------------------------------------------------------
    def _capped(self, proposed: np.ndarray) -> np.ndarray:
        remaining_budget = max(0.0, self.pool.budget_tokens - self.ledger.train_total)
        remaining_cap = self.capacity - self.ledger.train
        if remaining_budget <= 0:
            # The budget is spent: nothing more is sampled, so keep serving
            # what was last applied rather than an uncapped proposal.
            return self.weights
        try:
            capped, spill = cap_weights(proposed, remaining_cap, remaining_budget, self.per_example)
        except ValueError:
            # Capacity is exhausted only when the budget was checked too
            # loosely; keep training on what is left rather than stall.
            capped = example_weights(np.maximum(remaining_cap, 0) + 1e-12, self.per_example)
            spill = np.zeros_like(proposed)
        self.spill = spill
        return capped

    def mixture(self) -> dict:
        return {"version": self.version, "weights": self.weights.tolist()}

    def applied(self, version: int, token_offset: int, weights: list[float]) -> None:
        """Workers applied mixture ``version`` at ``token_offset`` train tokens."""
        entry = (int(token_offset), {t: float(w) for t, w in zip(self.pool.tasks, weights)})
        # A mixture differing from the last in float rounding alone is the same one.
        if not self.schedule or not np.allclose(list(self.schedule[-1][1].values()), list(entry[1].values()),
                                                rtol=0, atol=1e-12):
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
        # What the current proposal is served as now, and where the cap
        # binds: a policy differentiates at these weights, not its proposal.
        served = self._capped(self.proposed)
        capped = self.spill > 1e-9
        new = self.policy.update(Signals(self.ledger.train.copy(), interval_loss, dict(meta or {}),
                                         served.copy(), capped.copy()))
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
    def reset(self) -> dict:
        """Back to the state before any training: a worker group that starts
        with no checkpoint to restore (its first attempt, or a restart after
        a failure before any checkpoint was registered) trains from the first
        token again, so the ledger and the schedule start again too."""
        restores = self.restores
        Mixer.__init__(self, *self._init_args)
        self.restores = restores
        return self.mixture()

    def count_restore(self, restores_before: int) -> int:
        """Count a worker group's restore of a checkpoint that had seen
        ``restores_before`` restores; the run's restores so far.

        The checkpoint alone undercounts: two restarts after one checkpoint
        both read its count. The mixer outlives the worker groups of one
        driver, so it counts those; a new driver (``--resume``) or a
        restarted mixer starts from the checkpoint's count."""
        self.restores = max(self.restores, int(restores_before)) + 1
        return self.restores

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
            # A policy may add keys to summary.json (an optional ``summary()``).
            "policy_summary": self.policy.summary() if hasattr(self.policy, "summary") else {},
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

    def resync(self, train_tokens: list[int], meta_tokens: list[int]) -> dict:
        """Set the ledger to the cumulative counts the workers sent (after a
        restart lost reports made since the last checkpoint); re-cap."""
        self.ledger.train[:] = np.asarray(train_tokens, dtype=np.int64)
        self.ledger.meta[:] = np.asarray(meta_tokens, dtype=np.int64)
        capped = self._capped(self.proposed)
        if not np.allclose(capped, self.weights, rtol=0, atol=1e-9):
            self.weights = capped
            self.version += 1
        return self.mixture()

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


class MixerLost(RuntimeError):
    """The mixer actor is dead and will not be restarted (its
    ``runtime.mixer_max_restarts`` used up, killed for good, or its node
    lost): the run cannot go on, and stops with its last checkpoint."""


def death_cause(error: Exception) -> str:
    """Ray's reason for an actor's death, in one line (from ``ActorDiedError``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    because = [ln for ln in lines if "dead because" in ln or "max_restarts" in ln]
    return (because or lines or [type(error).__name__])[-1]


class ServedMixer(Mixer):
    """The mixer as served by the actor: every reply carries the process's
    incarnation id (new after each restart) and pid, so that rank 0 notices a
    restart and restores the actor's state (see :class:`MixerClient`)."""

    def __init__(self, policy_cfg: PolicyConfig, pool: PoolInfo, max_epochs: float):
        super().__init__(policy_cfg, pool, max_epochs)
        self.incarnation = uuid.uuid4().hex

    def mixture(self) -> dict:
        return {**super().mixture(), "incarnation": self.incarnation, "pid": os.getpid()}


def start_mixer_actor(name: str, policy_cfg: PolicyConfig, pool: PoolInfo, max_epochs: float,
                      max_restarts: int = 3):
    """The mixer as a named Ray actor (no CPU reserved: it is idle between
    reports). A dead actor process is restarted up to ``max_restarts`` times;
    calls in flight fail rather than being retried, so no report is applied
    twice, and :class:`MixerClient` re-syncs what they carried."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)(ServedMixer)
    return actor_cls.options(name=name, namespace=MIXER_NAMESPACE).remote(
        policy_cfg, pool, max_epochs
    )


class LocalMixerClient:
    """Rank 0's side of a :class:`Mixer` in the same process, with
    :class:`MixerClient`'s interface: for running the training loop without
    Ray (tests, tools). A reply is its own reference."""

    restarts = 0

    def __init__(self, mixer: Mixer):
        self.mixer = mixer
        self.pid = os.getpid()

    def report(self, train_tokens, loss_sum=None, loss_count=None, meta_tokens=None, meta=None) -> dict:
        return self.mixer.report(list(map(int, train_tokens)), loss_sum, loss_count,
                                 None if meta_tokens is None else list(map(int, meta_tokens)), meta)

    def get(self, reply: dict) -> dict:
        return reply

    def applied(self, version: int, token_offset: int, weights: list[float]) -> None:
        self.mixer.applied(version, token_offset, weights)

    def call(self, method: str, *args):
        return getattr(self.mixer, method)(*args)

    def snapshot(self) -> dict:
        return self.mixer.state_dict()

    def reset(self) -> dict:
        return self.mixer.reset()

    def restore(self, state: dict) -> dict:
        self.mixer.load_state_dict(state)
        return self.mixer.mixture()


class MixerClient:
    """Rank 0's side of the mixer actor.

    Keeps the cumulative per-task tokens it has sent and the mixer state of
    the last checkpoint. When a call fails because the actor died, or a reply
    comes from a new incarnation, it waits for the restarted actor, loads the
    checkpoint's state into it (policy, mixture history, ledger) and sets the
    ledger to the counts sent, so no token is lost or counted twice.
    """

    def __init__(self, actor, num_tasks: int, restart_timeout: float = 120.0, name: str = "mixer"):
        self.actor, self.name = actor, name
        self.sent_train = np.zeros(num_tasks, dtype=np.int64)
        self.sent_meta = np.zeros(num_tasks, dtype=np.int64)
        self.checkpoint_state: Optional[dict] = None
        self.incarnation: Optional[str] = None
        self.pid: Optional[int] = None
        self.restarts = 0
        self.restart_timeout = restart_timeout
        self.applied_since_checkpoint: list[tuple[int, int, list[float]]] = []

    # -- calls ----------------------------------------------------------------
    def report(self, train_tokens, loss_sum=None, loss_count=None, meta_tokens=None, meta=None):
        """Send a report; returns the reply's ref (resolve it with :meth:`get`)."""
        self.sent_train += np.asarray(train_tokens, dtype=np.int64)
        if meta_tokens is not None:
            self.sent_meta += np.asarray(meta_tokens, dtype=np.int64)
        return self.actor.report.remote(list(map(int, train_tokens)), loss_sum, loss_count,
                                        None if meta_tokens is None else list(map(int, meta_tokens)), meta)

    def applied(self, version: int, token_offset: int, weights: list[float]) -> None:
        # Kept until the next checkpoint, to replay into a restarted actor
        # so that the mixture schedule has no gap.
        self.applied_since_checkpoint.append((version, token_offset, weights))
        self.actor.applied.remote(version, token_offset, weights)

    def get(self, ref) -> dict:
        """Resolve a reply that carries the mixture; recover the actor if needed."""
        import ray
        from ray.exceptions import RayActorError

        try:
            reply = ray.get(ref)
        except RayActorError:
            return self.recover()
        if self.incarnation is None:
            self.incarnation, self.pid = reply["incarnation"], reply["pid"]
        elif reply["incarnation"] != self.incarnation:
            return self.recover()
        return reply

    def call(self, method: str, *args):
        """A call whose reply is not a mixture (state, summary), with recovery."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except RayActorError:
            self.recover()
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except RayActorError:
                return self.call(method, *args)  # died again: recover (or MixerLost) again

    # -- checkpoint and recovery ----------------------------------------------
    def snapshot(self) -> dict:
        """The actor's state, after every report sent so far was applied."""
        state = self.call("state_dict")
        self.checkpoint_state = state
        self.applied_since_checkpoint = []
        return state

    def reset(self) -> dict:
        """Reset the actor to its initial state (a run starting with no checkpoint)."""
        self.checkpoint_state = None
        self.applied_since_checkpoint = []
        self.sent_train[:] = 0
        self.sent_meta[:] = 0
        return self.get(self.actor.reset.remote())

    def restore(self, state: dict) -> dict:
        """Load a checkpoint's mixer state into the actor (run restored from it)."""
        self.checkpoint_state = state
        self.applied_since_checkpoint = []
        self.sent_train[:] = state["ledger"]["train"]
        self.sent_meta[:] = state["ledger"]["meta"]
        self.call("load_state_dict", state)
        return self.get(self.actor.mixture.remote())

    def recover(self) -> dict:
        """Wait for the restarted actor and bring it back to the run's state;
        :class:`MixerLost` when it is dead for good."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

        self.restarts += 1
        deadline = time.monotonic() + self.restart_timeout
        died = 0
        while True:
            try:
                reply = ray.get(self.actor.mixture.remote(), timeout=10)
                break
            except (RayActorError, GetTimeoutError) as e:
                # A call to an actor being restarted waits for it; one to an
                # actor that Ray will not restart fails at once with
                # ActorDiedError (ActorUnavailableError: only in flight while
                # it restarts). Seen twice, a second apart, to be sure.
                died = died + 1 if isinstance(e, ActorDiedError) else 0
                if died >= 2:
                    raise MixerLost(f"the mixer actor {self.name} is dead and will not be restarted: "
                                    f"{death_cause(e)}") from e
                if time.monotonic() > deadline:
                    raise MixerLost(
                        f"the mixer actor {self.name} did not come back within {self.restart_timeout:.0f}s "
                        f"(runtime.mixer_max_restarts exhausted?): {death_cause(e)}"
                    ) from e
                time.sleep(1.0 if died else 0.5)
        print(f"[raymix] mixer actor restarted (pid {self.pid} -> {reply['pid']}); restoring the last "
              "checkpoint's mixer state and re-syncing the ledger", flush=True)
        if self.checkpoint_state is not None:
            ray.get(self.actor.load_state_dict.remote(self.checkpoint_state))
        for entry in self.applied_since_checkpoint:
            self.actor.applied.remote(*entry)
        reply = ray.get(self.actor.resync.remote(self.sent_train.tolist(), self.sent_meta.tolist()))
        self.incarnation, self.pid = reply["incarnation"], reply["pid"]
        return reply
