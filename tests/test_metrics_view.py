"""``raymix.metrics_view``: per-task metrics are one key per task up to the
threshold and a fixed set of aggregates above it (the full series kept as a
table); the plots stay legible at a thousand tasks."""

from __future__ import annotations

import numpy as np
import pytest

from raymix.metrics_view import TaskMetricsView, aggregates, per_task, top_tasks


def _metrics(T: int, rng) -> dict:
    w = rng.dirichlet(np.ones(T))
    loss = rng.uniform(1.0, 3.0, size=T)
    loss[0] = np.nan  # a task without tokens since the last log
    return {"train/loss": 2.0, "mixture/{task}": per_task(w, "weight"), "loss/{task}": per_task(loss, "loss"),
            "signal/{task}/alignment": per_task(rng.normal(size=T), "score")}


def test_per_task_keys_up_to_the_threshold() -> None:
    tasks = ["a", "b", "c"]
    view = TaskMetricsView(tasks, max_tasks=3)
    out = view({"x": 1.0, "signal/{task}/val_loss": per_task([1.0, 2.0, 3.0], "loss")}, step=5)
    assert out == {"x": 1.0, "signal/a/val_loss": 1.0, "signal/b/val_loss": 2.0, "signal/c/val_loss": 3.0}
    assert view.table() is None  # nothing kept: every number is its own metric


def test_aggregate_keys_do_not_grow_with_the_task_count(tmp_path) -> None:
    rng = np.random.default_rng(0)
    keys = {}
    for T in (65, 300, 3000):
        view = TaskMetricsView([f"t{i}" for i in range(T)], max_tasks=64)
        keys[T] = set(view(_metrics(T, rng), step=1))
    assert keys[65] == keys[300] == keys[3000]
    assert "tasks/mixture/entropy" in keys[300] and "tasks/loss/worst" in keys[300]
    assert "tasks/signal/alignment/worst" in keys[300] and len(keys[300]) < 40


def test_aggregates_and_the_kept_table(tmp_path) -> None:
    import pyarrow.parquet as pq

    tasks = [f"t{i}" for i in range(100)]
    view = TaskMetricsView(tasks, max_tasks=10)
    w = np.full(100, 0.01)
    loss = np.linspace(1.0, 2.0, 100)
    out = view({"mixture/{task}": per_task(w, "weight"), "curve/{task}/val_loss": per_task(loss, "loss")}, 7)
    # Uniform weights: entropy log T, KL 0, 100 effective tasks (float64 sums of 100 terms: 1e-12).
    assert out["tasks/mixture/entropy"] == pytest.approx(np.log(100), abs=1e-12)
    assert out["tasks/mixture/kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert out["tasks/mixture/effective_tasks"] == pytest.approx(100.0, rel=1e-12)
    assert out["tasks/curve/val_loss/worst"] == 2.0 and out["tasks/curve/val_loss/best"] == 1.0
    assert out["tasks/curve/val_loss/mean"] == pytest.approx(1.5, rel=1e-12)  # float64 mean of 100 values
    assert out["tasks/curve/val_loss/q50"] == pytest.approx(1.5, rel=1e-12)
    view({"mixture/{task}": per_task(w * 2, "weight")}, 9)
    table = pq.read_table(view.write(tmp_path, "loop")).to_pandas()
    assert len(table) == 300 and set(table["metric"]) == {"mixture/{task}", "curve/{task}/val_loss"}
    row = table[(table["step"] == 7) & (table["metric"] == "curve/{task}/val_loss") & (table["task"] == "t99")]
    assert row["value"].item() == 2.0
    # A checkpoint round trip keeps the series.
    again = TaskMetricsView(tasks, max_tasks=10)
    again.load_state_dict(view.state_dict())
    assert len(again.table()) == 300


def test_score_worst_is_lowest_and_top_tasks() -> None:
    a = aggregates(np.array([0.2, np.nan, 0.9]), "score")
    assert a["worst"] == 0.2 and a["best"] == 0.9 and a["tasks_with_value"] == 2
    assert top_tasks([0.1, np.nan, 0.5, 0.3], ["a", "b", "c", "d"], 2) == [("c", 0.5), ("d", 0.3)]
    assert top_tasks([0.1, np.nan, 0.5, 0.3], ["a", "b", "c", "d"], 2, largest=False) == [("a", 0.1), ("d", 0.3)]


def test_bad_per_task_metrics_are_refused() -> None:
    view = TaskMetricsView(["a", "b"], max_tasks=1)
    with pytest.raises(ValueError, match="no '{task}'"):
        view({"mixture": per_task([0.5, 0.5], "weight")}, 0)
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        view({"mixture/{task}": per_task([0.2, 0.3, 0.5], "weight")}, 0)
    with pytest.raises(ValueError, match="kind"):
        per_task([1.0], "speed")


def test_mixture_plot_at_a_thousand_tasks(tmp_path) -> None:
    """One row per task, sorted by weight, the extremes named: a figure of
    bounded size whatever the task count."""
    from PIL import Image

    from raymix.tracking import LABEL_ALL_TASKS, LABELLED_TASKS, plot_height, plot_mixture, sparse_labels

    T = 1000
    tasks = [f"task{i:04d}" for i in range(T)]
    rng = np.random.default_rng(1)
    schedule = [(k * 100, dict(zip(tasks, rng.dirichlet(np.ones(T)).tolist()))) for k in range(5)]
    ledger = {t: {"train_tokens": int(rng.integers(0, 100)), "meta_tokens": 0} for t in tasks}
    png = plot_mixture(schedule, ledger, tmp_path / "mixture.png", 500)
    width, height = Image.open(png).size
    # 110 dpi: no taller than a figure that names every task, not 220 inches of rows.
    assert height <= plot_height(LABEL_ALL_TASKS) * 110 + 1 and width <= 13 * 110 + 1
    labels = sparse_labels(tasks)
    assert sum(bool(x) for x in labels) == 2 * LABELLED_TASKS and labels[0] == tasks[0] and labels[-1] == tasks[-1]
