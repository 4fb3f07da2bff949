"""ADAPT's meta-gradient against finite differences on a real model, its
entropy regulariser, and the scale-free signal of issue #13: the fixed point
under a constant signal, scale invariance, the token-share Jacobian, the
gradient through the repetition cap at the served weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymix.config import AdaptConfig, PolicyConfig
from raymix.policies import PoolInfo, Signals, build_policy
from raymix.policies.adapt import AdaptPolicy, entropy, smooth_max, softmax


def _pool(t: int) -> PoolInfo:
    return PoolInfo(tuple(f"t{i}" for i in range(t)), np.arange(1, t + 1) * 100, np.arange(1, t + 1) * 10, 1000)


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def _loss(model, batch) -> torch.Tensor:
    ids, labels = batch
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def _batch(gen, rows=4, length=12):
    ids = torch.randint(0, 50, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # loss on the "completion" half only
    return ids, labels


def test_meta_gradient_matches_finite_differences_of_lookahead_objective() -> None:
    model = _tiny_model()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    T, tau, eta = 4, 0.5, 0.02
    train = [_batch(gen) for _ in range(T)]
    val = [_batch(gen) for _ in range(T)]

    def grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    g_train = torch.stack([grad(_loss(model, b)) for b in train])
    val_losses = np.array([_loss(model, b).item() for b in val])
    _, q = smooth_max(val_losses, tau)
    g_val = grad(sum(float(q[j]) * _loss(model, val[j]) for j in range(T)))
    alignment = (g_train @ g_val).detach().numpy()

    policy = AdaptPolicy(AdaptConfig(entropy=0.0, floor=0.1), _pool(T))
    policy.phi = np.array([0.3, -0.2, 0.5, -0.6])
    analytic = policy.meta_gradient(alignment, eta)

    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def J(phi: np.ndarray) -> float:
        p = torch.from_numpy(policy.probs(phi))
        new = theta - eta * (p @ g_train.detach())  # one real look-ahead SGD step
        offset = 0
        with torch.no_grad():
            for prm in params:
                prm.copy_(new[offset : offset + prm.numel()].view_as(prm))
                offset += prm.numel()
            losses = np.array([_loss(model, b).item() for b in val])
        return smooth_max(losses, tau)[0]

    h = 1e-3
    numeric = np.zeros(T)
    for k in range(T):
        e = np.zeros(T)
        e[k] = h
        numeric[k] = (J(policy.phi + e) - J(policy.phi - e)) / (2 * h)
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert np.linalg.norm(numeric) > 1e-6
    # Not rounding (float64 model; central differences at h=1e-3 are off by
    # ~eps64 |J| / h ~ 1e-13 and h^2 |J'''| ~ 1e-6): the analytic meta-gradient is
    # first order in the look-ahead step eta=0.02, the finite differences
    # take the real step, so they differ by O(eta |H|), a few percent.
    assert rel < 0.05, (analytic, numeric, rel)


def test_entropy_gradient_matches_finite_differences() -> None:
    policy = AdaptPolicy(AdaptConfig(entropy=1.0, floor=0.05), _pool(5))
    policy.phi = np.array([1.0, -0.5, 0.2, 2.0, -1.5])
    analytic = policy.meta_gradient(np.zeros(5), eta=1.0)  # = -dH/dphi
    h = 1e-6
    numeric = np.array([
        -(entropy(policy.probs(policy.phi + h * np.eye(5)[k])) - entropy(policy.probs(policy.phi - h * np.eye(5)[k])))
        / (2 * h)
        for k in range(5)
    ])
    # float64: central differences at h=1e-6 err by h^2 |H'''| ~ 1e-12 plus
    # rounding eps64 |H| / h ~ 2e-10 (entropy O(1)): atol 1e-9 for components
    # near 0, rtol 1e-5 leaves the rest a wide margin.
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_entropy_keeps_mixture_off_the_corners(lam: float) -> None:
    T = 6
    policy = AdaptPolicy(AdaptConfig(entropy=lam, floor=0.0, lr=0.2, optimizer="sgd"), _pool(T))
    # Task 0's gradient aligns with the validation gradient, the others oppose it:
    # the meta-gradient alone pushes all mass onto task 0.
    align = np.array([2.0] + [-0.5] * (T - 1))
    for _ in range(2000):
        p = policy.update(Signals(np.zeros(T), None, {"alignment": align, "lookahead_lr": 1.0}))
    if lam == 0:
        assert p[0] > 0.99
    else:
        assert p.min() > 0.02 and entropy(p) > 0.5 * np.log(T)


def test_floor_bounds_every_weight_and_update_shifts_toward_aligned_tasks() -> None:
    cfg = PolicyConfig(name="adapt", adapt=AdaptConfig(floor=0.1, entropy=0.0, lr=0.5))
    policy = build_policy(cfg, _pool(4))
    # float64 numpy on a handful of terms: errors ~1e-16, default rtol 1e-7 (here and below).
    np.testing.assert_allclose(policy.initial_weights(), 0.25)
    assert policy.update(Signals(np.zeros(4))) is None  # no meta signals: no change
    align = np.array([3.0, 0.0, 0.0, -3.0])
    for _ in range(3):
        p = policy.update(Signals(np.zeros(4), None, {"alignment": align, "lookahead_lr": 0.1,
                                                      "val_loss": [1.0, 2.0, 3.0, 4.0]}))
    assert p[0] > p[1] > p[3] and p.min() >= 0.1 / 4 - 1e-12 and abs(p.sum() - 1) < 1e-12
    assert np.isfinite(policy.last["J"]) and policy.last["entropy"] > 0


def test_unsampled_tasks_keep_their_last_alignment_and_state_round_trips() -> None:
    policy = AdaptPolicy(AdaptConfig(), _pool(3))
    policy.update(Signals(np.zeros(3), None, {"alignment": [1.0, 2.0, 3.0], "lookahead_lr": 0.1}))
    policy.update(Signals(np.zeros(3), None, {"alignment": [float("nan"), 5.0, float("nan")], "lookahead_lr": 0.1}))
    np.testing.assert_allclose(policy.alignment, [1.0, 5.0, 3.0])
    clone = AdaptPolicy(AdaptConfig(), _pool(3))
    clone.load_state_dict(policy.state_dict())
    # A state round trip in one process: the same float64 operations on the
    # same values, so bit-identical.
    np.testing.assert_array_equal(clone.probs(), policy.probs())
    a = policy.update(Signals(np.zeros(3), None, {"alignment": [1.0, 1.0, 0.0], "lookahead_lr": 0.1}))
    b = clone.update(Signals(np.zeros(3), None, {"alignment": [1.0, 1.0, 0.0], "lookahead_lr": 0.1}))
    np.testing.assert_array_equal(a, b)


def test_proportional_init() -> None:
    policy = AdaptPolicy(AdaptConfig(init="proportional", floor=0.0), _pool(3))
    np.testing.assert_allclose(policy.initial_weights(), softmax(np.log([100.0, 200.0, 300.0])))


# --------------------------------------------------------------------------- the scale-free signal (issue #13)
def _updates(policy, signal_extra: dict, n: int, served=None, capped=None):
    p = None
    for _ in range(n):
        p = policy.update(Signals(np.zeros(policy.T), None, dict(signal_extra),
                                  None if served is None else np.asarray(served),
                                  None if capped is None else np.asarray(capped)))
    return p


def test_fixed_point_under_a_constant_signal_is_the_predicted_log_ratio() -> None:
    """EG with the entropy bonus: log s converges to (1-eps) z / lambda + c (z:
    the standardised alignment; equal completion lengths, nothing capped)."""
    T, lam, beta, eps = 5, 0.5, 0.8, 0.05
    policy = AdaptPolicy(AdaptConfig(entropy=lam, lr=beta, floor=eps), _pool(T))
    align = np.array([3.0, 1.0, 0.5, -1.0, 2.0])
    _updates(policy, {"alignment": align}, 200)
    z = (align - align.mean()) / align.std()
    log_s = np.log(softmax(policy.phi))
    np.testing.assert_allclose(log_s - log_s[0], (1 - eps) * (z - z[0]) / lam, rtol=1e-9, atol=1e-9)
    # The convergence is geometric at rate 1 - beta*lambda: after 10 steps it is 0.6**10 of the way.
    fresh = AdaptPolicy(AdaptConfig(entropy=lam, lr=beta, floor=eps), _pool(T))
    _updates(fresh, {"alignment": align}, 10)
    gap = np.log(softmax(fresh.phi)) - log_s
    assert np.abs(gap - gap.mean()).max() < 0.6**10 * np.abs(log_s - log_s.mean()).max() * 1.01


def test_signal_is_scale_free() -> None:
    """Alignments a million times smaller (a learning rate or a preconditioner
    that shrinks them) give the same mixture: lambda does not depend on their scale."""
    T = 4
    align = np.array([2.0, -1.0, 0.3, 0.1])
    a = _updates(AdaptPolicy(AdaptConfig(), _pool(T)), {"alignment": align}, 7)
    b = _updates(AdaptPolicy(AdaptConfig(), _pool(T)), {"alignment": 1e-6 * align}, 7)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    assert a.max() / a.min() > 2  # and it does reallocate
    # The raw look-ahead, kept as an option, does depend on it.
    c = _updates(AdaptPolicy(AdaptConfig(normalise="none"), _pool(T)), {"alignment": align, "lookahead_lr": 1e-3}, 7)
    assert np.abs(c - 0.25).max() < 0.01


def test_fixed_point_with_token_shares_satisfies_the_stationarity_equation() -> None:
    """Unequal completion lengths: at the fixed point lambda log s_k + (1-eps)
    dJ/dp_k (token-share Jacobian at the served weights) is the same for every k."""
    T, lam = 4, 1.0
    policy = AdaptPolicy(AdaptConfig(entropy=lam, lr=0.5), _pool(T))
    align = np.array([1.0, 0.0, -1.0, 0.5])
    lengths = np.array([10.0, 40.0, 20.0, 5.0])
    for _ in range(300):
        p = policy.probs()
        policy.update(Signals(np.zeros(T), None, {"alignment": align, "completion_per_example": lengths}, p))
    p = policy.probs()
    z = (align - align.mean()) / align.std()
    a = policy.dj_dp(z, p, np.zeros(T, bool), lengths)
    resid = lam * np.log(softmax(policy.phi)) + (1 - policy.cfg.floor) * a
    np.testing.assert_allclose(resid - resid.mean(), 0.0, atol=1e-8)
    # The token-share Jacobian is the derivative of -sum_i u_i z_i, u_i = p_i l_i / sum_j p_j l_j.
    def lin(q):
        u = q * lengths / (q * lengths).sum()
        return -(u * z).sum()
    h = 1e-6
    numeric = np.array([(lin(p + h * np.eye(T)[k]) - lin(p - h * np.eye(T)[k])) / (2 * h) for k in range(T)])
    from raymix.policies.adapt.policy import token_share_grad
    np.testing.assert_allclose(token_share_grad(z, p, lengths), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("per_example", [np.ones(5), np.array([4.0, 30.0, 9.0, 2.0, 15.0])])
def test_meta_gradient_through_the_repetition_cap_matches_finite_differences(per_example) -> None:
    """d/dphi of A . q(phi), q the served weights the mixer's cap gives
    (cap_weights: token shares water-filled, tasks of unequal tokens per
    example), with one task's cap binding, against the Jacobian the policy
    uses (cap_vjp, then the softmax)."""
    from raymix.policies import cap_weights, token_shares
    from raymix.policies.adapt.policy import cap_vjp

    T, budget = 5, 1000.0
    policy = AdaptPolicy(AdaptConfig(entropy=0.0, floor=0.1, optimizer="sgd"), _pool(T))
    policy.phi = np.array([0.4, -0.3, 0.1, 0.8, -1.0])
    p = policy.probs()
    shares = token_shares(p, per_example)
    capacity = shares * budget * 3
    capacity[3] = 0.5 * shares[3] * budget  # task 3 is capped
    served, spill = cap_weights(p, capacity, budget, per_example)
    capped = spill > 1e-9
    assert capped.tolist() == [False, False, False, True, False]
    A = np.array([0.3, -1.2, 0.7, 2.0, -0.4])  # dJ/dq of a linear J
    analytic = policy.phi_gradient(cap_vjp(A, p, served, capped, per_example))

    def J(phi):
        return float(A @ cap_weights(policy.probs(phi), capacity, budget, per_example)[0])

    h = 1e-6
    numeric = np.array([(J(policy.phi + h * np.eye(T)[k]) - J(policy.phi - h * np.eye(T)[k])) / (2 * h)
                        for k in range(T)])
    # Central differences of a smooth map at h=1e-6 in float64: ~1e-9 relative error.
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_mixer_hands_the_served_capped_weights_to_the_policy() -> None:
    """When the cap binds on the best-aligned task, ADAPT does not push its
    proposal up (its served weight cannot move); without the cap it does."""
    from raymix.mixer import Mixer

    def proposed_after(max_epochs: float) -> np.ndarray:
        pool = PoolInfo(("a", "b", "c"), np.array([100, 10_000, 10_000]), np.array([10, 1000, 1000]), 3000)
        mixer = Mixer(PolicyConfig(name="adapt", adapt=AdaptConfig(floor=0.0)), pool, max_epochs)
        seen = []
        update = mixer.policy.update
        mixer.policy.update = lambda s: (seen.append(s), update(s))[1]
        for _ in range(5):
            mixer.report([0, 0, 0], meta={"alignment": [5.0, 0.0, 0.0], "meta_tokens": [0, 0, 0]})
        return mixer.proposed, seen[-1]

    capped_p, signals = proposed_after(1.0)  # task a holds 100 tokens; 1/3 of 3000 would be 1000
    assert signals.capped.tolist() == [True, False, False]
    np.testing.assert_allclose(signals.served[0], 100 / 3000)
    np.testing.assert_allclose(capped_p, 1 / 3)
    free_p, signals = proposed_after(100.0)
    assert not signals.capped.any() and free_p[0] > 0.5


def test_stale_alignments_decay_on_large_pools() -> None:
    policy = AdaptPolicy(AdaptConfig(stale_decay=0.5), _pool(4))
    policy.update(Signals(np.zeros(4), None, {"alignment": [2.0, 0.0, 0.0, -2.0]}))
    first = policy.signal.copy()
    policy.update(Signals(np.zeros(4), None, {"alignment": [float("nan"), 1.0, -1.0, float("nan")]}))
    np.testing.assert_allclose(policy.signal[[0, 3]], 0.5 * first[[0, 3]])
    np.testing.assert_allclose(policy.signal[[1, 2]], [1.0, -1.0])


def test_adam_on_the_logits_stays_an_option() -> None:
    policy = AdaptPolicy(AdaptConfig(optimizer="adam", lr=0.1), _pool(3))
    p = _updates(policy, {"alignment": [1.0, 0.0, -1.0]}, 5)
    assert p[0] > p[1] > p[2]


def test_eg_step_must_not_overshoot() -> None:
    from raymix.errors import RaymixError

    with pytest.raises(RaymixError, match="lr \\* policy.adapt.entropy"):
        AdaptConfig(lr=1.0, entropy=1.0)


def test_meta_share_puts_meta_steps_off_while_over_the_cap() -> None:
    """Due every K steps, except while the meta tokens read so far exceed
    meta_share x the train tokens; without a cap, every K steps."""
    from dataclasses import replace as dc_replace

    from raymix.config import AdaptConfig
    from raymix.policies.adapt.signal import AdaptSignal
    from raymix.policies.signal import StepView

    sig = AdaptSignal.__new__(AdaptSignal)  # the schedule only: no model, no streams
    sig.cfg = dc_replace(AdaptConfig(), every_steps=4, warmup_steps=4, meta_share=0.1)
    sig.meta_spent = 0

    def view(step: int, tokens: int) -> StepView:
        return StepView(step, tokens, 10**6, 1e-3, np.ones(3) / 3, np.zeros((3, 3)))

    assert not sig.due(view(3, 300)) and sig.due(view(4, 400))
    sig.meta_spent = 50  # 50 > 0.1 x 400: put off
    assert not sig.due(view(8, 400))
    assert sig.due(view(8, 500))  # 50 <= 0.1 x 500
    sig.cfg = dc_replace(sig.cfg, meta_share=None)
    sig.meta_spent = 10**9
    assert sig.due(view(12, 1))
    assert sig.state_dict() == {"adapt_meta_spent": 10**9}


def test_meta_share_enters_adapts_identity_only_when_set() -> None:
    from raymix.config import identity_hash, load_config

    base = load_config(overrides=["policy.name=adapt"])
    assert identity_hash(base) == identity_hash(load_config(overrides=["policy.name=adapt",
                                                                       "policy.adapt.meta_share=null"]))
    assert identity_hash(base) != identity_hash(load_config(overrides=["policy.name=adapt",
                                                                       "policy.adapt.meta_share=0.1"]))
    with pytest.raises(Exception, match="policy.adapt.meta_share must be > 0"):
        load_config(overrides=["policy.name=adapt", "policy.adapt.meta_share=0"])


def test_signal_share_enters_adapts_identity_only_off_its_default() -> None:
    """At its default, policy.adapt.signal_share leaves ADAPT's identity as it
    was recorded before the field existed (d061155101a6aa77, the hash of the
    defaults at cd38a2a, when every_steps was 20; 029d20d80bb5ddd7 since the
    split rule entered every identity), so sweeps resume; set otherwise, it
    counts."""
    from raymix.config import identity_hash, load_config

    base = load_config(overrides=["policy.name=adapt", "policy.adapt.every_steps=20", "runtime.num_workers=1"])
    assert identity_hash(base) == "029d20d80bb5ddd7"
    for other in ("null", "0.3"):
        other_cfg = load_config(overrides=["policy.name=adapt", "policy.adapt.every_steps=20",
                                           f"policy.adapt.signal_share={other}", "runtime.num_workers=1"])
        assert identity_hash(base) != identity_hash(other_cfg)
    with pytest.raises(Exception, match="policy.adapt.signal_share must be > 0"):
        load_config(overrides=["policy.name=adapt", "policy.adapt.signal_share=0"])


def test_last_block_is_the_last_decoder_block_and_the_final_norm() -> None:
    """``params: last_block`` as documented: the last decoder block's
    parameters and the final norm, not the output layer (``head`` is that
    alone); the docs said "and head" while the code never took it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raymix.gradients import select_params

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[id(p)] for p in select_params(model, "last_block"))
    assert chosen == sorted(n for n in names.values() if n.startswith("model.layers.1.") or n == "model.norm.weight")
    assert [names[id(p)] for p in select_params(model, "head")] == ["lm_head.weight"]
