"""The mixing-policy interface, its registry, and the repetition cap.

A policy is one small class: it proposes task weights and updates its state
from signals (tokens consumed, per-task losses, gradient statistics). No
Ray, no logging and no I/O inside, so every policy is unit-tested on CPU; the
mixer actor (``raymix.mixer``) owns the one live instance. Its registry entry
(:class:`PolicySpec`) names what else it brings: a worker-side signal
(``raymix.policies.signal``), a multi-run driver, whether it runs under FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from raymix.registry import POLICIES, PolicySpec, build_policy, policy_spec, register_policy, resolve  # noqa: F401


@dataclass(frozen=True)
class PoolInfo:
    """What a policy may know about the pool before training."""

    tasks: tuple[str, ...]
    train_tokens: np.ndarray
    """Tokens in each task's train split (n_i)."""
    train_examples: np.ndarray
    budget_tokens: int


@dataclass
class Signals:
    """What workers report between two policy updates."""

    consumed: np.ndarray
    """Train tokens consumed so far per task (the ledger)."""
    train_loss: Optional[np.ndarray] = None
    """Mean token NLL per task over the last interval (NaN where unseen)."""
    extra: dict = field(default_factory=dict)
    served: Optional[np.ndarray] = None
    """The mixture the workers sample from now: the current proposal after
    the repetition cap (the mixer fills it; None: the proposal itself)."""
    capped: Optional[np.ndarray] = None
    """Per task, whether the repetition cap binds on the served weight."""

    @property
    def total(self) -> int:
        return int(self.consumed.sum())


class MixingPolicy(Protocol):
    def initial_weights(self) -> np.ndarray:
        """The mixture before any training."""

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        """New weights after ``signals``, or None to keep the current ones."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    # Optional: ``summary() -> dict``, keys the mixer adds to the run's
    # ``summary.json`` (ODM's step counter, DoReMi's averaged weights).


def normalise(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    s = w.sum()
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"mixture weights must have a positive finite sum, got {w}")
    return w / s


def tokens_per_example(pool: PoolInfo) -> np.ndarray:
    """Each task's mean tokens per training example (1 for a task without
    examples): what turns a mixture's weights into token shares."""
    examples = np.asarray(pool.train_examples, dtype=np.float64)
    tokens = np.asarray(pool.train_tokens, dtype=np.float64)
    return np.where(examples > 0, tokens / np.maximum(examples, 1.0), 1.0)


def token_shares(weights: np.ndarray, per_example: np.ndarray) -> np.ndarray:
    """The share of the tokens each task gets when ``weights`` are the
    probabilities each example is drawn from it with (what a mixture's
    weights are: ``raymix.streams.MixtureSampler``): w_i t_i / sum_j w_j t_j."""
    return normalise(np.asarray(weights, dtype=np.float64) * per_example)


def example_weights(shares: np.ndarray, per_example: np.ndarray) -> np.ndarray:
    """The mixture (per-example probabilities) whose tasks get ``shares`` of
    the tokens: the inverse of :func:`token_shares`."""
    return normalise(np.asarray(shares, dtype=np.float64) / per_example)


def cap_weights(weights: np.ndarray, capacity: np.ndarray, budget: float, per_example: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The repetition cap on a mixture: its token shares capped
    (:func:`cap_mixture`), as the per-example weights the workers sample
    with, and the tokens each task spilled. A capped task's token share is
    fixed; the free tasks keep their weights' ratios."""
    shares, spill = cap_mixture(token_shares(weights, per_example), capacity, budget)
    if not (spill > 0).any():
        # Nothing binds: the weights as given (normalised), the same bits
        # whatever the remaining budget (a resumed run's schedule compares them).
        return normalise(weights), spill
    return example_weights(shares, per_example), spill


def cap_mixture(
    weights: np.ndarray, capacity: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """Apply per-task token capacities to token shares (water-filling).

    ``weights`` are shares of the tokens: they ask for ``weights * budget``
    tokens from each task (a mixture's per-example weights become shares
    through :func:`token_shares`; :func:`cap_weights` does both); a task may
    give at most ``capacity`` more. Tasks over capacity are clipped and their
    excess is spread over the uncapped tasks in proportion to their shares,
    repeatedly, until nothing is over. Returns the capped shares (summing to
    1) and the tokens each task spilled.

    Raises ValueError when the total capacity cannot cover the budget.
    """
    w = normalise(weights)
    capacity = np.clip(np.asarray(capacity, dtype=np.float64), 0.0, None)
    if budget <= 0:
        return w, np.zeros_like(w)
    if capacity.sum() < budget * (1 - 1e-9):
        raise ValueError(
            f"budget {budget:.0f} tokens exceeds the pool's capacity under the repetition "
            f"cap ({capacity.sum():.0f} tokens)"
        )
    want = w * budget
    alloc = np.zeros_like(w)
    free = np.ones(len(w), dtype=bool)
    remaining = float(budget)
    for _ in range(len(w) + 1):
        if remaining <= 0 or not free.any():
            break
        share = w * free
        if share.sum() <= 0:  # only zero-weight tasks left: spread by capacity
            share = capacity * free
        share = share / share.sum() * remaining
        over = free & (share >= capacity - alloc)
        if not over.any():
            alloc[free] += share[free]
            remaining = 0.0
            break
        remaining -= float((capacity - alloc)[over].sum())
        alloc[over] = capacity[over]
        free &= ~over
    spill = np.clip(want - alloc, 0.0, None)
    return alloc / alloc.sum(), spill
