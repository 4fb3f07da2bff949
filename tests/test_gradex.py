"""GradEx: the projection's chunking, the linearised fit against real
fine-tuning (exact for a linear model, close for an MLP and a tiny Llama),
the solvers against scikit-learn, and the scoring/selection logic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from scipy.stats import spearmanr
from torch import nn

from raymix.gradients import ParamSubset, PerExampleGrads
from raymix.policies.gradex.estimator import (
    Projector,
    SubsetEstimator,
    actual_loss,
    delta_parameters,
    estimation_error,
    fit_linearised,
    forward_selection,
    lm_mean_logit,
    project_gradients,
    sample_subsets,
    task_scores,
    threshold_selection,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tolerances: everything here is float64 (eps 2.2e-16) on tiny models and
# values of order 1, through sums of at most ~1e3 terms: two code paths for
# the same quantity (chunked or whole projections, hooks or loops, dense or
# block solves) differ by <= n eps ~ 2e-13 on any CPU, hence atol 1e-10 to
# 1e-12 (and torch.allclose's default rtol 1e-5 / atol 1e-8 where it is
# used). Comparisons with fine-tuning or scikit-learn are bounded by those
# solvers' convergence tolerances instead, stated next to them.

# ---------------------------------------------------------------------------
# The projection


def test_projector_segments_blocks_and_back():
    x = torch.randn(3, 23, dtype=torch.float64)
    for kind in ("rademacher", "gaussian"):
        proj = Projector(23, 5, seed=7, kind=kind, block_rows=4, dtype=torch.float64)
        M = proj.matrix()
        assert M.shape == (23, 5)
        whole = proj(x)
        assert torch.allclose(whole, x @ M)
        pieces = sum(proj.project_segment(x[:, a:b], a) for a, b in [(0, 7), (7, 9), (9, 23)])
        assert torch.allclose(pieces, whole)
        uncached = Projector(23, 5, seed=7, kind=kind, block_rows=4, cache_bytes=0, dtype=torch.float64)
        assert torch.allclose(uncached(x), whole) and uncached._cache == {}
        w = np.arange(5.0)
        assert torch.allclose(proj.back(w), M @ torch.arange(5.0, dtype=torch.float64))
        assert not torch.allclose(Projector(23, 5, seed=8, kind=kind, block_rows=4, dtype=torch.float64).matrix(), M)
    rad = Projector(23, 5, seed=7, block_rows=4).matrix()  # float32: 1/sqrt(5) within an ulp
    assert torch.allclose(rad.abs(), torch.full_like(rad, 5**-0.5))
    ident = Projector(23, 23, kind="identity", block_rows=4, dtype=torch.float64)
    assert torch.equal(ident(x), x)
    with pytest.raises(ValueError):
        Projector(23, 5, kind="identity")


# ---------------------------------------------------------------------------
# Small classifiers: T tasks whose labelling directions agree with the target's to varying degrees


def _tasks(din: int, seed: int = 0, n_per: int = 16, n_target: int = 40):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(din, generator=g, dtype=torch.float64)

    def sample(w, n):
        x = torch.randn(n, din, generator=g, dtype=torch.float64)
        y = ((x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
        return x, y

    train = []
    for mix in (1.0, 0.7, 0.3, -0.3, -0.8, 0.0):
        w = mix * base + (1 - abs(mix)) * torch.randn(din, generator=g, dtype=torch.float64)
        train.append(sample(w, n_per))
    return train, sample(base, n_target)


def _bce(model, x, y):
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def _meta_init(model, train, steps=60):
    X = torch.cat([x for x, _ in train])
    Y = torch.cat([y for _, y in train])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        _bce(model, X, Y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _reset(model, theta0):
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), theta0):
            p.copy_(p0)


def _finetune(model, theta0, train, S, *, reg=None, lr=None, steps=None):
    """Really fine-tune on the union of tasks S from θ0: to the minimiser of the
    proximally regularised loss (reg) or by full-batch gradient steps (lr, steps)."""
    _reset(model, theta0)
    x = torch.cat([train[t][0] for t in S])
    y = torch.cat([train[t][1] for t in S])
    if reg is not None:
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), theta0))
            loss = _bce(model, x, y) + 0.5 * reg * prox
            loss.backward()
            return loss

        opt.step(closure)
    else:
        for _ in range(steps):
            grads = torch.autograd.grad(_bce(model, x, y), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= lr * g


def _out(model, batch):
    return model(batch[0]).squeeze(-1)


def _label(batch):
    return batch[1]


def _project(model, train, target, proj):
    sub = ParamSubset.select(model, "all")
    tr = project_gradients(sub, [(b, [t] * len(b[1])) for t, b in enumerate(train)], _out, proj, _label)
    tg = project_gradients(sub, [(target, [0] * len(target[1]))], _out, proj, _label)
    return sub, tr, tg


def test_linear_model_estimate_equals_finetuning():
    """Logistic regression is linear in θ: with the unprojected gradients the
    linearised fit is the fine-tuned model, for both fits."""
    train, target = _tasks(4)
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    theta0 = _meta_init(model, train, steps=20)
    sub, tr, tg = _project(model, train, target, Projector(5, 5, kind="identity", dtype=torch.float64))
    subsets = [(0,), (1, 4), (0, 2, 5), (3, 4), (1, 2, 3, 5)]
    reg_est = SubsetEstimator(tr, tg, reg=0.05)
    gd_est = SubsetEstimator(tr, tg, fit="gd", lr=0.5, steps=15, reg=0.0)
    for S in subsets:
        _finetune(model, theta0, train, S, reg=0.05)
        # LBFGS stops at |grad| < 1e-12 or a change < 1e-15 in the loss, but its
        # line search limits the minimiser's accuracy to ~sqrt(eps64) ~ 1e-8
        # in θ: the loss agrees to ~1e-8 relative (rel 1e-7), θ to 1e-6.
        assert reg_est.estimate(S) == pytest.approx(_bce(model, *target).item(), rel=1e-7)
        # the fitted w is the parameter change itself (identity projection)
        delta = torch.cat([(p - p0).reshape(-1) for p, p0 in zip(model.parameters(), theta0)])
        assert np.allclose(reg_est.fit(S), delta.detach().numpy(), atol=1e-6)
        _finetune(model, theta0, train, S, lr=0.5, steps=15)
        # The same 15 gradient steps both ways, in float64: rounding only.
        assert gd_est.estimate(S) == pytest.approx(_bce(model, *target).item(), rel=1e-9)
    _reset(model, theta0)
    assert reg_est.estimate(()) == pytest.approx(_bce(model, *target).item(), rel=1e-12)
    assert actual_loss(sub, [target], _out, label_fn=_label) == pytest.approx(reg_est.base_loss(), rel=1e-12)
    assert [t.shape for t in delta_parameters(reg_est.fit((0,)), Projector(5, 5, kind="identity"), sub)] == \
        [p.shape for p in model.parameters()]


def test_mlp_estimate_tracks_finetuning():
    """A tanh MLP (37 parameters), Rademacher projection to 256 dimensions,
    20 gradient steps: estimated vs actually fine-tuned target loss."""
    train, target = _tasks(4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    theta0 = _meta_init(model, train)
    sub, tr, tg = _project(model, train, target, Projector(37, 256, seed=3))
    est = SubsetEstimator(tr, tg, fit="gd", lr=0.5, steps=20, reg=0.0)
    subsets = sample_subsets(6, 8, 3, seed=1)
    actual = []
    for S in subsets:
        _finetune(model, theta0, train, S, lr=0.5, steps=20)
        actual.append(_bce(model, *target).item())
    err = estimation_error(est.estimate_many(subsets), actual, base=est.base_loss())
    assert err["relative_error"] < 0.05 and err["spearman"] > 0.85
    assert err["change_relative_error"] < 0.3  # the change from θ0 is estimated too, not only the level
    # the regularised fit against the proximally regularised fine-tuned minimiser
    reg_est = SubsetEstimator(tr, tg, reg=0.3)
    actual = []
    for S in subsets[:5]:
        _finetune(model, theta0, train, S, reg=0.3)
        actual.append(_bce(model, *target).item())
    err = estimation_error(reg_est.estimate_many(subsets[:5]), actual)
    assert err["relative_error"] < 0.05 and err["spearman"] > 0.8


def test_solvers_match_sklearn_and_are_optimal():
    from sklearn.linear_model import LogisticRegression, Ridge

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    y = (rng.random(60) < 0.5).astype(float)
    reg = 0.05
    w = fit_linearised(X, np.zeros(60), y, "logistic", reg)
    ref = LogisticRegression(C=1 / (60 * reg), fit_intercept=False, tol=1e-12, max_iter=10000).fit(X, y)
    # scikit-learn's lbfgs stops at tol=1e-12 on the gradient, but its
    # solution is only as accurate as its line search (~1e-6 in w, |w| ~ 1).
    assert np.allclose(w, ref.coef_[0], atol=1e-5)
    r = rng.normal(size=60)
    f0 = rng.normal(size=60)
    w = fit_linearised(X, f0, r, "squared", reg)
    ridge = Ridge(alpha=60 * reg, fit_intercept=False).fit(X, r - f0)  # ridge on the residual
    assert np.allclose(w, ridge.coef_, atol=1e-10)  # both direct float64 solves of an 8x8 system
    # with offsets, the Newton solution zeroes the regularised gradient
    w = fit_linearised(X, f0, y, "logistic", reg)
    z = f0 + X @ w
    grad = X.T @ (1 / (1 + np.exp(-z)) - y) / 60 + reg * w
    assert np.linalg.norm(grad) < 1e-9
    with pytest.raises(ValueError):
        fit_linearised(X, f0, y, "logistic", 0.0)


# ---------------------------------------------------------------------------
# The LM path on a tiny Llama


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(24)


def _lm_examples(seed: int, n: int, low: int, high: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 10))
        out.append((rng.integers(low, high, size=length).astype(np.int64), int(rng.integers(1, 3))))
    return out


def test_lm_projection_chunked_equals_unchunked(tiny_lm):
    from raymix.streams import collate

    sub = ParamSubset.select(tiny_lm, "last_block")
    ex = _lm_examples(0, 6, 1, 24)
    fn = lm_mean_logit()
    proj = Projector(sub.numel, 64, seed=1, block_rows=100, dtype=torch.float64)
    whole = project_gradients(sub, [(collate(ex, 0), [0, 0, 1, 1, 2, 2])], fn, proj)
    chunks = [(collate(ex[i : i + 2], 0), [i // 2] * 2) for i in range(0, 6, 2)]
    tiny_cache = Projector(sub.numel, 64, seed=1, block_rows=100, cache_bytes=0, dtype=torch.float64)
    for p, hooks in ((proj, True), (tiny_cache, True), (proj, False)):
        chunked = project_gradients(sub, chunks, fn, p, linear_hooks=hooks)
        assert np.allclose(chunked.features, whole.features, atol=1e-10)
        assert np.allclose(chunked.outputs, whole.outputs, atol=1e-12)
        assert np.array_equal(chunked.groups, whole.groups)
    # the projection of the full per-example gradients, as one matrix product
    flat = PerExampleGrads(sub).compute(collate(ex, 0), fn).flat()
    assert np.allclose(whole.features, (flat @ proj.matrix()).numpy(), atol=1e-10)
    assert np.all(whole.labels == 1)
    # the output: mean over completion tokens of log(p / (1 - p)) of the reference token
    one = ex[0]
    with torch.no_grad():
        probs = torch.softmax(tiny_lm(input_ids=torch.from_numpy(one[0])[None]).logits[0], -1)
    p = torch.stack([probs[t - 1, one[0][t]] for t in range(one[1], len(one[0]))])
    assert whole.outputs[0] == pytest.approx(float(torch.log(p / (1 - p)).mean()), rel=1e-10)


def test_lm_linearised_estimate_tracks_finetuning(tiny_lm):
    """A few gradient steps on the last block of a tiny Llama, on GradEx's
    logistic surrogate of the completion tokens, against the estimate."""
    from raymix.streams import collate

    fn = lm_mean_logit()
    sub = ParamSubset.select(tiny_lm, "last_block")
    tasks = [collate(_lm_examples(10 + t, 6, lo, lo + 8), 0) for t, lo in enumerate((1, 5, 9, 15))]
    target = collate(_lm_examples(20, 8, 1, 9), 0)
    proj = Projector(sub.numel, 512, seed=2)
    tr = project_gradients(sub, [(b, [t] * 6) for t, b in enumerate(tasks)], fn, proj)
    tg = project_gradients(sub, [(target, [0] * 8)], fn, proj)
    lr, steps = 0.5, 5
    est = SubsetEstimator(tr, tg, fit="gd", lr=lr, steps=steps, reg=0.0)
    theta0 = [p.detach().clone() for p in sub.params]
    assert actual_loss(sub, [target], fn) == pytest.approx(est.base_loss(), rel=1e-10)
    subsets = [(0,), (1,), (3,), (0, 1), (2, 3), (0, 2, 3)]
    actual = []
    for S in subsets:
        for _ in range(steps):
            vals = [fn(tiny_lm, tasks[t]) for t in S]
            z = torch.cat([s / c for s, c in vals])
            loss = nn.functional.softplus(-z).mean()
            grads = torch.autograd.grad(loss, sub.params)
            with torch.no_grad():
                for p, g in zip(sub.params, grads):
                    p -= lr * g
        actual.append(actual_loss(sub, [target], fn))
        with torch.no_grad():
            for p, p0 in zip(sub.params, theta0):
                p.copy_(p0)
    err = estimation_error(est.estimate_many(subsets), actual, base=est.base_loss())
    assert err["relative_error"] < 0.02 and err["spearman"] > 0.8
    assert err["change_relative_error"] < 0.35  # the loss moves little here: the change is the real test


# ---------------------------------------------------------------------------
# Scores, selection, error


def test_scores_and_selection():
    effect = np.array([-0.3, -0.1, 0.0, 0.2, 0.05, -0.2])

    def loss(S):
        return 1.0 + float(effect[list(S)].sum())

    subsets = list(itertools.combinations(range(6), 3))
    scores = task_scores(subsets, [loss(S) for S in subsets], 6)
    # all 3-subsets of 6: with j, 1 + e_j + (2/5)(E - e_j); without, 1 + (3/5)(E - e_j)
    assert np.allclose(scores, 1.2 * effect - effect.sum() / 5)
    assert threshold_selection(scores) == [0, 5, 1]
    assert threshold_selection(scores, max_tasks=2) == [0, 5]
    assert threshold_selection(scores, always=[3]) == [3, 0, 5, 1]
    fwd = forward_selection(loss, range(6))
    assert fwd.selected == [0, 5, 1] and np.allclose(fwd.losses, [1.0, 0.7, 0.5, 0.4])
    assert forward_selection(loss, range(6), max_size=2).selected == [0, 5]
    assert forward_selection(loss, range(6), start=[3]).selected == [3, 0, 5, 1]
    assert np.isnan(task_scores([(0, 1), (0, 2)], [1.0, 2.0], 3)[0])  # in every subset

    subs = sample_subsets(8, 20, 0.5, seed=3, always=[2])
    assert len(set(subs)) == 20 and all(len(s) == 4 and 2 in s for s in subs)
    assert subs == sample_subsets(8, 20, 0.5, seed=3, always=[2])
    with pytest.raises(ValueError):
        sample_subsets(4, 7, 2)  # only 6 exist


def test_estimation_error_and_estimator_checks():
    est, act = [1.0, 2.2, 2.9, 4.5], [1.1, 2.0, 3.0, 4.0]
    err = estimation_error(est, act, base=0.5)
    rel = np.abs(np.subtract(est, act)) / np.abs(act)
    assert err["relative_error"] == pytest.approx(rel.mean())
    assert err["max_relative_error"] == pytest.approx(rel.max())
    assert err["spearman"] == pytest.approx(spearmanr(est, act)[0]) and err["spearman"] == pytest.approx(1.0)
    assert err["change_relative_error"] == pytest.approx(np.abs(np.subtract(est, act)).sum() / np.abs(np.subtract(act, 0.5)).sum())
    from raymix.policies.gradex.estimator import ProjectedGradients

    a = ProjectedGradients(np.zeros((2, 3)), np.zeros(2), np.ones(2), np.array([0, 1]), (3, 3, 0, "rademacher", 4))
    b = ProjectedGradients(np.zeros((2, 3)), np.zeros(2), np.ones(2), np.array([0, 0]), (3, 3, 1, "rademacher", 4))
    with pytest.raises(ValueError):
        SubsetEstimator(a, b)
    e = SubsetEstimator(a, a, reg=0.1)
    assert e.estimate(()) == pytest.approx(np.log(2)) == e.base_loss()
