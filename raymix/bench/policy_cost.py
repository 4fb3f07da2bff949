"""``policy_cost``: what one update of each learned policy costs, against
uniform at the same budget, model, data and workers.

Every policy in the registry that is not a fixed mixture runs once per
repeat, back to back with uniform in this process. Per policy it reports the
updates it made (mixture changes the mixer applied, or signal computations
where those are more), the tokens it read for its signals (``meta_tokens``)
per update, the seconds of its worker-side signal and of the mixer's update
per update, and the training loop's extra seconds per update over uniform's
(which is what a user pays). The signal of a multi-round policy is its
proxy round's (DoReMi) or its influence scorings between rounds (IDEAL), as
in the sweep report (``raymix.report_runs.signal_cost``); the meta tokens
per update are those the signal read (the run's less uniform's, which are
the curve's evaluations). Multi-round policies also report the tokens and
seconds of all their rounds, so their whole cost is shown too.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from raymix.config import RunConfig


def learned_policies() -> list[str]:
    """Every registered policy that changes its mixture from a signal."""
    import raymix.policies  # noqa: F401  (fills the registry)
    from raymix.registry import POLICIES

    return [name for name, spec in POLICIES.items() if not spec.static and name != "uniform"]


def _round_summary(s: dict):
    """Reads another round's ``summary.json`` from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    from raymix.report_runs import artifact_json

    client = MlflowClient(s["mlflow_tracking_uri"])
    return lambda run_id: artifact_json(client, run_id, "summary.json")


def _row(s: dict) -> dict:
    from raymix.report_runs import signal_cost

    rounds = "total_train_tokens_all_rounds" in s
    cost = signal_cost(s, _round_summary(s))
    # Updates: the signal's (DoReMi's in its proxy round, IDEAL's scorings), or
    # the mixture changes the mixer applied where those are more (ODM's).
    updates = max(cost["updates"], len(s.get("mixture_schedule") or [[0]]) - 1)
    return {
        "updates": updates,
        "train_tokens": s.get("total_train_tokens_all_rounds", s["train_tokens"]),
        "meta_tokens": s.get("total_meta_tokens_all_rounds", s["meta_tokens"]),
        # The signal's own reads where known; else the run's (or its proxy's)
        # meta tokens, from which uniform's (the same curve evaluations) are taken.
        "signal_meta_tokens": cost["meta_tokens"] if cost["meta_tokens"] is not None else float("nan"),
        "run_meta_tokens": cost["run_meta_tokens"] if cost["meta_tokens"] is None else float("nan"),
        # A multi-round summary carries its final round's loop; the rounds' wall time is below.
        "loop_seconds": s.get("train_loop_seconds", 0.0),
        "signal_seconds": cost["seconds"],
        "mixer_seconds": s.get("mixer_update_seconds") or 0.0,
        "wall_seconds": s.get("total_wall_seconds_all_rounds", s["wall_seconds"]),
        "rounds": len(next((v for k, v in s.items() if k.endswith("_rounds") and isinstance(v, list)), [None]))
        if rounds else 1,
    }


def bench_policy_cost(cfg: RunConfig, out: Path, repeats: int, policies: Optional[Sequence[str]] = None) -> dict:
    from raymix.driver import run
    from raymix.driver.setup import init_ray

    init_ray(cfg)
    names = ["uniform", *(policies or learned_policies())]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names:
            c = replace(cfg, policy=replace(cfg.policy, name=name), eval=replace(cfg.eval, max_test_examples=1))
            runs[name].append(_row(run(c, out / f"{name}-{r}")))
    base = statistics.median(x["loop_seconds"] for x in runs["uniform"])
    curve_tokens = statistics.median(x["meta_tokens"] for x in runs["uniform"])  # uniform reads only the curve
    table = {}
    for name in names[1:]:
        rows = runs[name]
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
        per = max(1.0, med["updates"])
        read = med["signal_meta_tokens"] if med["signal_meta_tokens"] == med["signal_meta_tokens"] else \
            med["run_meta_tokens"] - curve_tokens
        table[name] = {**med, "meta_tokens_per_update": read / per,
                       "signal_seconds_per_update": med["signal_seconds"] / per,
                       "mixer_seconds_per_update": med["mixer_seconds"] / per,
                       "extra_loop_seconds_per_update": (med["loop_seconds"] - base) / per,
                       "loop_vs_uniform": med["loop_seconds"] / max(1e-9, base)}
    return {"model": cfg.model.preset, "budget": cfg.budget.tokens or cfg.budget.fraction,
            "workers": cfg.runtime.num_workers, "repeats": repeats, "uniform_loop_seconds": base,
            "runs": runs, "policies": table}


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines = [
        "\n## policy_cost\n",
        f"Model `{r['model']}`, budget {r['budget']}, {r['workers']} worker(s), median of {r['repeats']} "
        f"repeat(s); uniform's training loop: {r['uniform_loop_seconds']:.1f} s. Multi-round policies count "
        "the tokens and wall time of all their rounds.\n",
        "| policy | updates | meta tokens / update | signal s / update | mixer s / update "
        "| extra loop s / update | loop / uniform | train tokens (all rounds) | meta tokens (all rounds) "
        "| wall s (all rounds) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["policies"].items():
        lines.append(
            f"| {name} | {v['updates']:.0f} | {v['meta_tokens_per_update']:.0f} | "
            f"{v['signal_seconds_per_update']:.3f} | {v['mixer_seconds_per_update']:.4f} | "
            f"{v['extra_loop_seconds_per_update']:.3f} | {v['loop_vs_uniform']:.2f}x | {v['train_tokens']:.0f} | "
            f"{v['meta_tokens']:.0f} | {v['wall_seconds']:.1f} |")
    return lines
