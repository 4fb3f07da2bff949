"""Tests for the mixing policies and the repetition cap (raymix.policies)."""

from __future__ import annotations

import numpy as np
import pytest

from raymix.config import PolicyConfig
from raymix.errors import RaymixError
from raymix.policies import POLICIES, PoolInfo, Signals, build_policy, cap_mixture, normalise

SIZES = np.array([100, 1000, 10000], dtype=np.int64)

# Tolerances: policies and the cap are float64 numpy on at most a few dozen
# values, a few operations each (no BLAS, no threads), so results carry
# ~10 eps64 ~ 2e-15 relative error on any CPU: rtol 1e-12 (or numpy's
# default 1e-7) holds with a wide margin; token counts (spill, allocations up
# to 1e4) get atol 1e-9 for the values that should be 0. Looser ones say why.


def pool(budget: int = 3000, sizes: np.ndarray = SIZES) -> PoolInfo:
    tasks = tuple("abcdefghijklmnopqrstuvwxyz"[: len(sizes)])
    return PoolInfo(tasks, np.asarray(sizes), np.asarray(sizes) // 10, budget)


def cfg_for(name: str, **kw) -> PolicyConfig:
    if name == "static":
        kw.setdefault("weights", {"a": 1.0, "b": 2.0, "c": 1.0})
    if name == "schedule":
        kw.setdefault("schedule", [[0, {"a": 1.0}], [500, {"b": 1.0, "c": 1.0}]])
    return PolicyConfig(name=name, **kw)


# --------------------------------------------------------------------------- registry


def test_registry_has_the_documented_policies() -> None:
    assert {"uniform", "proportional", "temperature", "unimax", "static", "schedule"} <= set(POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_builds_and_sums_to_one(name: str) -> None:
    p = build_policy(cfg_for(name), pool())
    w = np.asarray(p.initial_weights())
    assert w.shape == (3,)
    assert (w >= 0).all()
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    # update returns None or another valid mixture, and state round-trips
    new = p.update(Signals(np.array([10, 10, 10])))
    if new is not None:
        assert np.asarray(new).sum() == pytest.approx(1.0)
    state = p.state_dict()
    q = build_policy(cfg_for(name), pool())
    q.load_state_dict(state)
    assert q.state_dict() == state


def test_static_policies_never_update() -> None:
    for name in ("uniform", "proportional", "temperature", "unimax", "static"):
        p = build_policy(cfg_for(name), pool())
        assert p.update(Signals(np.array([1000, 1000, 1000]), np.array([1.0, 2.0, 3.0]))) is None


# --------------------------------------------------------------------------- static mixtures


def test_uniform() -> None:
    w = build_policy(PolicyConfig(name="uniform"), pool()).initial_weights()
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3])


def test_proportional() -> None:
    w = build_policy(PolicyConfig(name="proportional"), pool()).initial_weights()
    np.testing.assert_allclose(w, np.array([100, 1000, 10000]) / 11100)


def test_temperature_one_is_proportional() -> None:
    t1 = build_policy(PolicyConfig(name="temperature", temperature=1.0), pool()).initial_weights()
    prop = build_policy(PolicyConfig(name="proportional"), pool()).initial_weights()
    np.testing.assert_allclose(t1, prop, rtol=1e-12)


def test_temperature_two_is_sqrt() -> None:
    w = build_policy(PolicyConfig(name="temperature", temperature=2.0), pool()).initial_weights()
    s = np.sqrt([100.0, 1000.0, 10000.0])
    np.testing.assert_allclose(w, s / s.sum(), rtol=1e-12)
    np.testing.assert_allclose(w, [10 / 141.6227766, 31.6227766 / 141.6227766, 100 / 141.6227766], rtol=1e-8)


def test_large_temperature_approaches_uniform() -> None:
    w = build_policy(PolicyConfig(name="temperature", temperature=1e6), pool()).initial_weights()
    # Not rounding: n^(1/t) is within log(n)/t ~ 1e-5 of 1 at t=1e6 (n <= 1e4).
    np.testing.assert_allclose(w, [1 / 3] * 3, atol=1e-5)
    # and the distance to uniform shrinks as t grows
    dists = [
        np.abs(
            build_policy(PolicyConfig(name="temperature", temperature=t), pool()).initial_weights() - 1 / 3
        ).max()
        for t in (1, 2, 4, 16, 256)
    ]
    assert dists == sorted(dists, reverse=True)
    assert dists[0] > 0.5


def test_unimax_caps_small_tasks_hand_computed() -> None:
    # budget 3000 uniformly = 1000 each; a (cap 100) is clipped, its 900 spread
    # over b and c (1450 each); b (cap 1000) is clipped, c takes the rest: 1900.
    w = build_policy(PolicyConfig(name="unimax", unimax_epochs=1.0), pool(3000)).initial_weights()
    np.testing.assert_allclose(w, np.array([100, 1000, 1900]) / 3000, rtol=1e-12)


def test_unimax_epochs_scale_the_cap() -> None:
    # caps 200, 2000, 20000; budget 3000: a clipped at 200, 1400 each for b and c.
    w = build_policy(PolicyConfig(name="unimax", unimax_epochs=2.0), pool(3000)).initial_weights()
    np.testing.assert_allclose(w, np.array([200, 1400, 1400]) / 3000, rtol=1e-12)


def test_unimax_is_uniform_when_nothing_binds() -> None:
    w = build_policy(PolicyConfig(name="unimax", unimax_epochs=1.0), pool(300)).initial_weights()
    np.testing.assert_allclose(w, [1 / 3] * 3)


def test_unimax_raises_when_cap_cannot_cover_budget() -> None:
    with pytest.raises(RaymixError) as ei:
        build_policy(PolicyConfig(name="unimax", unimax_epochs=1.0), pool(20000))
    msg = str(ei.value)
    assert "policy.unimax_epochs" in msg
    assert "11100" in msg and "20000" in msg
    # a higher epoch cap covers it
    w = build_policy(PolicyConfig(name="unimax", unimax_epochs=2.0), pool(20000)).initial_weights()
    np.testing.assert_allclose(w, np.array([200, 2000, 17800]) / 20000, rtol=1e-12)


def test_static_requires_weights() -> None:
    with pytest.raises(RaymixError, match="policy.weights is required"):
        build_policy(PolicyConfig(name="static"), pool())
    with pytest.raises(RaymixError, match="policy.weights is required"):
        build_policy(PolicyConfig(name="static", weights={}), pool())


def test_static_normalises_and_fills_missing_with_zero() -> None:
    w = build_policy(PolicyConfig(name="static", weights={"a": 1.0, "c": 3.0}), pool()).initial_weights()
    np.testing.assert_allclose(w, [0.25, 0.0, 0.75])


def test_static_rejects_unknown_task() -> None:
    with pytest.raises(RaymixError) as ei:
        build_policy(PolicyConfig(name="static", weights={"a": 1.0, "zz": 1.0}), pool())
    assert "zz" in str(ei.value)
    assert "policy.weights" in str(ei.value)


@pytest.mark.parametrize("weights", [{"a": -1.0, "b": 2.0}, {"a": 0.0, "b": 0.0}])
def test_static_rejects_bad_weights(weights: dict) -> None:
    with pytest.raises(RaymixError, match=">= 0 with a positive sum"):
        build_policy(PolicyConfig(name="static", weights=weights), pool())


def test_static_state_round_trip() -> None:
    p = build_policy(PolicyConfig(name="static", weights={"a": 1.0, "b": 3.0}), pool())
    q = build_policy(PolicyConfig(name="uniform"), pool())
    q.load_state_dict(p.state_dict())
    np.testing.assert_allclose(q.initial_weights(), [0.25, 0.75, 0.0])


# --------------------------------------------------------------------------- schedule


SCHEDULE = [[0, {"a": 1.0}], [1000, {"b": 1.0, "c": 1.0}], [5000, {"c": 3.0, "a": 1.0}]]


def test_schedule_replays_stages_at_token_totals() -> None:
    p = build_policy(PolicyConfig(name="schedule", schedule=SCHEDULE), pool())
    np.testing.assert_allclose(p.initial_weights(), [1.0, 0.0, 0.0])
    assert p.update(Signals(np.array([500, 400, 99]))) is None  # 999 < 1000
    w = p.update(Signals(np.array([500, 400, 100])))  # exactly 1000
    np.testing.assert_allclose(w, [0.0, 0.5, 0.5])
    assert p.update(Signals(np.array([500, 2000, 2000]))) is None  # 4500: same stage
    w = p.update(Signals(np.array([500, 2000, 2500])))  # 5000
    np.testing.assert_allclose(w, [0.25, 0.0, 0.75])
    assert p.update(Signals(np.array([10**6, 0, 0]))) is None  # past the last stage


def test_schedule_skips_stages_when_jumping() -> None:
    p = build_policy(PolicyConfig(name="schedule", schedule=SCHEDULE), pool())
    w = p.update(Signals(np.array([6000, 0, 0])))
    np.testing.assert_allclose(w, [0.25, 0.0, 0.75])
    assert p.state_dict() == {"stage": 2}


def test_schedule_state_round_trip() -> None:
    p = build_policy(PolicyConfig(name="schedule", schedule=SCHEDULE), pool())
    p.update(Signals(np.array([1200, 0, 0])))
    state = p.state_dict()
    assert state == {"stage": 1}
    q = build_policy(PolicyConfig(name="schedule", schedule=SCHEDULE), pool())
    q.load_state_dict(state)
    assert q.state_dict() == state
    # the restored policy does not re-emit stage 1 and moves on at 5000
    assert q.update(Signals(np.array([1200, 0, 0]))) is None
    np.testing.assert_allclose(q.update(Signals(np.array([5000, 0, 0]))), [0.25, 0.0, 0.75])


@pytest.mark.parametrize(
    "schedule, match",
    [
        (None, "policy.schedule is required"),
        ([], "policy.schedule is required"),
        ([[100, {"a": 1.0}]], "offsets must start at 0"),
        ([[0, {"a": 1.0}], [500, {"b": 1.0}], [200, {"c": 1.0}]], "offsets must start at 0 and increase"),
        ([[0, {"zz": 1.0}]], r"policy.schedule\[0\]: unknown task"),
        ([[0, {"a": 1.0}], [10, "b"]], r"policy.schedule\[1\]: expected"),
        ([[0, {"a": 1.0}, 3]], r"policy.schedule\[0\]: expected"),
    ],
)
def test_schedule_validation(schedule, match: str) -> None:
    with pytest.raises(RaymixError, match=match):
        build_policy(PolicyConfig(name="schedule", schedule=schedule), pool())


# --------------------------------------------------------------------------- normalise


def test_normalise() -> None:
    np.testing.assert_allclose(normalise([1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(normalise([-1, 1]), [0.0, 1.0])  # negatives clipped
    for bad in ([0, 0], [np.nan, 1], [np.inf, 1]):
        with pytest.raises(ValueError):
            normalise(bad)


# --------------------------------------------------------------------------- cap_mixture


def test_cap_mixture_noop_when_nothing_capped() -> None:
    w = np.array([0.2, 0.3, 0.5])
    capped, spill = cap_mixture(w, np.array([1000.0, 1000.0, 1000.0]), 100.0)
    np.testing.assert_allclose(capped, w, rtol=1e-12)
    np.testing.assert_array_equal(spill, [0.0, 0.0, 0.0])


def test_cap_mixture_water_filling_hand_computed() -> None:
    # budget 1000, wants [400, 300, 200, 100]; caps [100, 1000, 250, 1000].
    # round 1: a over (400 > 100) -> a=100, 900 left over b,c,d by 3:2:1 -> 450, 300, 150;
    # round 2: c over (300 > 250) -> c=250, 650 left over b,d by 3:1 -> 487.5, 162.5.
    w = np.array([0.4, 0.3, 0.2, 0.1])
    cap = np.array([100.0, 1000.0, 250.0, 1000.0])
    capped, spill = cap_mixture(w, cap, 1000.0)
    np.testing.assert_allclose(capped, np.array([100, 487.5, 250, 162.5]) / 1000, rtol=1e-12)
    np.testing.assert_allclose(spill, [300.0, 0.0, 0.0, 0.0], atol=1e-9)


def test_cap_mixture_spill_equals_want_minus_alloc() -> None:
    w = np.array([0.5, 0.25, 0.25])
    cap = np.array([100.0, 50.0, 10_000.0])
    budget = 1000.0
    capped, spill = cap_mixture(w, cap, budget)
    alloc = capped * budget
    np.testing.assert_allclose(alloc, [100, 50, 850], rtol=1e-12)
    np.testing.assert_allclose(spill, np.clip(w * budget - alloc, 0, None), atol=1e-9)
    np.testing.assert_allclose(spill, [400, 200, 0], atol=1e-9)
    # what was spilled is what the uncapped task received on top of its share
    assert spill.sum() == pytest.approx(alloc[2] - w[2] * budget)


def test_cap_mixture_exact_capacity() -> None:
    cap = np.array([100.0, 200.0, 700.0])
    capped, _ = cap_mixture(np.array([1.0, 1.0, 1.0]), cap, 1000.0)
    np.testing.assert_allclose(capped, cap / 1000, rtol=1e-12)


def test_cap_mixture_zero_weight_tasks_take_remainder_by_capacity() -> None:
    capped, spill = cap_mixture(np.array([1.0, 0.0, 0.0]), np.array([10.0, 100.0, 300.0]), 50.0)
    # a gets 10; the other 40 go to b and c in proportion to capacity (1:3)
    np.testing.assert_allclose(capped * 50, [10, 10, 30], rtol=1e-12)
    np.testing.assert_allclose(spill, [40, 0, 0])


def test_cap_mixture_raises_when_capacity_below_budget() -> None:
    with pytest.raises(ValueError, match="exceeds the pool's capacity"):
        cap_mixture(np.array([1.0, 1.0]), np.array([100.0, 100.0]), 201.0)


def test_cap_mixture_negative_capacity_is_zero() -> None:
    capped, _ = cap_mixture(np.array([1.0, 1.0]), np.array([-50.0, 500.0]), 100.0)
    np.testing.assert_allclose(capped, [0.0, 1.0])


def test_cap_mixture_zero_budget() -> None:
    capped, spill = cap_mixture(np.array([1.0, 3.0]), np.array([0.0, 0.0]), 0.0)
    np.testing.assert_allclose(capped, [0.25, 0.75])
    np.testing.assert_array_equal(spill, [0.0, 0.0])


def test_cap_mixture_property_random() -> None:
    rng = np.random.default_rng(1234)
    for case in range(200):
        k = int(rng.integers(1, 9))
        w = rng.random(k) * (rng.random(k) > 0.2)  # some zero weights
        if w.sum() == 0:
            w[0] = 1.0
        cap = rng.random(k) * rng.choice([10.0, 100.0, 1000.0], size=k)
        cap *= rng.random(k) > 0.1  # some zero capacities
        budget = float(rng.uniform(0.05, 1.5)) * cap.sum()
        if cap.sum() <= 0:
            with pytest.raises(ValueError):
                cap_mixture(w, cap, 1.0)
            continue
        if budget > cap.sum():
            with pytest.raises(ValueError):
                cap_mixture(w, cap, budget)
            continue
        capped, spill = cap_mixture(w, cap, budget)
        want = normalise(w) * budget
        alloc = capped * budget
        # Random cases up to 1e4 tokens: the water-filling loop's sums and
        # divisions stay within ~1e-13 relative; 1e-9 (and 1e-6 of the budget
        # for token amounts) only admits rounding, not a misallocated token.
        assert capped.sum() == pytest.approx(1.0, abs=1e-9), case
        assert (capped >= 0).all(), case
        assert (alloc <= cap * (1 + 1e-9) + 1e-9).all(), (case, alloc, cap)
        np.testing.assert_allclose(spill, np.clip(want - alloc, 0, None), atol=1e-6 * budget)
        # tasks that were not capped keep (at least) what they asked for
        uncapped = alloc < cap * (1 - 1e-9)
        assert (alloc[uncapped] >= want[uncapped] - 1e-6 * budget).all(), case
        # no task both spills and receives extra
        assert not ((spill > 1e-6 * budget) & (alloc > want + 1e-6 * budget)).any(), case
        # tasks that are not capped keep their relative weights (when they have any)
        free = uncapped & (w > 0)
        if free.sum() >= 2:
            ratio = alloc[free] / normalise(w)[free]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)


def test_policies_and_mixer_do_not_import_torch() -> None:
    """The mixer actor builds policies: importing them must not load torch
    (about 180 MiB more for an actor that does numpy arithmetic)."""
    import subprocess
    import sys

    code = "import sys, raymix.mixer, raymix.policies; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
