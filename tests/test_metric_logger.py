"""``raymix.tracking.MetricLogger``: the training loop's metrics are held in
memory until a checkpoint covers their step, then written; after a restart
every (key, step) has exactly one value in MLflow, and a batch the store
refused raises instead of vanishing. No Ray: a restart is a new logger on
the same run, as in a restarted rank 0."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raymix.tracking import METRICS_THROUGH_TAG, MetricLogger


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds)."""
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    return client, client.create_experiment("e")


@pytest.fixture
def run(store):
    client, experiment_id = store
    return client, client.create_run(experiment_id).info.run_id


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_commit_writes_buffered_metrics_up_to_the_checkpoint(run) -> None:
    client, run_id = run
    log = MetricLogger(client, run_id)
    for step in range(25):
        log.log({"train/loss": 10.0 - step, "skipped": float("nan"), **{f"m/{i}": i for i in range(40)}}, step)
    log.log({f"wide/{i}": float(i) for i in range(1900)}, 25)  # more than one MLflow batch
    assert _history(client, run_id, "train/loss") == []  # nothing before a checkpoint
    log.commit(10)
    assert _history(client, run_id, "train/loss") == [(s, 10.0 - s) for s in range(11)]
    assert client.get_run(run_id).data.tags[METRICS_THROUGH_TAG] == "10"
    log.commit()
    assert log.buffer == []
    assert _history(client, run_id, "train/loss") == [(s, 10.0 - s) for s in range(25)]
    data = client.get_run(run_id).data.metrics
    assert "skipped" not in data and data["wide/1899"] == 1899.0 and data["m/39"] == 39.0


@pytest.mark.parametrize("restored_step", [0, 10, 20])
def test_a_restart_logs_each_step_once(run, restored_step: int) -> None:
    """The first attempt commits at its checkpoints (steps 10 and 20), logs
    on to step 25 and dies. The restart restores the checkpoint at step 10
    or 20, or none (0: no checkpoint was registered yet, or the one at 20
    was reported but not registered when the worker died), trains again
    from there with other values, and finishes at step 30."""
    client, run_id = run
    first = MetricLogger(client, run_id)
    for step in range(1, 26):
        first.log({"train/loss": 1.0}, step)
        if step in (10, 20):
            first.commit(step)
    second = MetricLogger(client, run_id)
    for step in range(restored_step + 1, 31):
        second.log({"train/loss": 2.0}, step)
        if step == 20:
            second.commit(step)
    second.commit()
    history = _history(client, run_id, "train/loss")
    assert [s for s, _ in history] == list(range(1, 31))  # one value per step, none missing
    # Steps committed by the first attempt keep its values; the lost
    # interval (21..25) and the rest are the restarted attempt's.
    assert history == [(s, 1.0 if s <= 20 else 2.0) for s in range(1, 31)]


def test_commit_raises_when_the_store_refuses_a_batch(run) -> None:
    client, run_id = run
    log = MetricLogger(client, run_id)
    client.delete_run(run_id)  # the store refuses to log to a deleted run
    log.log({"train/loss": 1.0}, 0)
    with pytest.raises(Exception, match="(?i)run"):
        log.commit()
