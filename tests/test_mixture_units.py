"""Mixture weights are per-example sampling probabilities
(raymix.streams.MixtureSampler.draw: rng.choice(..., p=weights) per example);
the repetition cap, UniMax and IDEAL's volumes are in tokens. These check
that what is trained, token for token, is what the cap, UniMax and the
volumes plan when tasks' examples differ in length (they treated weights as
token shares: a task of long examples got several times its plan).

Driven through the real Mixer and the real MixtureSampler.draw, with two
tasks whose examples are 100 and 10 tokens long.
"""

from __future__ import annotations

import numpy as np

from raymix.config import IdealConfig, PolicyConfig
from raymix.mixer import Mixer
from raymix.policies import PoolInfo
from raymix.policies.ideal import initial_volumes, round_weights
from raymix.streams import MixtureSampler

LEN = (100, 10)  # tokens per example of task a, task b
EXAMPLES = (10, 1000)  # examples per task: a = 1,000 tokens, b = 10,000 tokens


class _FixedLengthStream:
    def __init__(self, length: int):
        self.length = length

    def next(self):
        return np.ones(self.length, dtype=np.int64), 1

    def skip(self):
        pass

    def state_dict(self):
        return {}


def _sampler(seed: int = 0) -> MixtureSampler:
    s = object.__new__(MixtureSampler)  # the real draw(), with in-memory streams
    s.streams = [_FixedLengthStream(n) for n in LEN]
    s.rng = np.random.default_rng([seed, 0, 7])
    s.rank, s.world = 0, 1
    return s


def _pool(budget: int) -> PoolInfo:
    tokens = np.array([e * n for e, n in zip(EXAMPLES, LEN)], dtype=np.int64)
    return PoolInfo(("a", "b"), tokens, np.array(EXAMPLES, dtype=np.int64), budget)


def _train(mixer: Mixer, budget: int, micro_batch: int = 8) -> tuple[np.ndarray, int]:
    """The loop's sampling, a report to the mixer after every step (sync_every=1)."""
    sampler, step_max = _sampler(), 0
    while mixer.ledger.train_total < budget:
        (tasks, examples), = sampler.draw(np.asarray(mixer.weights), 1, micro_batch)
        delta = np.zeros(2, dtype=np.int64)
        for t, (ids, _) in zip(tasks, examples):
            delta[t] += len(ids)
        step_max = max(step_max, int(delta.sum()))
        mixer.report(delta.tolist())
    return mixer.ledger.train.copy(), step_max


def test_unimax_trains_no_task_beyond_unimax_epochs() -> None:
    # README: "unimax: uniform, with each task capped at policy.unimax_epochs epochs".
    budget = 4000
    pool = _pool(budget)
    mixer = Mixer(PolicyConfig(name="unimax", unimax_epochs=1.0), pool, max_epochs=8.0)
    trained, step_max = _train(mixer, budget)
    cap_a = 1.0 * pool.train_tokens[0]
    # allow one global batch of slack
    assert trained[0] <= cap_a + step_max, (
        f"task a trained {trained[0]} tokens = {trained[0] / pool.train_tokens[0]:.2f} epochs; "
        f"unimax_epochs=1 caps it at {cap_a:.0f} (weights {mixer.weights})")


def test_mixer_cap_plan_matches_what_the_served_weights_train() -> None:
    # Uniform asks for equal examples: task a (100 tokens each) would take
    # 91% of the tokens, past its capacity of 1,000 (one epoch): the cap
    # serves the weights that give it 1,000 of the 2,000 tokens, and the
    # sampler's draws realise that share.
    budget = 2000
    pool = _pool(budget)
    mixer = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=1.0)
    assert mixer.spill[0] > 0  # the cap binds on task a
    w = np.asarray(mixer.weights)
    planned_share = np.array([0.5, 0.5])  # 1,000 tokens each
    sampler = _sampler(1)
    drawn = np.zeros(2)
    for _ in range(2000):
        (tasks, examples), = sampler.draw(w, 1, 8)
        for t, (ids, _) in zip(tasks, examples):
            drawn[t] += len(ids)
    realised_share = drawn / drawn.sum()
    np.testing.assert_allclose(realised_share, planned_share, atol=0.05,
                               err_msg="served weights are example probabilities, the cap treats them as token shares")


def test_ideal_round_trains_its_token_volumes() -> None:
    # raymix.policies.ideal: "Round 1's token volumes n_j, summing exactly to
    # the budget"; the round trains the static mixture weights = volumes / budget.
    budget = 4000
    pool = _pool(budget)
    volumes = initial_volumes(IdealConfig(init="uniform"), pool)  # [2000, 2000] tokens
    weights = round_weights(volumes, pool)
    mixer = Mixer(PolicyConfig(name="static", weights=weights), pool, max_epochs=8.0)
    trained, _ = _train(mixer, budget)
    np.testing.assert_allclose(trained / trained.sum(), volumes / volumes.sum(), atol=0.1,
                               err_msg=f"volumes {volumes.tolist()} tokens, trained {trained.tolist()} tokens")
