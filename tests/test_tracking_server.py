"""Concurrent trials log through an MLflow server the sweep starts and stops,
never into one SQLite file from several processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SMOKE = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"

# ``python -m raymix.sweep`` after a local Ray started with retries: Ray's
# raylet gives its dashboard agent a fixed 15 s to start and exits otherwise
# (ray-project/ray#65983), which happens on 2 cores under a load of 15-20
# before raymix runs anything; the sweep then finds Ray started.
SWEEP_WITH_RAY_RETRIES = """
import sys, time, ray
for attempt in range(5):
    try:
        ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
        break
    except Exception as e:
        print(f"local Ray did not start ({e}); again", file=sys.stderr, flush=True)
        ray.shutdown()
        time.sleep(5)
from raymix.sweep import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)  # a loaded machine: up to five Ray starts (below), then two trials
def test_two_concurrent_trials_log_through_the_sweeps_mlflow_server(tmp_path: Path) -> None:
    """Two trials at a time on 2 CPUs (each trains in its own trial process,
    ``runtime.num_workers=0``): the sweep starts ``mlflow server`` on its
    SQLite store, both trials log through it at the same time, and the
    server is gone when the sweep ends. Each trial has exactly one FINISHED
    run holding the metrics of its summary.json, the experiment opens on
    training runs in the UI, and the parent run carries the report."""
    from mlflow.tracking import MlflowClient

    space = yaml.safe_load(SMOKE.read_text())
    space["name"] = "concurrent"
    space["max_concurrent_trials"] = 2
    space["base"].update({"runtime.num_workers": 0, "runtime.cpus_per_worker": 0.5, "eval.suite": None})
    space_file = tmp_path / "concurrent.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    env = {**os.environ, "RAYMIX_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-c", SWEEP_WITH_RAY_RETRIES, "--space", str(space_file), "--output",
                          str(out), "--set", "runtime.num_cpus=2"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=1500)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # what a failed Ray start left behind
        except ProcessLookupError:
            pass
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-5000:]
    assert "2 trials at a time: starting an MLflow server" in logs
    # The sweep's result: the last JSON document that starts a line (Ray
    # forwards the trials' output after it).
    result, _ = json.JSONDecoder().raw_decode(r.stdout[r.stdout.rindex("\n{\n") + 1:])
    assert result["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"

    server_log = (out / "mlflow-server.log").read_text()
    # Trials (not only the driver) logged through the server.
    assert "/api/2.0/mlflow/runs/log-batch" in server_log
    for text in (logs, server_log):
        assert "database is locked" not in text.lower()
    # The server was stopped: nothing listens on its port any more.
    port = int(re.search(r"--port (\d+)", server_log).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"the sweep's MLflow server still answers on {port}"

    client = MlflowClient(result["tracking_uri"])  # the store itself, now that its server is gone
    exp = client.get_experiment(result["experiment_id"])
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert sorted(run.data.params["policy.name"] for run in runs) == ["proportional", "uniform"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert len({run.data.tags["raymix.identity"] for run in runs}) == 2
    # The two trials ran at the same time (each started before the other ended).
    a, b = runs
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time, "trials did not overlap"
    for run in runs:
        summary = json.loads((Path(run.data.tags["raymix.output_dir"]) / "summary.json").read_text())
        for key in ("worst_test_loss", "mean_test_loss", "worst_val_loss", "train_tokens"):
            # The value logged is the summary's float: equal up to MLflow's
            # float64 storage, which round-trips exactly.
            assert run.data.metrics[key] == summary[key], key
        assert client.get_metric_history(run.info.run_id, "curve/worst_test_loss"), "no test-loss curve"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) > 1

    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    best = {k: v for k, v in parent.data.tags.items() if k.startswith("raymix.best.")}
    winner = min(runs, key=lambda run: run.data.metrics["worst_test_loss"])
    assert list(best) == ["raymix.best.t4000"] and winner.info.run_id in best["raymix.best.t4000"]
    assert "| uniform |" in parent.data.tags["mlflow.note.content"]
    listed = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/metrics_vs_budget.png"} <= listed


def test_best_trial_per_budget_by_worst_case_test_loss() -> None:
    import pandas as pd

    from raymix.report import best_per_budget

    df = pd.DataFrame([
        {"run_id": "a", "model": "m", "budget": "4,000 tok", "budget_value": 4000.0, "worst_test_loss": 3.0},
        {"run_id": "b", "model": "m", "budget": "4,000 tok", "budget_value": 4000.0, "worst_test_loss": 2.5},
        {"run_id": "c", "model": "m", "budget": "1%", "budget_value": 0.01, "worst_test_loss": 4.0},
        {"run_id": "d", "model": "m", "budget": "1%", "budget_value": 0.01, "worst_test_loss": float("nan")},
    ])
    assert best_per_budget(df) == {"t4000": "b", "f0.01": "c"}
    two_models = pd.concat([df, df.assign(model="n", run_id=lambda d: d.run_id + "2")])
    assert best_per_budget(two_models) == {"m.t4000": "b", "m.f0.01": "c", "n.t4000": "b2", "n.f0.01": "c2"}


def test_ui_addresses_open_the_training_view() -> None:
    from raymix.tracking import ui_url

    assert ui_url("http://127.0.0.1:5000/", "3") == \
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("http://h:1", "3", "abc") == "http://h:1/#/experiments/3/runs/abc?workflowType=machine_learning"


@pytest.mark.slow  # a real server process: 20-50 s to import MLflow and fail on 2 busy cores
def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    """A backend the server refuses: the sweep fails at once, naming the log
    and quoting it, and no server process is left."""
    from raymix.errors import RaymixError
    from raymix.tracking_server import TrackingServer

    server = TrackingServer("notadb://nowhere", tmp_path / "art", tmp_path / "server.log")
    with pytest.raises(RaymixError, match="server.log"):
        server.start(timeout=120)
    assert server.proc is None
