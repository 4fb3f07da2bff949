"""RegMix's parts on synthetic data: the swarm's Dirichlet sampling, the
regression and its k-fold quality, the optimum search where the best
mixture is known, and the config's checks. Fast (no Ray, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from raymix.config import load_config
from raymix.config_regmix import RegmixConfig
from raymix.errors import RaymixError
from raymix.policies.regmix import (
    MixtureRegression,
    aggregate,
    cap_rows,
    cross_validate,
    dirichlet_centre,
    sample_mixtures,
    search_optimum,
)

TASKS = ("a", "b", "c", "d")


def test_centre_is_tempered_token_distribution() -> None:
    c = dirichlet_centre(np.array([100, 400, 0, 500]), 0.5)
    # A task with no tokens counts as one token; float64 sums of 4 terms: rtol 1e-12.
    p = np.array([100, 400, 1, 500]) / 1001
    np.testing.assert_allclose(c, np.sqrt(p) / np.sqrt(p).sum(), rtol=1e-12)


def test_samples_are_mixtures_with_the_dirichlet_moments() -> None:
    """At one concentration s, Dirichlet(s c) has mean c and per-task variance
    c (1 - c) / (s + 1); the sampler must reproduce both."""
    centre = np.array([0.1, 0.2, 0.3, 0.4])
    s = 2.0
    cfg = RegmixConfig(min_strength=s, max_strength=s, min_weight=0.0)
    n = 20000
    w = sample_mixtures([0], centre, n, cfg, np.full(4, 1e12), 1.0)
    assert w.shape == (n, 4) and (w >= 0).all()
    # Rows are normalised in float64: atol 1e-12.
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    var = centre * (1 - centre) / (s + 1)
    # Monte Carlo: the sample mean's standard error is sqrt(var / n) (<= 0.002
    # here); 5 standard errors. The sample variance's relative error is about
    # sqrt(2 / n) times the kurtosis factor: 10% is over 5 standard errors.
    np.testing.assert_allclose(w.mean(axis=0), centre, atol=5 * np.sqrt(var.max() / n))
    np.testing.assert_allclose(w.var(axis=0), var, rtol=0.1)


def test_strengths_span_concentrated_and_spread_samples() -> None:
    """The default factors 0.1..5 give both near-one-hot and near-centre samples."""
    centre = np.full(4, 0.25)
    w = sample_mixtures([1], centre, 2000, RegmixConfig(), np.full(4, 1e12), 1.0)
    top = w.max(axis=1)
    # Shares measured at seed 1: 31% above 0.95, 17% below 0.5 (4 tasks, factors 0.1..5).
    assert (top > 0.95).mean() > 0.1 and (top < 0.5).mean() > 0.1


def test_min_weight_zeroes_small_weights() -> None:
    cfg = RegmixConfig(min_strength=0.1, max_strength=0.1, min_weight=0.01)
    w = sample_mixtures([2], np.full(4, 0.25), 500, cfg, np.full(4, 1e12), 1.0)
    assert ((w == 0) | (w >= 0.01)).all() and (w == 0).any()


def test_samples_respect_the_repetition_cap() -> None:
    """A cap that binds: every sample is what the mixer would apply."""
    capacity = np.array([50.0, 500.0, 500.0, 500.0])  # task a can give at most 5% of 1000 tokens
    w = sample_mixtures([3], np.full(4, 0.25), 300, RegmixConfig(), capacity, 1000.0)
    # The water-filling distributes in float64: 1e-9 relative slack on the token counts.
    assert (w * 1000 <= capacity * (1 + 1e-9)).all()
    assert np.isclose(w[:, 0], 0.05).any()
    np.testing.assert_allclose(cap_rows(w, capacity, 1000.0), w, atol=1e-12)  # idempotent; float64 round-off


def test_swarm_prefix_is_stable() -> None:
    """The first k mixtures of a swarm of K > k are the swarm of k (reuse of proxy runs)."""
    c = np.array([0.1, 0.2, 0.3, 0.4])
    small = sample_mixtures([0, 0], c, 5, RegmixConfig(), np.full(4, 1e12), 1.0)
    large = sample_mixtures([0, 0], c, 9, RegmixConfig(), np.full(4, 1e12), 1.0)
    np.testing.assert_array_equal(small, large[:5])


def _linear_losses(X: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Task j's loss falls with its own weight: L_j = a_j - w_j."""
    return a[None, :] - X


def test_aggregate_targets() -> None:
    Y = np.array([[1.0, 3.0, 2.0, 0.5], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(aggregate(Y, "worst", TASKS), [3.0, 2.0])
    np.testing.assert_array_equal(aggregate(Y, "mean", TASKS), [1.625, 2.0])
    np.testing.assert_array_equal(aggregate(Y, "c", TASKS), [2.0, 2.0])


def test_linear_regression_finds_the_known_worst_case_optimum() -> None:
    """L_j = a_j - w_j: the worst case max_j L_j is smallest where all are
    equal, w_j = a_j - t with t = (sum a - 1) / K; here w* = (.525, .325,
    .125, .025) and the optimum is 0.875 (uniform: 1.15)."""
    a = np.array([1.4, 1.2, 1.0, 0.9])
    w_star = a - (a.sum() - 1) / 4
    cfg = RegmixConfig()
    centre = np.full(4, 0.25)
    X = sample_mixtures([0, 0], centre, 32, cfg, np.full(4, 1e12), 1.0)
    reg = MixtureRegression("linear").fit(X, _linear_losses(X, a))
    cand = sample_mixtures([0, 1], centre, 20000, cfg, np.full(4, 1e12), 1.0)
    chosen, pred = search_optimum(reg, cand, "worst", TASKS, top_k=16)
    worst = aggregate(_linear_losses(chosen[None], a), "worst", TASKS)[0]
    # Exact fit (float64 least squares); the chosen mixture is the mean of the 16 best of
    # 20000 candidates, which lie within about 0.01 of the optimum: 0.02 above it at most.
    assert 0.875 - 1e-9 <= worst <= 0.875 + 0.02
    np.testing.assert_allclose(chosen, w_star, atol=0.05)  # same reason, per weight
    assert pred.shape == (20000,)


def test_lightgbm_finds_a_known_interior_optimum() -> None:
    """Mean loss 1 + 3 ||w - w*||^2 + noise: LightGBM on 256 proxy runs
    ranks held-out runs well and picks a mixture near w* (200 trees, not
    the default 1000: a fifth of the time, the same ranking)."""
    w_star = np.array([0.4, 0.3, 0.2, 0.1])
    rng = np.random.default_rng(0)
    cfg = RegmixConfig()
    X = sample_mixtures([0, 0], np.full(4, 0.25), 256, cfg, np.full(4, 1e12), 1.0)
    d = ((X - w_star) ** 2).sum(axis=1)
    Y = 1 + 3 * (X - w_star) ** 2 * 4 + 0.002 * rng.standard_normal((256, 4))  # per task; mean = 1 + 3 d
    np.testing.assert_allclose(aggregate(Y, "mean", TASKS), 1 + 3 * d, atol=0.01)  # the noise: 5 sd of the mean
    reg = MixtureRegression("lightgbm", min_child_samples=4, trees=200)
    cv = cross_validate(reg, X, Y, "mean", TASKS, folds=4, seed=0)
    # Trees on 192 points of a smooth 3-dimensional bowl: ranks well, not
    # exactly. 200 rounds at rate 1e-2 leave about 0.99^200 = 13% of each
    # target's spread (up to ~0.5 here, on losses ~1.3) unfitted: relative error under 0.1.
    assert cv["spearman"] > 0.8 and cv["relative_error"] < 0.1
    reg.fit(X, Y)
    cand = sample_mixtures([0, 1], np.full(4, 0.25), 2000, cfg, np.full(4, 1e12), 1.0)
    chosen, _ = search_optimum(reg, cand, "mean", TASKS, top_k=32)
    # A piecewise-constant fit: the chosen mixture is within its resolution
    # (about 0.1 per weight at 256 points), far nearer than uniform (0.22 away).
    assert np.abs(chosen - w_star).max() < 0.1
    assert np.linalg.norm(chosen - w_star) < 0.5 * np.linalg.norm(np.full(4, 0.25) - w_star)


def test_cross_validation_on_noise_ranks_nothing() -> None:
    """Targets unrelated to the mixture: held-out Spearman near zero, so the
    statistic can fail (it is not high by construction)."""
    rng = np.random.default_rng(5)
    X = sample_mixtures([5], np.full(4, 0.25), 64, RegmixConfig(), np.full(4, 1e12), 1.0)
    Y = 2 + rng.standard_normal((64, 4)) * 0.1
    cv = cross_validate(MixtureRegression("linear"), X, Y, "mean", TASKS, folds=4, seed=0)
    # 64 held-out pairs: Spearman's standard error under independence is about 1/sqrt(63) = 0.13.
    assert abs(cv["spearman"]) < 0.4
    assert len(cv["predicted"]) == 64


@pytest.mark.parametrize("override, field", [
    ("policy.regmix.proxy_runs=2", "policy.regmix.proxy_runs"),
    ("policy.regmix.proxy_share=0", "policy.regmix.proxy_share"),
    ("policy.regmix.min_strength=6", "min_strength"),
    ("policy.regmix.folds=1", "policy.regmix.folds"),
    ("policy.regmix.top_k=20000", "policy.regmix.top_k"),
    ("policy.regmix.regressor=xgboost", "policy.regmix.regressor"),
    ("policy.regmix.concurrent_proxies=0", "policy.regmix.concurrent_proxies"),
])
def test_bad_options_name_the_field(override: str, field: str) -> None:
    with pytest.raises(RaymixError, match=field.replace(".", r"\.")):
        load_config(None, ["policy.name=regmix", override])


def test_identity_covers_the_swarm_not_its_folder() -> None:
    from raymix.config import RunConfig, identity_hash

    base = identity_hash(load_config(None, ["policy.name=regmix"]))
    assert identity_hash(load_config(None, ["policy.name=regmix", "policy.regmix.proxy_runs=64"])) != base
    assert identity_hash(load_config(None, ["policy.name=regmix", "policy.regmix.swarm_seed=1"])) != base
    assert identity_hash(load_config(None, ["policy.name=regmix", "policy.regmix.swarm_dir=elsewhere"])) == base
    assert identity_hash(load_config(None, ["policy.name=regmix", "policy.regmix.concurrent_proxies=4"])) == base
    # Not part of any other policy's identity.
    assert identity_hash(load_config(None, ["policy.regmix.proxy_runs=64"])) == identity_hash(RunConfig())


def test_proxy_config_is_a_static_run_at_the_proxy_budget() -> None:
    """A proxy: static on its mixture, the proxy budget in tokens, the swarm's
    seed (so the final runs of several seeds share proxies), the proxy preset,
    no lm-eval suite; its identity is the same whatever the final run's seed."""
    from raymix.config import identity_hash
    from raymix.driver.regmix import proxy_config

    over = ["policy.name=regmix", "policy.regmix.proxy_preset=llama-micro", "model.preset=llama-small",
            "eval.suite=ood_embedded", "policy.regmix.swarm_seed=7"]
    cfg = load_config(None, over + ["seed=3"])
    p = proxy_config(cfg, {"a": 0.25, "b": 0.75}, 1234, 5, "sqlite:///x.db")
    assert p.policy.name == "static" and p.policy.weights == {"a": 0.25, "b": 0.75}
    assert p.budget.tokens == 1234 and p.seed == 7 and p.model.preset == "llama-micro"
    assert p.eval.suite is None and p.tracking.run_name.endswith("proxy5")
    other_seed = proxy_config(load_config(None, over + ["seed=4"]), {"a": 0.25, "b": 0.75}, 1234, 5, "sqlite:///y.db")
    assert identity_hash(p) == identity_hash(other_seed)


def test_swarm_concurrency_counts_cpus_as_a_sweep() -> None:
    """As many proxy trials as the CPUs hold (a local-mode proxy reserves
    its worker's CPUs plus the trial's 0.05; Ray Train workers reserve
    theirs), one on 2 CPUs or fewer, the option above all."""
    from raymix.driver.regmix import swarm_concurrency

    local = load_config(None, ["policy.name=regmix", "runtime.num_workers=0", "runtime.cpus_per_worker=1"])
    assert swarm_concurrency(local, 2) == 1
    assert swarm_concurrency(local, 16) == 15  # 16 // 1.05
    two = load_config(None, ["policy.name=regmix", "runtime.num_workers=2", "runtime.cpus_per_worker=2"])
    assert swarm_concurrency(two, 16) == 3  # 16 // 4.05
    fixed = load_config(None, ["policy.name=regmix", "policy.regmix.concurrent_proxies=3"])
    assert swarm_concurrency(fixed, 2) == 3
