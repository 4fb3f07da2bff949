"""A pool of thousands of tiny tasks prepares, trains and evaluates in one
whole run (in this process: ``runtime.num_workers=0``), and its MLflow run
has the same metric keys as a 20-task run's: per-task numbers become
aggregates above ``tracking.per_task_metrics_max_tasks``, their series
Parquet artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

# Two whole runs (3,000 tasks, then 20): about 2 minutes on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = [
    "model.vocab_size=512",
    "train.micro_batch_size=8",
    "train.log_every=2",
    "budget.tokens=1500",
    "eval.curve_points=1",
    "eval.max_test_examples=1",
    "eval.max_new_tokens=2",
    "eval.suite=null",
    "runtime.num_workers=0",
    "tracking.per_task_metrics_max_tasks=10",
]


def _run(tmp: Path, tasks: int, examples: int) -> tuple[dict, set, MlflowClient]:
    from raymix.bench.task_scaling import write_synthetic_tasks
    from raymix.config import load_config
    from raymix.driver.single import run_single

    src = write_synthetic_tasks(tmp / f"src{tasks}", tasks, examples)
    cfg = load_config(None, TINY + [f"data.sources=[{{kind: jsonl, path: {src}}}]"])
    summary = run_single(cfg, tmp / f"run{tasks}")
    client = MlflowClient(summary["mlflow_tracking_uri"])
    keys = set(client.get_run(summary["mlflow_run_id"]).data.metrics)
    return summary, keys, client


def test_thousands_of_tasks_train_and_evaluate_with_bounded_metrics(ray_local, tmp_path: Path) -> None:
    big, big_keys, client = _run(tmp_path, 3000, 4)  # 2 train, 1 val, 1 test example per task
    assert len(big["val_loss"]) == len(big["test_loss"]) == len(big["ledger"]) == 3000
    assert all(math.isfinite(v) for v in big["val_loss"].values())
    assert all(math.isfinite(v) for v in big["test_loss"].values())
    assert big["train_tokens"] >= 1500
    small, small_keys, _ = _run(tmp_path, 20, 600)  # the same examples in 20 tasks
    assert big_keys == small_keys  # bounded independently of the task count
    assert "tasks/val_loss/worst" in big_keys and not any(k.startswith("val_loss/t") for k in big_keys)
    artifacts = {a.path for a in client.list_artifacts(big["mlflow_run_id"], "per_task")}
    assert artifacts == {"per_task/final.parquet", "per_task/loop.parquet"}
    tags = client.get_run(big["mlflow_run_id"]).data.tags
    assert tags["raymix.worst_tasks_by_val_loss"].count("=") == 5
