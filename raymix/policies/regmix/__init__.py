"""RegMix (Liu et al. 2024, arXiv:2407.01492; sail-sg/regmix; the same
swarm-and-regression idea as allenai/olmix): train a swarm of small proxy
runs on Dirichlet-sampled static mixtures, regress the target loss on the
mixture, train the final run on the predicted best mixture.

``swarm.py``: the mixtures (pure NumPy). ``regression.py``: the fit, its
k-fold quality, the optimum search. The runs are driven by
``raymix.driver.regmix`` (named in the registry entry); the registered
``regmix`` policy itself is the swarm's centre as a static mixture, so the
mixer can run it like any other.
"""

from __future__ import annotations

from raymix.config import PolicyConfig
from raymix.policies.base import PoolInfo, example_weights, register_policy, tokens_per_example
from raymix.policies.regmix.regression import MixtureRegression, aggregate, cross_validate, search_optimum
from raymix.policies.regmix.swarm import cap_rows, dirichlet_centre, sample_mixtures
from raymix.policies.static import StaticPolicy

REPORT_METRICS = [
    ("regmix/proxy_runs", "proxy runs", "{:.0f}"),
    ("regmix/cv_spearman", "held-out Spearman (k-fold)", "{:.3f}"),
    ("regmix/cv_relative_error", "held-out relative error", "{:.3f}"),
    ("regmix/predicted_target", "predicted target, chosen", "{:.3f}"),
    ("regmix/predicted_target_uniform", "predicted target, uniform", "{:.3f}"),
    ("regmix/best_proxy_target", "best proxy's target", "{:.3f}"),
    ("regmix/proxy_train_tokens", "proxy train tokens (all)", "{:,.0f}"),
    ("total_train_tokens_all_rounds", "train tokens, all runs", "{:,.0f}"),
]


def describe(summary: dict) -> list[str]:
    """The CLI's lines after a run: the regression's quality, the chosen mixture."""
    r = summary.get("regmix", {})
    cv = r.get("cv", {})
    lines = [f"RegMix: {len(r.get('proxies', []))} proxy runs ({r.get('proxy_train_tokens')} train tokens); "
             f"regression {r.get('regressor')} on target {r.get('target')}: k-fold Spearman "
             f"{cv.get('spearman', float('nan')):.3f}, relative error {cv.get('relative_error', float('nan')):.3f}; "
             f"predicted {r.get('predicted_target', float('nan')):.4f} (uniform "
             f"{r.get('predicted_target_uniform', float('nan')):.4f}). Chosen mixture (token shares):"]
    lines += [f"  {t:<40} {w:.4f}" for t, w in sorted(r.get("weights", {}).items(), key=lambda kv: -kv[1])]
    return lines


def report_section(df, table) -> list[str]:
    """The sweep report's RegMix section: the regression's quality on
    held-out proxy runs, the predicted target of the chosen mixture against
    uniform's, the compute of all runs, and the chosen weights."""
    if "regmix/cv_spearman" not in df:
        return []
    lines = ["## RegMix: the swarm, the regression, the chosen mixture", "",
             "Per run: the proxy runs of its swarm; the regression's k-fold Spearman rank correlation and "
             "mean relative error |predicted - observed| / observed of the target on held-out proxy runs; "
             "the target the regression predicts for the chosen mixture and for uniform; the best target a "
             "proxy run observed; train tokens of the proxy runs and of all runs (proxies plus the final "
             "run, the compute to compare with single-run policies). RegMix's notebook reports per-domain "
             "Spearman of 0.97 to 0.998 on held-out mixtures with 512 proxy runs (sail-sg/regmix, "
             "regression_fitting/regression.ipynb, cell 13's output).", "", *table(df, REPORT_METRICS), ""]
    weights = sorted(c for c in df.columns if c.startswith("regmix/weight/"))
    if weights:
        k = len(weights)
        lines += [f"Chosen token shares (mean over runs) against uniform's 1/{k} = {1 / k:.4f}:", "",
                  "| task | weight | / uniform |", "|---|---|---|"]
        for c in weights:
            w = float(df[c].mean())
            lines.append(f"| {c[len('regmix/weight/'):]} | {w:.4f} | {w * k:.2f} |")
        lines.append("")
    return lines


@register_policy("regmix", driver="raymix.driver.regmix:run_regmix", describe="raymix.policies.regmix:describe",
                 report_section="raymix.policies.regmix:report_section")
def regmix(cfg: PolicyConfig, pool: PoolInfo) -> StaticPolicy:
    """The swarm's centre as a static mixture (the driver trains the swarm
    and the final run as ``static`` runs; see ``raymix.driver.regmix``)."""
    return StaticPolicy(example_weights(dirichlet_centre(pool.train_tokens, cfg.regmix.temperature),
                                        tokens_per_example(pool)))


__all__ = ["MixtureRegression", "aggregate", "cap_rows", "cross_validate", "dirichlet_centre", "sample_mixtures",
           "search_optimum"]
