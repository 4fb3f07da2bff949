"""Does a learned mixture move, and where to: the report's two figures of it.

- ``kl_uniform_mean``: KL(p || uniform) of the applied mixture averaged over
  training tokens (each schedule entry weighs by the tokens it was in force
  for). 0 is uniform; log T is all tokens on one task.
- ``hardest_tokens_vs_uniform``: the run's training tokens on the pool's
  hardest tasks over the uniform policy's on the same tasks (same pool,
  model and budget, mean over uniform's seeds). The hardest tasks are the
  quarter (at least one) with the highest mean test loss under uniform; a
  worst-case objective should give them more tokens than uniform does
  (above 1). Test loss only names the tasks for this reading; no policy
  reads it and nothing is tuned on it.

Both come from artifacts every run logs (``mixture_schedule.json``,
``ledger.json``) and the per-task ``test_loss/<task>`` metrics (logged per
task up to ``tracking.max_task_metrics`` tasks; above it the reading is left
out).
"""

from __future__ import annotations

import math

from raymix.metrics_view import kl_uniform
from raymix.report_runs import artifact_json, by

METRICS = [
    ("kl_uniform_mean", "KL from uniform (token-averaged)", "{:.3f}"),
    ("hardest_tokens_vs_uniform", "tokens on hardest tasks / uniform's", "{:.2f}"),
]


def mean_kl_uniform(schedule: list, end: float) -> float:
    """KL(p || uniform) of a piecewise-constant schedule ``[[offset, {task:
    weight}], ...]`` averaged over training tokens up to ``end``; NaN for an
    empty schedule. Each entry is in force from its offset to the next one's
    (the last to ``end``)."""
    import numpy as np

    if not schedule:
        return float("nan")
    tasks = sorted(schedule[0][1])
    edges = [float(o) for o, _ in schedule] + [max(float(end), float(schedule[-1][0]))]
    spans = np.diff(edges)
    kls = [kl_uniform(np.array([w.get(t, 0.0) for t in tasks], dtype=np.float64)) for _, w in schedule]
    if spans.sum() <= 0:  # nothing trained past the first entry
        return float(kls[-1])
    return float(np.dot(spans, kls) / spans.sum())


def hardest_tasks(uniform_test_losses: list[dict]) -> list[str]:
    """The quarter of tasks (at least one) with the highest mean test loss
    over the given uniform runs' ``{task: loss}``; ties by name."""
    tasks = sorted(set().union(*uniform_test_losses)) if uniform_test_losses else []
    mean = {t: sum(d[t] for d in uniform_test_losses if t in d) / sum(t in d for d in uniform_test_losses)
            for t in tasks}
    mean = {t: v for t, v in mean.items() if math.isfinite(v)}
    k = max(1, math.ceil(len(mean) / 4)) if mean else 0
    return sorted(mean, key=lambda t: (-mean[t], t))[:k]


def add_mixture_movement(client, df):
    """``df`` with :data:`METRICS` per run, and ``hardest_tasks`` (the names,
    joined) per pool, model and budget where uniform ran."""
    import numpy as np

    df = df.copy()
    for key, _, _ in METRICS:
        df[key] = np.nan
    df["hardest_tasks"] = ""
    ledgers = {}
    for idx, row in df.iterrows():
        schedule = artifact_json(client, row["run_id"], "mixture_schedule.json") or []
        df.loc[idx, "kl_uniform_mean"] = mean_kl_uniform(schedule, row.get("train_tokens", 0.0))
        ledgers[idx] = artifact_json(client, row["run_id"], "ledger.json") or {}
    names = df["policy_name"] if "policy_name" in df else df["policy"]
    for _, g in df.groupby(by(df, "model", "budget_value")):
        uniform = g[names[g.index] == "uniform"]
        losses = [{t: float(row[f"test_loss/{t}"]) for t in ledgers[idx] if f"test_loss/{t}" in row
                   and row[f"test_loss/{t}"] == row[f"test_loss/{t}"]} for idx, row in uniform.iterrows()]
        hard = hardest_tasks([d for d in losses if d])
        if not hard:
            continue

        def on_hard(idx, hard=hard) -> float:
            return float(sum(ledgers[idx].get(t, {}).get("train_tokens", 0) for t in hard))

        base = np.mean([on_hard(i) for i in uniform.index])
        df.loc[g.index, "hardest_tasks"] = ", ".join(hard)
        if base > 0:
            for idx in g.index:
                df.loc[idx, "hardest_tokens_vs_uniform"] = on_hard(idx) / base
    return df


def section(df, table) -> list[str]:
    """The report's lines on mixture movement (``table``: the report's table
    writer)."""
    if df["kl_uniform_mean"].isna().all():
        return []
    lines = ["## Does the mixture move", "",
             "KL from uniform: KL(p ‖ uniform) of the applied mixture averaged over training tokens "
             "(0: uniform). Tokens on hardest tasks: the run's training tokens on the quarter of tasks "
             "with the highest mean test loss under uniform (same pool and budget), over uniform's; above 1 "
             "means more tokens to them than uniform gives. Test loss only names the tasks here; no "
             "policy reads it.", ""]
    for names, g in df[df["hardest_tasks"] != ""].groupby(by(df, "model", "budget_value", "budget"), sort=True):
        names = [n for i, n in enumerate(names) if i != len(names) - 2]  # the budget's label, not its value
        lines.append(f"- hardest tasks ({', '.join(str(n) for n in names)}): {g['hardest_tasks'].iloc[0]}")
    return lines + ["", *table(df, METRICS), ""]
