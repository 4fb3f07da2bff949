"""The peers as policies (issue #15): Online Data Mixing, DoReMi and Aioli.

Each update is checked against values computed by hand from the reference
formulas (cited in each policy's module)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raymix.config import AioliConfig, DoremiConfig, OdmConfig, PolicyConfig, RunConfig, identity_hash
from raymix.policies import PoolInfo, Signals, build_policy

SIZES = np.array([100, 1000, 10000], dtype=np.int64)


def pool(budget: int = 3000, sizes: np.ndarray = SIZES) -> PoolInfo:
    tasks = tuple("abcdefghijklmnopqrstuvwxyz"[: len(sizes)])
    return PoolInfo(tasks, np.asarray(sizes), np.asarray(sizes) // 10, budget)


# --------------------------------------------------------------------------- ODM


def test_odm_exploration_is_the_reference_formula() -> None:
    from raymix.policies.odm import exploration

    assert exploration(23, 100) == pytest.approx(math.sqrt(math.log(23) / 2300))
    assert 23 * exploration(23, 100) == pytest.approx(0.849, abs=1e-3)  # near-uniform by construction
    assert exploration(3, 1) == pytest.approx(1 / 3)  # capped at 1/K


def test_odm_smoothed_mean_hand_computed() -> None:
    """t = 300/3000 of the budget x 100,000 = 10,000; eps = sqrt(ln 3 / 30,000);
    R = 0.1 exp(L) for the seen tasks, 0 for the unseen one; p = (1-3 eps) R/sum R + eps."""
    p = build_policy(PolicyConfig(name="odm", odm=OdmConfig(warmup_share=0.0)), pool())
    np.testing.assert_allclose(p.initial_weights(), SIZES / SIZES.sum())  # proportional warm-up
    new = p.update(Signals(np.array([100, 100, 100]), np.array([1.0, 2.0, np.nan])))
    assert p.t == pytest.approx(10000.0)
    np.testing.assert_allclose(new, [0.2701104204631509, 0.7238380995837905, 0.0060514799530586175], rtol=1e-9)
    assert p.summary()["odm"]["t"] == pytest.approx(10000.0)


def test_odm_exp3_hand_computed() -> None:
    """Importance-weighted reward 0.1 L / p0 (p0 proportional), weights
    softmax(eps_prev R) with eps_prev = 1/3 (the reference's initial eps)."""
    p = build_policy(PolicyConfig(name="odm", odm=OdmConfig(variant="exp3", warmup_share=0.0)), pool())
    new = p.update(Signals(np.array([100, 100, 100]), np.array([1.0, 2.0, np.nan])))
    np.testing.assert_allclose(p.reward, [11.1, 2.22, 0.0], rtol=1e-9)
    np.testing.assert_allclose(new, [0.9180875691370736, 0.05331220251702186, 0.028600228345904415], rtol=1e-9)


def test_odm_warmup_keeps_the_mixture_but_observes_losses() -> None:
    p = build_policy(PolicyConfig(name="odm", odm=OdmConfig(warmup_share=0.5)), pool())
    assert p.update(Signals(np.array([100, 100, 100]), np.array([1.0, 1.0, 1.0]))) is None
    np.testing.assert_allclose(p.reward, 0.1 * math.e)
    assert p.updates == 0
    assert p.update(Signals(np.array([500, 500, 600]), np.array([1.0, 1.0, 1.0]))) is not None
    assert p.updates == 1


def test_odm_step_counter_by_updates_when_no_horizon() -> None:
    p = build_policy(PolicyConfig(name="odm", odm=OdmConfig(warmup_share=0.0, horizon_steps=None)), pool())
    for i in range(1, 4):
        p.update(Signals(np.array([10 * i] * 3), np.array([1.0, 2.0, 3.0])))
        assert p.t == i
    assert p.eps == pytest.approx(min(1 / 3, math.sqrt(math.log(3) / 9)))


def test_odm_no_losses_no_update() -> None:
    p = build_policy(PolicyConfig(name="odm"), pool())
    assert p.update(Signals(np.array([10, 10, 10]))) is None
    assert p.update(Signals(np.array([10, 10, 10]), np.full(3, np.nan))) is None


# --------------------------------------------------------------------------- config identity


def test_peer_blocks_hash_only_for_their_policy() -> None:
    base = RunConfig()
    other = RunConfig(policy=PolicyConfig(odm=OdmConfig(smoothing=0.5), doremi=DoremiConfig(eta=0.1),
                                          aioli=AioliConfig(eta=0.5)))
    assert identity_hash(base) == identity_hash(other)  # uniform: the blocks do not count
    for name, block in (("odm", {"odm": OdmConfig(smoothing=0.5)}), ("doremi", {"doremi": DoremiConfig(eta=0.1)}),
                        ("aioli", {"aioli": AioliConfig(eta=0.5)})):
        a = RunConfig(policy=PolicyConfig(name=name))
        b = RunConfig(policy=PolicyConfig(name=name, **block))
        assert identity_hash(a) != identity_hash(b)


# --------------------------------------------------------------------------- DoReMi


def test_doremi_dro_step_hand_computed() -> None:
    """alpha uniform, eta 1, c 1e-3; excess (0.5, 0) on a, b; c absent: a and b
    share their 2/3 in proportion exp(0.5) : 1, c keeps 1/3, then the smoothing."""
    p = build_policy(PolicyConfig(name="doremi", doremi=DoremiConfig(floor=0.0)), pool())
    np.testing.assert_allclose(p.initial_weights(), 1 / 3)
    new = p.update(Signals(np.array([10, 10, 10]), extra={"excess": [0.5, 0.0, float("nan")]}))
    e = math.exp(0.5)
    raw = np.array([2 / 3 * e / (e + 1), 2 / 3 / (e + 1), 1 / 3])
    want = 0.999 * raw + 0.001 / 3
    np.testing.assert_allclose(new, want, rtol=1e-12)
    np.testing.assert_allclose(p.avg, (np.full(3, 1 / 3) + want) / 2, rtol=1e-12)  # running mean from alpha_0
    assert p.summary()["doremi"]["updates"] == 1


def test_doremi_clips_negative_excess_and_floor_mixes_the_sample() -> None:
    p = build_policy(PolicyConfig(name="doremi", doremi=DoremiConfig(floor=0.1, smoothing=0.0)), pool())
    new = p.update(Signals(np.array([10, 10, 10]), extra={"excess": [-3.0, 0.0, 0.0]}))
    np.testing.assert_allclose(p.alpha, 1 / 3)  # clipped at zero: no move (zero excess freezes alpha)
    np.testing.assert_allclose(new, 1 / 3)
    p.update(Signals(np.array([10, 10, 10]), extra={"excess": [5.0, 0.0, 0.0]}))
    assert p.alpha[0] > 0.95
    np.testing.assert_allclose(p.sampled(), 0.9 * p.alpha + 0.1 / 3)


def test_doremi_absent_task_does_not_drift() -> None:
    """A task absent from many updates keeps its weight (the reference's kept
    score would push it up at every step)."""
    p = build_policy(PolicyConfig(name="doremi", doremi=DoremiConfig(floor=0.0, smoothing=0.0)), pool())
    p.update(Signals(np.array([10, 10, 10]), extra={"excess": [0.1, 0.2, 2.0]}))
    w_c = p.alpha[2]
    for _ in range(20):
        p.update(Signals(np.array([10, 10, 10]), extra={"excess": [0.1, 0.2, float("nan")]}))
    assert p.alpha[2] == pytest.approx(w_c)
    assert p.scores[2] == pytest.approx(2.0)  # kept, as in the reference
    assert p.alpha[1] > p.alpha[0]


# --------------------------------------------------------------------------- Aioli


def _run_aioli_round(p, A_true: np.ndarray, L0: np.ndarray, start: int = 0) -> np.ndarray:
    """Feed one round of readings where each probe segment lowers the losses by
    A_true @ (the probe mixture in force): the linear law holds exactly."""
    w = p.update(Signals(np.zeros(3, dtype=np.int64), extra={"probe_index": 0, "val_loss": L0.tolist()}))
    L = L0.copy()
    for k in range(1, len(p.order) + 1):
        L = L - A_true @ w
        w = p.update(Signals(np.zeros(3, dtype=np.int64), extra={"probe_index": k, "val_loss": L.tolist()}))
    return w


def test_aioli_recovers_the_mixing_law_and_updates_hand_computed() -> None:
    from raymix.policies.aioli import probe_mixture

    np.testing.assert_allclose(probe_mixture(3, np.arange(3), 1, 0.5), [0.25, 0.5, 0.25])
    A = np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.1], [0.05, 0.0, 0.4]])
    cfg = AioliConfig(tasks_per_round=None, sweeps=2, one_hot_factor=0.5, eta=0.2, ema=None, normalise=False)
    p = build_policy(PolicyConfig(name="aioli", aioli=cfg), pool())
    new = _run_aioli_round(p, A, np.array([3.0, 3.0, 3.0]))
    np.testing.assert_allclose(np.asarray(p.last["A"]), A, atol=1e-12)
    want = np.exp(0.2 * np.array([0.35, 0.3, 0.5]))
    np.testing.assert_allclose(new, want / want.sum(), rtol=1e-12)
    assert p.rounds == 1


def test_aioli_normalise_and_ema_hand_computed() -> None:
    from raymix.policies.aioli.policy import normalise_law

    np.testing.assert_allclose(normalise_law(np.array([[-1.0, 1.0], [0.0, 2.0]])), [[0, 2 / 6], [1 / 6, 3 / 6]])
    A = np.array([[0.3, 0.1, 0.0], [0.0, 0.2, 0.1], [0.05, 0.0, 0.4]])
    cfg = AioliConfig(tasks_per_round=None, sweeps=1, one_hot_factor=0.5, eta=0.2, ema=0.1, normalise=True)
    p = build_policy(PolicyConfig(name="aioli", aioli=cfg), pool())
    _run_aioli_round(p, A, np.full(3, 3.0))
    cs1 = np.array([0.35, 0.3, 0.5]) / 1.15
    np.testing.assert_allclose(p.colsum, cs1, rtol=1e-9)
    new = _run_aioli_round(p, 2 * A, np.full(3, 3.0))  # normalised: the same A; ema of equal column sums
    np.testing.assert_allclose(p.colsum, cs1, rtol=1e-9)
    want = np.exp(0.2 * cs1)
    np.testing.assert_allclose(new, want / want.sum(), rtol=1e-9)


def test_aioli_sampled_tasks_share_their_own_weight() -> None:
    sizes = np.array([100, 100, 100, 100])
    cfg = AioliConfig(tasks_per_round=2, sweeps=1, one_hot_factor=0.75, eta=1.0, ema=None, normalise=False)
    p = build_policy(PolicyConfig(name="aioli", aioli=cfg), pool(sizes=sizes))
    w = p.update(Signals(np.zeros(4, dtype=np.int64), extra={"probe_index": 0, "val_loss": [3.0] * 4}))
    S = p.probed
    assert len(S) == 2 and len(p.order) == 2
    assert w[S].sum() == pytest.approx(1.0) and sorted(w[S]) == pytest.approx([0.25, 0.75])
    L = np.full(4, 3.0)
    for k in (1, 2):
        L = L - 0.1 * w  # A = 0.1 I: each task helped by its own share alone
        w = p.update(Signals(np.zeros(4, dtype=np.int64), extra={"probe_index": k, "val_loss": L.tolist()}))
    np.testing.assert_allclose(w, 0.25)  # equal help: equal weights; the probed pair kept its half
    assert p.update(Signals(np.zeros(4, dtype=np.int64), np.full(4, 1.0))) is None


def test_doremi_excess_is_clipped_per_token_then_averaged_per_task() -> None:
    """Task 0: tokens with excess 1 and -3 give (1 + 0) / 2 = 0.5, not (1 - 3) / 2 < 0."""
    import torch

    from raymix.policies.doremi.signal import per_task_excess

    nll = torch.tensor([2.0, 1.0, 4.0])
    ref = torch.tensor([1.0, 4.0, 3.5])
    out = per_task_excess(nll, ref, torch.tensor([0, 0, 2]), 3)
    np.testing.assert_allclose(out.numpy(), [[1.0, 0.0, 0.5], [2.0, 0.0, 1.0]])


def test_describe_lines() -> None:
    from raymix.policies import policy_spec, resolve

    odm = resolve(policy_spec("odm").describe)({"odm": {"variant": "smoothed_mean", "updates": 3, "t": 2000.0,
                                                        "eps": 0.0082, "explore_share": 0.19}})
    assert "t=2000" in odm[0] and "K*eps=0.190" in odm[0]
    dm = resolve(policy_spec("doremi").describe)({"doremi": {"updates": 2, "weights": {"a": 0.7, "b": 0.3}},
                                                  "doremi_rounds": [{"round": "proxy", "policy": "doremi",
                                                                     "train_tokens": 10, "meta_tokens": 4}]})
    assert len(dm) == 4 and "0.7000" in dm[1]
    assert "2 rounds" in resolve(policy_spec("aioli").describe)({"aioli": {"rounds": 2, "last_probed": ["a"]}})[0]
