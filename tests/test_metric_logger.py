"""``raymix.tracking.MetricLogger``: the training loop's metrics are logged
asynchronously; after ``flush`` every one is in the store, in step order,
and a batch the store refused raises there instead of vanishing."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raymix.tracking import MetricLogger


def test_flush_stores_every_metric(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("e"))
    log = MetricLogger(client, run.info.run_id)
    for step in range(25):
        log.log({"train/loss": 10.0 - step, "skipped": float("nan"), **{f"m/{i}": i for i in range(40)}}, step)
    log.log({f"wide/{i}": float(i) for i in range(1900)}, 25)  # more than one MLflow batch
    log.flush()
    assert log.pending == []
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 10.0 - s) for s in range(25)]
    data = client.get_run(run.info.run_id).data.metrics
    assert "skipped" not in data and data["wide/1899"] == 1899.0 and data["m/39"] == 39.0


def test_flush_raises_when_the_store_refused_a_batch(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("e")
    log = MetricLogger(client, "0" * 32)  # no such run
    log.log({"train/loss": 1.0}, 0)
    with pytest.raises(Exception, match="(?i)run"):
        log.flush()
