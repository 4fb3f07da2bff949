"""The workers' side of the mixer (raymix.loop.exchange), without Ray."""

from __future__ import annotations

import numpy as np

from raymix.config import PolicyConfig
from raymix.loop.exchange import MixerExchange
from raymix.mixer import LocalMixerClient, Mixer
from raymix.policies import PoolInfo


def _exchange():
    info = PoolInfo(("a", "b"), np.array([1000, 1000]), np.array([10, 10]), 1000)
    cfg = PolicyConfig(name="schedule", schedule=[[0, {"a": 1.0, "b": 1.0}], [10, {"a": 1.0}]])
    ex = MixerExchange(LocalMixerClient(Mixer(cfg, info, 4.0)), 2, 0, False)
    ex.start(0)
    return ex


def test_a_flush_keeps_the_reply_for_the_next_sync() -> None:
    """A checkpoint's flush resolves the pending reply and reports once more;
    the mixture the policy proposed must still apply at the next sync (it was
    dropped before, so a run checkpointing at every sync never applied a
    mixer-side policy's update)."""
    ex = _exchange()
    np.testing.assert_allclose(ex.weights, [0.5, 0.5])
    ex.add(np.array([[20.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    ex.sync(None, 20)  # reported: the schedule moves on; the reply applies one interval later
    np.testing.assert_allclose(ex.weights, [0.5, 0.5])
    ex.flush()  # the checkpoint's snapshot
    ex.sync(None, 30)
    np.testing.assert_allclose(ex.weights, [1.0, 0.0])


def test_without_a_flush_the_reply_applies_one_interval_later() -> None:
    ex = _exchange()
    ex.add(np.array([[20.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    ex.sync(None, 20)
    ex.sync(None, 30)
    np.testing.assert_allclose(ex.weights, [1.0, 0.0])


class _LostClient(LocalMixerClient):
    """The mixer dies for good once the run is under way."""

    dead = False

    def get(self, reply):
        from raymix.mixer import MixerLost

        if self.dead:
            raise MixerLost("the mixer actor m is dead")
        return reply


def test_a_lost_mixer_keeps_the_mixture_and_says_so() -> None:
    info = PoolInfo(("a", "b"), np.array([1000, 1000]), np.array([10, 10]), 1000)
    cfg = PolicyConfig(name="schedule", schedule=[[0, {"a": 1.0, "b": 1.0}], [10, {"a": 1.0}]])
    client = _LostClient(Mixer(cfg, info, 4.0))
    ex = MixerExchange(client, 2, 0, False)
    ex.start(0)
    ex.add(np.array([[20.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    ex.sync(None, 20)
    assert ex.lost is None
    client.dead = True
    ex.sync(None, 30)  # the reply to the last report would have moved the mixture on
    assert ex.lost == "the mixer actor m is dead"
    np.testing.assert_allclose(ex.weights, [0.5, 0.5])
    # A restarted worker group that finds the actor gone starts lost, without calling it.
    again = MixerExchange(None, 2, 0, False, lost="gone")
    again.start(0)
    assert again.lost == "gone"
