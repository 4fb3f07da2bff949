"""RegMix's option block (``policy.regmix``), in its own module to keep
``raymix.config`` (which imports it) from growing; see ``raymix.policies.regmix``.

Defaults from sail-sg/regmix (commit b004d3a, cited per field as
``synthesize_mixture.py`` = ``mixture_config/synthesize_mixture.py`` and
``regression.ipynb`` = ``regression_fitting/regression.ipynb``) and
allenai/olmix (commit 9586977), where raymix follows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from raymix.errors import RaymixError


@dataclass(frozen=True)
class RegmixConfig:
    """RegMix (Liu et al. 2024, arXiv:2407.01492): a swarm of small proxy runs
    on Dirichlet-sampled static mixtures, a regression from mixture to target
    loss, and a final run on the mixture the regression predicts best
    (``raymix.driver.regmix``)."""

    proxy_runs: int = 32
    """K: proxy runs in the swarm. The paper trains 512 for 17 domains
    (sail-sg/regmix README.md:106); 32 is this platform's floor for a usable
    regression on the embedded default's tasks at CPU cost."""
    proxy_share: float = 0.1
    """Each proxy run's budget as a share of the final run's budget (the
    swarm costs about ``proxy_runs x proxy_share`` final runs in train tokens)."""
    proxy_tokens: Optional[int] = None
    """Each proxy run's budget in tokens (overrides ``proxy_share``)."""
    proxy_preset: Optional[str] = None
    """A smaller model preset for the proxy runs (``raymix.models.PRESETS``),
    as the paper's 1M-parameter proxies for a 1B model; null: the run's model."""
    temperature: float = 0.5
    """The Dirichlet's centre is the pool's token distribution raised to this
    power, renormalised (synthesize_mixture.py:12 ``TEMP = 0.5``, applied at :136-138)."""
    min_strength: float = 0.1
    """Smallest Dirichlet concentration factor (synthesize_mixture.py:16 ``MIN_STRENGH``)."""
    max_strength: float = 5.0
    """Largest concentration factor (synthesize_mixture.py:17 ``MAX_STRENGH``); each sample draws
    one of 15 log-spaced factors in between (:152-159). olmix keeps 0.1/5.0 (olmix/aliases.py:193-194)."""
    min_weight: float = 2e-4
    """Sampled weights below this are set to 0, the rest renormalised
    (synthesize_mixture.py:37 ``MINIMUM``, applied at :165-167)."""
    target: str = "worst"
    """What the regression predicts and the search minimises: ``worst`` (the
    largest per-task validation loss), ``mean``, or a task name (that task's
    validation loss; RegMix's default target is one domain, Pile-CC)."""
    regressor: Literal["lightgbm", "linear"] = "lightgbm"
    """``lightgbm``: one gradient-boosted tree model per task (regression.ipynb
    cell 13, as olmix/fit/utils.py:42-52); ``linear``: least squares on the
    weights, the paper's other regression, which needs well over one proxy
    run per task (with 32 runs on the embedded default's 23 tasks its k-fold
    Spearman was near 0, LightGBM's 0.63)."""
    trees: int = 1000
    """LightGBM's boosting rounds at learning rate 1e-2 (regression.ipynb cell
    13, ``num_iterations`` 1000). Fit and search time grow with it (per task)."""
    min_child_samples: int = 4
    """LightGBM's fewest proxy runs per leaf. LightGBM's default (20) leaves no
    split on a swarm of 32; RegMix fits on 512."""
    candidates: int = 10_000
    """Candidate mixtures the optimum is searched over, drawn from the swarm's
    Dirichlet and capped by ``budget.max_epochs`` at the final budget. RegMix
    simulates 100,000 (regression.ipynb cell 16); fewer here since every
    task has its own model to evaluate."""
    top_k: int = 128
    """The chosen mixture is the mean of the ``top_k`` best predicted
    candidates (regression.ipynb cell 18, ``k = 128``)."""
    folds: int = 4
    """k of the k-fold estimate of the regression's quality on held-out proxy runs."""
    swarm_seed: int = 0
    """Seed of the swarm's mixtures and of the proxy runs (not the run's seed:
    the final runs of several seeds share one swarm)."""
    swarm_dir: Optional[str] = None
    """Where the proxy runs are kept, one folder per proxy identity; a finished
    one is reused (a resumed run, or another run's swarm with the same proxies,
    e.g. the final run of another seed). null: ``OUTPUT/swarm``. Not part of
    the identity; runs sharing it should not run at the same time."""
    concurrent_proxies: Optional[int] = None
    """Proxy runs trained at a time, each a Ray Tune trial. null: as many as
    the cluster's CPUs hold (a proxy in local mode reserves
    ``runtime.cpus_per_worker``, otherwise its workers reserve theirs), one
    on a machine of 2 CPUs or fewer, as a sweep's trials. Not part of the
    identity (it changes when proxies train, not what they are)."""

    def __post_init__(self) -> None:
        if self.proxy_runs < 4:
            raise RaymixError(f"policy.regmix.proxy_runs must be >= 4, got {self.proxy_runs}")
        if not 0 < self.proxy_share <= 1:
            raise RaymixError(f"policy.regmix.proxy_share must be in (0, 1], got {self.proxy_share}")
        if self.proxy_tokens is not None and self.proxy_tokens <= 0:
            raise RaymixError(f"policy.regmix.proxy_tokens must be > 0, got {self.proxy_tokens}")
        if self.temperature <= 0:
            raise RaymixError(f"policy.regmix.temperature must be > 0, got {self.temperature}")
        if not 0 < self.min_strength <= self.max_strength:
            raise RaymixError("policy.regmix: need 0 < min_strength <= max_strength, got "
                              f"{self.min_strength} and {self.max_strength}")
        if not 0 <= self.min_weight < 0.5:
            raise RaymixError(f"policy.regmix.min_weight must be in [0, 0.5), got {self.min_weight}")
        if not self.target:
            raise RaymixError("policy.regmix.target must be worst, mean or a task name")
        if self.concurrent_proxies is not None and self.concurrent_proxies < 1:
            raise RaymixError(f"policy.regmix.concurrent_proxies must be >= 1 or null, got {self.concurrent_proxies}")
        for name in ("trees", "min_child_samples", "candidates", "top_k"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.regmix.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.candidates:
            raise RaymixError(f"policy.regmix.top_k ({self.top_k}) must be <= candidates ({self.candidates})")
        if not 2 <= self.folds <= self.proxy_runs:
            raise RaymixError(f"policy.regmix.folds must be in [2, proxy_runs], got {self.folds}")
