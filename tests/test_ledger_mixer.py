"""Tests for the token ledger and the (Ray-free) Mixer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raymix.config import PolicyConfig
from raymix.ledger import TokenLedger
from raymix.mixer import Mixer
from raymix.policies import PoolInfo

# Tolerances: the ledger counts tokens in integers (compared exactly); the
# mixer's weights are float64 numpy on three tasks, a few operations each
# (~1e-15 relative on any CPU), hence rtol 1e-12 / numpy's default 1e-7, and
# atol 1e-9 where a token amount (up to 1e3) should be exactly 0.

# --------------------------------------------------------------------------- ledger


def test_ledger_add_and_totals() -> None:
    led = TokenLedger(["a", "b", "c"])
    assert led.train_total == 0 and led.meta_total == 0
    led.add_train([1, 2, 3])
    led.add_train(np.array([10, 0, 5]))
    led.add_meta([0, 7, 0])
    assert led.train.tolist() == [11, 2, 8]
    assert led.meta.tolist() == [0, 7, 0]
    assert led.train_total == 21
    assert led.meta_total == 7
    assert isinstance(led.train_total, int)
    assert led.index == {"a": 0, "b": 1, "c": 2}


def test_ledger_to_dict() -> None:
    led = TokenLedger(["a", "b"])
    led.add_train([3, 4])
    led.add_meta([1, 0])
    d = led.to_dict()
    assert d == {"a": {"train_tokens": 3, "meta_tokens": 1}, "b": {"train_tokens": 4, "meta_tokens": 0}}
    json.dumps(d)  # plain ints, JSON-safe


def test_ledger_state_round_trip() -> None:
    led = TokenLedger(["x", "y", "z"])
    led.add_train([5, 6, 7])
    led.add_meta([1, 2, 3])
    state = json.loads(json.dumps(led.state_dict()))
    again = TokenLedger.from_state_dict(state)
    assert again.tasks == ("x", "y", "z")
    assert again.train.tolist() == [5, 6, 7]
    assert again.meta.tolist() == [1, 2, 3]
    assert again.to_dict() == led.to_dict()
    again.add_train([1, 1, 1])  # independent arrays
    assert led.train.tolist() == [5, 6, 7]


@pytest.mark.parametrize("delta", [[1, 2], [1, 2, 3, 4], [[1, 2, 3]], [1, -1, 0]])
def test_ledger_rejects_bad_train_delta(delta) -> None:
    led = TokenLedger(["a", "b", "c"])
    with pytest.raises(ValueError, match="train token delta"):
        led.add_train(delta)
    assert led.train.tolist() == [0, 0, 0]


@pytest.mark.parametrize("delta", [[1, 2], [0, 0, -3]])
def test_ledger_rejects_bad_meta_delta(delta) -> None:
    led = TokenLedger(["a", "b", "c"])
    with pytest.raises(ValueError, match="meta token delta"):
        led.add_meta(delta)
    assert led.meta.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- mixer


def make_pool(sizes=(100, 1000, 1000), budget: int = 450) -> PoolInfo:
    sizes = np.asarray(sizes, dtype=np.int64)
    tasks = tuple("abcdefgh"[: len(sizes)])
    return PoolInfo(tasks, sizes, sizes // 10, budget)


def test_mixer_report_adds_to_ledger_exactly() -> None:
    pool = make_pool((10**6, 10**6, 10**6), budget=10**9)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=1000.0)
    rng = np.random.default_rng(0)
    total = np.zeros(3, dtype=np.int64)
    for _ in range(200):
        d = rng.integers(0, 5000, size=3)
        total += d
        out = m.report(d.tolist())
        assert set(out) == {"version", "weights"}
    assert m.ledger.train.tolist() == total.tolist()
    s = m.summary()
    assert s["train_tokens"] == int(total.sum())
    assert s["ledger"] == {t: {"train_tokens": int(total[i]), "meta_tokens": 0} for i, t in enumerate("abc")}
    assert s["tasks"] == ["a", "b", "c"]


def test_mixer_report_meta_and_losses() -> None:
    m = Mixer(PolicyConfig(name="uniform"), make_pool(budget=450), max_epochs=8.0)
    m.report([10, 0, 5], loss_sum=[2.0, 0.0, 3.0], loss_count=[4.0, 0.0, 1.0], meta_tokens=[1, 2, 3])
    m.report([0, 0, 0], loss_sum=[1.0, 1.0, 0.0], loss_count=[1.0, 2.0, 0.0])
    assert m.ledger.meta.tolist() == [1, 2, 3]
    assert m.summary()["meta_tokens"] == 6
    np.testing.assert_allclose(m.loss_sum, [3.0, 1.0, 3.0])
    np.testing.assert_allclose(m.loss_count, [5.0, 2.0, 1.0])


def test_mixer_report_rejects_bad_delta() -> None:
    m = Mixer(PolicyConfig(name="uniform"), make_pool(), max_epochs=8.0)
    with pytest.raises(ValueError):
        m.report([1, 2])
    with pytest.raises(ValueError):
        m.report([1, -2, 0])
    assert m.ledger.train_total == 0


def test_mixer_applied_records_schedule_without_duplicates() -> None:
    m = Mixer(PolicyConfig(name="uniform"), make_pool(), max_epochs=8.0)
    m.applied(0, 0, [0.5, 0.25, 0.25])
    m.applied(1, 100, [0.5, 0.25, 0.25])  # same weights: not recorded
    m.applied(2, 200, [0.2, 0.4, 0.4])
    m.applied(3, 300, [0.2, 0.4, 0.4])
    m.applied(4, 400, [0.5, 0.25, 0.25])  # differs from the last entry: recorded
    assert m.summary()["mixture_schedule"] == [
        [0, {"a": 0.5, "b": 0.25, "c": 0.25}],
        [200, {"a": 0.2, "b": 0.4, "c": 0.4}],
        [400, {"a": 0.5, "b": 0.25, "c": 0.25}],
    ]


def test_mixer_schedule_feeds_back_into_schedule_policy() -> None:
    m = Mixer(PolicyConfig(name="uniform"), make_pool(), max_epochs=8.0)
    m.applied(0, 0, [1.0, 0.0, 0.0])
    m.applied(1, 300, [0.0, 0.5, 0.5])
    sched = json.loads(json.dumps(m.summary()["mixture_schedule"]))
    replay = Mixer(PolicyConfig(name="schedule", schedule=sched), make_pool(), max_epochs=8.0)
    np.testing.assert_allclose(replay.weights, [1.0, 0.0, 0.0])
    replay.report([300, 0, 0])
    np.testing.assert_allclose(replay.weights, [0.0, 0.5, 0.5])


def test_mixer_state_round_trip_reproduces_summary() -> None:
    cfg = PolicyConfig(name="schedule", schedule=[[0, {"a": 1, "b": 1, "c": 1}], [200, {"b": 1, "c": 3}]])
    pool = make_pool((1000, 1000, 1000), budget=900)
    m = Mixer(cfg, pool, max_epochs=8.0)
    m.applied(0, 0, m.weights.tolist())
    m.report([100, 50, 60], loss_sum=[1.0, 2.0, 3.0], loss_count=[1.0, 1.0, 1.0], meta_tokens=[0, 4, 0])
    out = m.report([0, 10, 30])
    m.applied(out["version"], 250, out["weights"])
    state = json.loads(json.dumps(m.state_dict()))

    fresh = Mixer(cfg, pool, max_epochs=8.0)
    fresh.load_state_dict(state)
    a, b = m.summary(), fresh.summary()
    a.pop("mixer_update_seconds")
    b.pop("mixer_update_seconds")
    assert a == b
    assert fresh.mixture() == m.mixture()
    assert fresh.state_dict() == m.state_dict()
    # both continue identically
    assert fresh.report([5, 5, 5]) == m.report([5, 5, 5])
    # Restored state, same reports, one process: bit-identical.
    np.testing.assert_array_equal(fresh.loss_sum, m.loss_sum)


def test_mixer_reset_returns_to_the_state_before_training() -> None:
    """A worker group restarted with no checkpoint to restore trains from the
    first token again: the mixer it resets must equal a fresh one, so the
    lost attempt's tokens are not counted twice."""
    cfg = PolicyConfig(name="schedule", schedule=[[0, {"a": 1, "b": 1, "c": 1}], [200, {"b": 1, "c": 3}]])
    pool = make_pool((1000, 1000, 1000), budget=900)
    m = Mixer(cfg, pool, max_epochs=8.0)
    m.applied(0, 0, m.weights.tolist())
    out = m.report([100, 80, 60], loss_sum=[1.0, 2.0, 3.0], loss_count=[1.0, 1.0, 1.0], meta_tokens=[0, 4, 0])
    m.applied(out["version"], 240, out["weights"])
    assert m.ledger.train_total == 240 and len(m.schedule) == 2
    assert m.reset() == Mixer(cfg, pool, max_epochs=8.0).mixture()
    assert m.state_dict() == Mixer(cfg, pool, max_epochs=8.0).state_dict()
    assert m.ledger.train_total == 0 and m.ledger.meta_total == 0 and m.schedule == []


def test_mixer_state_round_trip_keeps_spill() -> None:
    pool = make_pool((100, 1000, 1000), budget=450)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=2.0)
    m.report([150, 0, 0])
    assert m.summary()["spill_tokens"]["a"] == pytest.approx(50.0)
    fresh = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=2.0)
    fresh.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert fresh.summary()["spill_tokens"] == m.summary()["spill_tokens"]


def test_mixer_cuts_task_near_its_cap_and_spills() -> None:
    # sizes 100, 1000, 1000; max_epochs 2 -> capacity 200, 2000, 2000; budget 450.
    pool = make_pool((100, 1000, 1000), budget=450)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=2.0)
    assert m.mixture()["version"] == 0
    np.testing.assert_allclose(m.weights, [1 / 3] * 3)  # 150 each, no cap binds
    np.testing.assert_array_equal(m.spill, [0, 0, 0])

    # a has used 150 of 200: 300 tokens left; uniform wants 100 from a but only 50
    # remain, so a gets 50 and b, c get 125 each.
    out = m.report([150, 0, 0])
    assert out["version"] == 1
    np.testing.assert_allclose(out["weights"], np.array([50, 125, 125]) / 300, rtol=1e-12)
    np.testing.assert_allclose(m.spill, [50, 0, 0], atol=1e-9)
    assert m.summary()["spill_tokens"]["a"] == pytest.approx(50.0)

    # nothing consumed: same mixture, same version
    out = m.report([0, 0, 0])
    assert out["version"] == 1

    # a hits its cap: weight 0, everything to b and c
    out = m.report([50, 0, 0])
    assert out["version"] == 2
    np.testing.assert_allclose(out["weights"], [0.0, 0.5, 0.5], atol=1e-12)
    # served weights never exceed what remains of a task's capacity
    remaining = m.capacity - m.ledger.train
    budget_left = pool.budget_tokens - m.ledger.train_total
    assert (np.asarray(out["weights"]) * budget_left <= remaining + 1e-9).all()


def test_mixer_version_only_changes_with_served_mixture() -> None:
    pool = make_pool((1000, 1000, 1000), budget=600)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=8.0)
    for _ in range(5):
        out = m.report([20, 20, 20])
        assert out["version"] == 0
        np.testing.assert_allclose(out["weights"], [1 / 3] * 3)


def test_mixer_schedule_policy_bumps_version() -> None:
    cfg = PolicyConfig(name="schedule", schedule=[[0, {"a": 1}], [100, {"b": 1}]])
    m = Mixer(cfg, make_pool((1000, 1000, 1000), budget=600), max_epochs=8.0)
    assert m.report([50, 0, 0])["version"] == 0
    out = m.report([50, 0, 0])
    assert out["version"] == 1
    np.testing.assert_allclose(out["weights"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(m.proposed, [0.0, 1.0, 0.0])


def test_mixer_proportional_served_when_no_cap_binds() -> None:
    sizes = np.array([100, 1000, 10000])
    pool = make_pool(sizes, budget=1000)
    m = Mixer(PolicyConfig(name="proportional"), pool, max_epochs=8.0)
    np.testing.assert_allclose(m.weights, sizes / sizes.sum(), rtol=1e-12)
    out = m.report([9, 90, 900])
    assert out["version"] == 0
    np.testing.assert_allclose(out["weights"], sizes / sizes.sum(), rtol=1e-9)
    np.testing.assert_array_equal(m.spill, [0, 0, 0])
    assert m.summary()["final_weights"] == pytest.approx(dict(zip("abc", sizes / sizes.sum())))


def test_mixer_initial_cap_applies_to_proposal() -> None:
    # uniform over (100, 1000, 10000) with max_epochs 1 and budget 3000 -> same as unimax
    pool = make_pool((100, 1000, 10000), budget=3000)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=1.0)
    np.testing.assert_allclose(m.proposed, [1 / 3] * 3)
    np.testing.assert_allclose(m.weights, np.array([100, 1000, 1900]) / 3000, rtol=1e-12)
    np.testing.assert_allclose(m.spill, [900, 0, 0], atol=1e-9)


def test_mixer_falls_back_when_capacity_exhausted() -> None:
    # budget larger than capacity: the mixer does not stall, it serves by what is left
    pool = make_pool((100, 100, 100), budget=1000)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=1.0)
    w = m.weights
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, [1 / 3] * 3, atol=1e-9)
    m.report([100, 50, 0])
    np.testing.assert_allclose(m.weights, [0.0, 50 / 150, 100 / 150], atol=1e-9)


def test_mixer_final_weights_respect_cap_after_budget_spent() -> None:
    pool = make_pool((100, 1000, 1000), budget=450)
    m = Mixer(PolicyConfig(name="uniform"), pool, max_epochs=2.0)
    m.report([150, 0, 0])
    m.report([50, 0, 0])
    served = m.mixture()
    np.testing.assert_allclose(served["weights"], [0.0, 0.5, 0.5])
    out = m.report([0, 125, 125])  # the budget (450) is now spent
    assert out == served
    assert m.summary()["final_weights"]["a"] == 0.0
