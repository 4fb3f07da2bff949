"""IDEAL influence: every curvature solve against a dense solve of its own
definition, per-example gradients against brute force, and the volume step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from torch import nn

from raymix.gradients import ParamSubset, PerExampleGrads, aggregate_gradient, lm_example_nll
from raymix.policies.ideal.influence import (
    DiagFisher,
    KroneckerCurvature,
    fit_curvature,
    ideal_influence,
    ideal_step,
    ideal_volumes,
    influence_scores,
)

# Tolerances: all float64 (eps 2.2e-16) on models of a few hundred
# parameters with gradients and factors of order <= 1. Two computations of
# one quantity (hooks or brute force, factors or their definition) differ by
# at most n eps for sums of n <= 1e3 terms: ~2e-13 on any CPU, so atol 1e-12
# (1e-10 through a tiny Llama's deeper graph). Solves multiply that by the
# damped matrix's condition number, (largest eigenvalue + lambda) / lambda
# <= 1e3 here: rtol 1e-10 to 1e-8, atol 1e-12 to 1e-9.

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------------------
# A 2-layer MLP classifier (26 parameters), float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _mlp_batches(seed: int = 1, n_batches: int = 3, size: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=g, dtype=torch.float64),
             torch.randint(0, 2, (size,), generator=g)) for _ in range(n_batches)]


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _brute_per_example(model, batches, fn=_ce):
    """[N, P] per-example gradients, one forward/backward per example."""
    rows = []
    for x, y in batches:
        for i in range(len(y)):
            loss = fn(model, (x[i : i + 1], y[i : i + 1]))[0]
            grads = torch.autograd.grad(loss, list(model.parameters()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _layer_factors(model, batches, layer_idx):
    """Independent A (augmented inputs) and G (output gradients) of one layer."""
    acts, outs = {}, {}
    A = G = None
    N = 0
    for x, y in batches:
        h = x
        for k, mod in enumerate(model):
            if isinstance(mod, nn.Linear):
                acts[k] = h
                h = mod(h)
                h.retain_grad()
                outs[k] = h
            else:
                h = mod(h)
        nn.functional.cross_entropy(h, y, reduction="sum").backward()
        a = torch.cat([acts[layer_idx], torch.ones(len(y), 1, dtype=torch.float64)], 1)
        g = outs[layer_idx].grad
        A = a.T @ a if A is None else A + a.T @ a
        G = g.T @ g if G is None else G + g.T @ g
        N += len(y)
        model.zero_grad()
    return A / N, G / N


def _augmented_perm(w_off: int, b_off: int, out: int, inp: int) -> list[int]:
    """Flat-subset index of each entry of the row-major augmented [W | b]."""
    idx = []
    for r in range(out):
        for c in range(inp + 1):
            idx.append(b_off + r if c == inp else w_off + r * inp + c)
    return idx


def test_per_example_gradients_match_brute_force():
    model, batches = _mlp(), _mlp_batches()
    sub = ParamSubset.select(model, "all")
    brute = _brute_per_example(model, batches)
    for hooks in (True, False):
        peg = PerExampleGrads(sub, linear_hooks=hooks)
        got = torch.cat([peg.compute(b, _ce).flat() for b in batches])
        assert torch.allclose(got, brute, atol=1e-12)
    assert len(PerExampleGrads(sub).layers) == 2 and PerExampleGrads(sub).rest == []


def test_diag_fisher_solve_matches_dense():
    model, batches = _mlp(), _mlp_batches()
    sub = ParamSubset.select(model, "all")
    brute = _brute_per_example(model, batches)
    curv = fit_curvature(sub, batches, _ce, "diag_fisher", damping=1e-3, damping_mode="absolute")
    assert isinstance(curv, DiagFisher)
    diag = (brute**2).mean(0)
    assert torch.allclose(curv.diag, diag, atol=1e-12)
    v = np.random.default_rng(0).normal(size=(2, sub.numel))
    dense = np.diag(diag.numpy() + 1e-3)
    want = np.linalg.solve(dense, v.T).T
    got = curv.solve(torch.from_numpy(v)).numpy()
    assert np.allclose(got, want, rtol=1e-10, atol=1e-12)
    # relative damping: λ = damping * mean diagonal entry
    rel = fit_curvature(sub, batches, _ce, "diag_fisher", damping=0.1)
    assert rel.damping == pytest.approx(0.1 * float(diag.mean()))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kronecker_solve_matches_dense(method):
    """(G⊗Ā + λI)⁻¹ (K-FAC) and (Q diag(Λ) Qᵀ + λI)⁻¹ (EK-FAC), bias in the
    augmented last column, against torch.linalg.solve of the dense matrix."""
    model, batches = _mlp(), _mlp_batches()
    sub = ParamSubset.select(model, "all")
    lam = 1e-2
    curv = fit_curvature(sub, batches, _ce, method, damping=lam, damping_mode="absolute")
    assert isinstance(curv, KroneckerCurvature) and curv.rest == []
    brute = _brute_per_example(model, batches)
    F_emp = brute.T @ brute / brute.shape[0]
    dense = torch.zeros(sub.numel, sub.numel, dtype=torch.float64)
    for blk, layer_idx in zip(curv.blocks, (0, 2)):
        A, G = _layer_factors(model, batches, layer_idx)
        assert torch.allclose(blk.A, A, atol=1e-12) and torch.allclose(blk.G, G, atol=1e-12)
        perm = _augmented_perm(blk.weight_offset, blk.bias_offset, blk.out_features, blk.in_features)
        if method == "kfac":
            block = torch.kron(G, A)
        else:
            Q = torch.kron(blk.vec_G, blk.vec_A)
            lam_ii = torch.diagonal(Q.T @ F_emp[perm][:, perm] @ Q)  # EK-FAC's definition
            assert torch.allclose(blk.ekfac.reshape(-1), lam_ii, atol=1e-12)
            block = Q @ torch.diag(lam_ii) @ Q.T
        dense[np.ix_(perm, perm)] = block
    v = torch.from_numpy(np.random.default_rng(1).normal(size=(3, sub.numel)))
    want = torch.linalg.solve(dense + lam * torch.eye(sub.numel, dtype=torch.float64), v.T).T
    got = curv.solve(v)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-10)
    assert torch.allclose(curv.solve(v[0]), want[0], rtol=1e-9, atol=1e-10)


def test_influence_scores_signs_and_identity():
    model, batches = _mlp(), _mlp_batches()
    sub = ParamSubset.select(model, "all")
    ref = aggregate_gradient(sub, batches[:1], _ce)
    tasks = torch.stack([aggregate_gradient(sub, [b], _ce) for b in batches] + [ref, -ref])
    s = influence_scores(ref, tasks, fit_curvature(sub, batches, _ce, "identity"))
    assert np.allclose(s, -(tasks @ ref).numpy())
    for method in ("diag_fisher", "kfac", "ekfac"):
        s = influence_scores(ref, tasks, fit_curvature(sub, batches, _ce, method))
        # H⁻¹ positive definite: the reference's own gradient helps, its negation hurts
        assert s[-2] < 0 < s[-1] and s[-2] == pytest.approx(-s[-1])


# ---------------------------------------------------------------------------
# A tiny Llama (last block: 7 linear layers without bias + 3 norm scales)


@pytest.fixture(scope="module")
def tiny_lm():
    model = tiny_llama(32)
    with torch.no_grad():  # norm scales away from 1 so their gradients are generic
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _lm_batches(seed: int, n_batches: int, size: int):
    from raymix.streams import collate

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ex = []
        for _ in range(size):
            length = int(rng.integers(4, 11))
            ex.append((rng.integers(1, 32, size=length).astype(np.int64), int(rng.integers(1, length - 1))))
        out.append(collate(ex, pad_id=0))
    return out


def test_lm_per_example_gradients_padding_and_ties(tiny_lm):
    fn = lm_example_nll()
    batch = _lm_batches(2, 1, 5)[0]
    for name in ("last_block", "head"):
        sub = ParamSubset.select(tiny_lm, name)
        hooked = PerExampleGrads(sub).compute(batch, fn).flat()
        looped = PerExampleGrads(sub, linear_hooks=False).compute(batch, fn).flat()
        assert torch.allclose(hooked, looped, atol=1e-10)
    # the tied head is never hooked (its gradient also flows through the embedding)
    assert PerExampleGrads(ParamSubset.select(tiny_lm, "head")).layers == []
    # each padded row equals the same example alone, unpadded
    sub = ParamSubset.select(tiny_lm, "last_block")
    got = PerExampleGrads(sub).compute(batch, fn).flat()
    for r in range(3):
        length = int(batch["attention_mask"][r].sum())
        one = {k: v[r : r + 1, :length] for k, v in batch.items()}
        alone = PerExampleGrads(sub).compute(one, fn).flat()[0]
        assert torch.allclose(got[r], alone, atol=1e-10)


def test_lm_untied_output_layer_per_example_gradients():
    """An untied output layer (a pretrained model's, not the presets'):
    ``token_nll`` applies it to the completion positions gathered into one
    row, so its inputs are not per example; its per-example gradients (and
    IDEAL's, GradEx's) come from the exact loop, equal to one example alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=12, max_position_embeddings=64,
                                         tie_word_embeddings=False, pad_token_id=0)).double()
    fn = lm_example_nll()
    batch = _lm_batches(5, 1, 4)[0]
    for name in ("head", "all"):
        sub = ParamSubset.select(model, name)
        hooked = PerExampleGrads(sub).compute(batch, fn).flat()
        looped = PerExampleGrads(sub, linear_hooks=False).compute(batch, fn).flat()
        assert torch.allclose(hooked, looped, atol=1e-10)  # float64: see the module's tolerances
    sub = ParamSubset.select(model, "head")
    got = PerExampleGrads(sub).compute(batch, fn).flat()
    for r in range(4):
        length = int(batch["attention_mask"][r].sum())
        one = {k: v[r : r + 1, :length] for k, v in batch.items()}
        assert torch.allclose(got[r], PerExampleGrads(sub).compute(one, fn).flat()[0], atol=1e-10)
    # K-FAC fits: the output layer is a diagonal block like the other non-hooked parameters.
    curv = fit_curvature(sub, [batch], fn, "kfac", damping=1e-3, damping_mode="absolute")
    assert curv.blocks == [] and len(curv.rest) == 1


def test_lm_kfac_blocks_masking_and_dense_solve(tiny_lm):
    fn = lm_example_nll()
    batches = _lm_batches(3, 2, 4)
    sub = ParamSubset.select(tiny_lm, "last_block")
    lam = 1e-3
    for method in ("kfac", "ekfac"):
        curv = fit_curvature(sub, batches, fn, method, damping=lam, damping_mode="absolute")
        assert len(curv.blocks) == 7 and len(curv.rest) == 3 and all(b.bias_offset is None for b in curv.blocks)
        dense = torch.zeros(sub.numel, sub.numel, dtype=torch.float64)
        for blk in curv.blocks:
            idx = list(range(blk.weight_offset, blk.weight_offset + blk.out_features * blk.in_features))
            if method == "kfac":
                block = torch.kron(blk.G, blk.A)
            else:
                Q = torch.kron(blk.vec_G, blk.vec_A)
                block = Q @ torch.diag(blk.ekfac.reshape(-1)) @ Q.T
            dense[np.ix_(idx, idx)] = block
        for (off, size), d in zip(curv.rest, curv.rest_diag):
            dense[off : off + size, off : off + size] = torch.diag(d)
        v = torch.from_numpy(np.random.default_rng(4).normal(size=(2, sub.numel)))
        want = torch.linalg.solve(dense + lam * torch.eye(sub.numel, dtype=torch.float64), v.T).T
        assert torch.allclose(curv.solve(v), want, rtol=1e-8, atol=1e-9)
    # A of q_proj: mean over non-padding positions of its input (the normed hidden states)
    seen = []
    layer = tiny_lm.model.layers[0].self_attn.q_proj
    h = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            tiny_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    acts = torch.cat([a[b["attention_mask"].bool()] for a, b in zip(seen, batches)])
    q = next(b for b in curv.blocks if b.name.endswith("q_proj"))
    assert torch.allclose(q.A, acts.T @ acts / len(acts), atol=1e-12)
    # the diagonal Fisher of the rest equals the brute-force per-example one
    per_ex = torch.cat([PerExampleGrads(sub, linear_hooks=False).compute(b, fn).flat() for b in batches])
    off, size = curv.rest[0]
    assert torch.allclose(curv.rest_diag[0], (per_ex[:, off : off + size] ** 2).mean(0), atol=1e-12)


def test_aggregate_gradient_is_token_weighted_and_batch_invariant(tiny_lm):
    from raymix.loss import token_nll

    fn = lm_example_nll()
    batches = _lm_batches(5, 3, 3)
    sub = ParamSubset.select(tiny_lm, "last_block")
    split = aggregate_gradient(sub, batches, fn)
    total, count = 0.0, 0.0
    for b in batches:
        nll, cnt = token_nll(tiny_lm, b, "cpu")
        total, count = total + nll.sum(), count + cnt.sum()
    want = torch.autograd.grad(total / count, sub.params)
    assert torch.allclose(split, torch.cat([g.reshape(-1) for g in want]), atol=1e-12)
    assert all(p.requires_grad for p in tiny_lm.parameters())  # restored


def test_ideal_influence_end_to_end(tiny_lm):
    fn = lm_example_nll()
    data = _lm_batches(6, 5, 3)
    res = ideal_influence(tiny_lm, "last_block", data[:1], [data[1:2], data[2:3], data[:1]], data[3:],
                          fn, method="ekfac")
    assert res.scores.shape == (3,) and np.all(np.isfinite(res.scores))
    assert res.scores[2] < 0  # the reference set itself, as a task, helps


# ---------------------------------------------------------------------------
# The volume step


def test_ideal_volume_step_invariants():
    rng = np.random.default_rng(0)
    for _ in range(20):
        T = int(rng.integers(2, 9))
        n = rng.uniform(10, 1000, size=T)
        s = rng.normal(size=T)
        beta = ideal_step(s, 0.15)
        assert np.max(np.abs(beta)) == pytest.approx(0.15)
        assert np.all(np.sign(beta) == -np.sign(s))
        budget = float(rng.uniform(500, 5000))
        new = ideal_volumes(n, s, 0.15, budget=budget)
        assert new.sum() == pytest.approx(budget)
        ratio = new / n
        order = np.argsort(s)  # most helpful first: ratios must not increase along it
        assert np.all(np.diff(ratio[order]) <= 1e-12)
        # scores whose volume-weighted step is zero: no renormalisation, each change has the sign of -s
        s0 = s - np.sum(n * s) / np.sum(n)
        moved = ideal_volumes(n, s0, 0.15) - n
        assert np.all(np.sign(moved[np.abs(s0) > 1e-9]) == -np.sign(s0[np.abs(s0) > 1e-9]))
        ints = ideal_volumes(np.round(n), s, 0.15, budget=round(budget), integer=True)
        assert ints.dtype == np.int64 and ints.sum() == round(budget)
        assert np.all(np.abs(ints - ideal_volumes(np.round(n), s, 0.15, budget=round(budget))) < 1)
    assert np.allclose(ideal_volumes([5.0, 5.0], [0.0, 0.0]), [5.0, 5.0])
    with pytest.raises(ValueError):
        ideal_volumes([1.0, 2.0], [1.0, np.nan])
