"""What per-task numbers become in MLflow: one metric per task up to
``tracking.per_task_metrics_max_tasks`` tasks, aggregates above it.

Every place that builds per-task metrics (the loop's training metrics and
loss curve, the policies' signal metrics, the run's summary) gives them as a
:class:`PerTask` under a key template holding ``{task}`` (for example
``"signal/{task}/val_loss"``) and passes the whole dict through a
:class:`TaskMetricsView`. Up to the threshold the view expands each template
into one key per task, as a person reads a 20-task run; above it, each
template becomes a fixed set of ``tasks/<template without {task}>/<statistic>``
keys (worst, mean, quantiles of losses; entropy, KL from uniform and the
extremes of weights), so the number of distinct metric keys does not grow
with the task count, and the full per-task series are kept in a long table
(step, metric, task, value) that is written as a Parquet artifact
(``per_task/<name>.parquet``).

This module imports neither torch nor Ray nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

KINDS = ("loss", "weight", "count", "score")
"""``loss``: lower is better (worst = max); ``weight``: a distribution over
tasks; ``count``: a non-negative amount (tokens); ``score``: higher is better."""
QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class PerTask:
    """One number per task (in the pool's task order; NaN where there is
    none) and what kind of number it is (one of :data:`KINDS`)."""

    values: np.ndarray
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"PerTask kind {self.kind!r} is not one of {KINDS}")


def per_task(values, kind: str) -> PerTask:
    return PerTask(np.asarray(values, dtype=np.float64), kind)


def aggregate_name(template: str) -> str:
    """``signal/{task}/val_loss`` -> ``tasks/signal/val_loss``."""
    parts = [p for p in template.split("/") if p != "{task}"]
    return "/".join(["tasks"] + parts)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution; zero weights add nothing."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def kl_uniform(p: np.ndarray) -> float:
    """KL(p || uniform) = log T - H(p): how far a mixture is from uniform."""
    return float(np.log(len(p)) - entropy(p)) if len(p) else float("nan")


def aggregates(values: np.ndarray, kind: str) -> dict[str, float]:
    """The statistics a template is reduced to (the same set at any task count)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    nan = float("nan")
    out: dict[str, float] = {"tasks_with_value": float(len(finite))}
    if kind == "weight":
        p = np.clip(np.nan_to_num(v, nan=0.0), 0.0, None)
        total = p.sum()
        p = p / total if total > 0 else p
        h = entropy(p) if total > 0 else nan
        out.update({"entropy": h, "kl_uniform": kl_uniform(p) if total > 0 else nan,
                    "effective_tasks": float(np.exp(h)) if total > 0 else nan,
                    "max": float(p.max()) if len(p) else nan, "min": float(p.min()) if len(p) else nan})
    else:
        worst, best = (finite.min, finite.max) if kind == "score" else (finite.max, finite.min)
        out.update({"worst": float(worst()) if len(finite) else nan, "best": float(best()) if len(finite) else nan,
                    "mean": float(finite.mean()) if len(finite) else nan})
        if kind == "count":
            out["sum"] = float(finite.sum())
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(finite, q)) if len(finite) else nan
    return out


def top_tasks(values, tasks: list[str], k: int, largest: bool = True) -> list[tuple[str, float]]:
    """The ``k`` tasks with the largest (or smallest) finite values, best first."""
    v = np.asarray(values, dtype=np.float64)
    idx = [i for i in np.argsort(-v if largest else v, kind="stable") if np.isfinite(v[i])][:k]
    return [(tasks[i], float(v[i])) for i in idx]


class TaskMetricsView:
    """Turns a metrics dict holding :class:`PerTask` values into plain MLflow
    metrics (see the module's docstring), keeping the per-task series above
    the threshold for :meth:`table`."""

    def __init__(self, tasks: list[str], max_tasks: int):
        self.tasks = list(tasks)
        self.max_tasks = max_tasks
        self.rows: list[tuple[int, str, np.ndarray]] = []

    @property
    def per_task_keys(self) -> bool:
        """Whether each task gets its own metric keys (the task count is at most the threshold)."""
        return len(self.tasks) <= self.max_tasks

    def __call__(self, metrics: dict, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(value, PerTask):
                out[key] = value
                continue
            if "{task}" not in key:
                raise ValueError(f"per-task metric key {key!r} holds no '{{task}}'")
            if len(value.values) != len(self.tasks):
                raise ValueError(f"per-task metric {key!r}: {len(value.values)} values for {len(self.tasks)} tasks")
            if self.per_task_keys:
                out.update({key.replace("{task}", t): float(v) for t, v in zip(self.tasks, value.values)})
            else:
                name = aggregate_name(key)
                out.update({f"{name}/{s}": v for s, v in aggregates(value.values, value.kind).items()})
                self.rows.append((step, key, np.array(value.values, dtype=np.float64)))
        return out

    def table(self):
        """The kept per-task series as a long pyarrow table: step, metric (the
        key template), task, value; None when nothing was kept."""
        if not self.rows:
            return None
        import pyarrow as pa

        T = len(self.tasks)
        steps = np.repeat(np.array([r[0] for r in self.rows], dtype=np.int64), T)
        metric = np.repeat(np.array([r[1] for r in self.rows], dtype=object), T)
        task = np.tile(np.array(self.tasks, dtype=object), len(self.rows))
        value = np.concatenate([r[2] for r in self.rows])
        return pa.table({"step": steps, "metric": pa.array(metric, pa.string()),
                         "task": pa.array(task, pa.string()), "value": value})

    def write(self, directory, name: str) -> Optional[str]:
        """The table as ``directory/<name>.parquet`` (its path), or None when empty."""
        import os

        import pyarrow.parquet as pq

        table = self.table()
        if table is None:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(str(directory), f"{name}.parquet")
        pq.write_table(table, path)
        return path

    # -- a checkpoint part (the loop's): the series kept up to the checkpoint --
    def state_dict(self) -> dict:
        return {"per_task_metric_rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("per_task_metric_rows", []))
