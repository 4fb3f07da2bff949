"""A sweep on Ray Tune end to end: nested MLflow runs, resume, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_gone

from raymix.sweep import load_space, run_sweep

pytestmark = pytest.mark.ray
SMOKE = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "raymix.sweep", "--space", str(SMOKE), "--output", str(out),
            "--set", "runtime.num_cpus=2", *extra]


# Tasks given by a path relative to where the sweep starts: trials run in
# Ray Tune's trial directories and must still find them.
RELATIVE_TASKS = ["--set", "data.sources=[{kind: jsonl, path: tasks/tasks.jsonl}]"]


@pytest.mark.timeout(900)
def test_smoke_sweep_killed_driver_resume_and_report(tmp_path: Path) -> None:
    """The sweep driver is killed (SIGKILL, its whole process group, Ray
    included) once the first trial finished; ``--resume`` finishes the
    rest: one FINISHED MLflow run per grid point, none twice."""
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "RAYMIX_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    from raymix.bench.task_scaling import write_synthetic_tasks

    write_synthetic_tasks(tmp_path / "tasks", tasks=3, examples=60)
    out = tmp_path / "sweep"
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(_sweep_cmd(out, *RELATIVE_TASKS), stdout=log, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True, cwd=tmp_path)
    t0 = time.monotonic()
    try:
        while p.poll() is None and not list(out.glob("trials/*/summary.json")):
            assert time.monotonic() - t0 < 600, "no trial finished in 10 minutes"
            time.sleep(0.2)
        assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    state = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    assert client.get_run(state["parent_run_id"]).info.status == "RUNNING"  # killed, never ended

    r = subprocess.run(_sweep_cmd(out, *RELATIVE_TASKS, "--resume"), env=env, capture_output=True, text=True,
                       timeout=800, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "1 already finished, 1 to run" in r.stdout + r.stderr
    result = json.loads(r.stdout[r.stdout.rindex("{\n"):])
    assert result["parent_run_id"] == state["parent_run_id"]

    exp_id = result["experiment_id"]
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    # Grid size, no duplicates: a trial cut mid-run continued its own run.
    assert sorted(r.data.params["policy.name"] for r in children) == ["proportional", "uniform"]
    assert all(r.data.metrics["pool/num_tasks"] == 3 for r in children), "not the relative task file"
    assert all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["raymix.identity"] for r in children}) == 2
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    # Every trial's checkpoint was scored through lm-eval on the configured suite.
    assert all("eval/aggregate" in r.data.metrics for r in children)
    assert all(any(k.startswith("eval/raymix_ood_") for k in r.data.metrics) for r in children)

    summary = json.loads((out / "sweep_summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["FINISHED", "FINISHED"]
    assert {t["mlflow_run_id"] for t in summary["trials"]} == {r.info.run_id for r in children}
    assert all(Path(t["summary"]).exists() for t in summary["trials"])
    # The resumed invocation ran one trial: its training loop over the
    # invocation's wall time, also on the parent run.
    timing = summary["timing"]
    assert timing["trials_timed"] == 1 and 0 < timing["efficiency"] < 1
    assert timing["trial_loop_seconds"] < timing["trial_wall_seconds"] <= timing["sweep_wall_seconds"]
    assert client.get_run(result["parent_run_id"]).data.metrics["sweep/efficiency"] == pytest.approx(
        timing["efficiency"])  # the same float through MLflow's double column: approx only for the JSON round trip

    # The report is generated from MLflow and tabulates both policies.
    report = Path(result["report"]).read_text()
    assert "| uniform |" in report and "| proportional |" in report
    assert "## Evaluation" in report and "aggregate" in report
    assert (Path(result["report"]).parent / "metrics_vs_budget.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_sweep_stops_its_in_process_trial(tmp_path: Path) -> None:
    """A sweep whose trials train in their own process (runtime.num_workers=0)
    is killed with its process group mid-trial: the trial's actor, which Ray
    keeps in a process group of its own, stops at its next step instead of
    training on into the folder a --resume would continue (unchecked it went
    from 8,687 to 28,807 tokens, writing two more checkpoints)."""
    env = {**os.environ, "RAYMIX_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(out, "--set", "runtime.num_workers=0", "--set", "budget.tokens=60000",
                     "--set", "train.checkpoint_tokens=5000", "--set", "eval.suite=null")
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    t0 = time.monotonic()
    try:
        while True:
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 400, "the first trial did not reach 8,000 tokens in 400 s"
            files = list(out.glob("trials/*/progress/rank0.json"))
            try:
                at = json.loads(files[0].read_text()) if files else None
            except ValueError:
                at = None
            if at and at["train_tokens"] >= 8000:
                break
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert at["pid"] != p.pid  # the trial trained in an actor, not in the driver
    deadline = time.monotonic() + 30
    while not process_gone(at["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(at["pid"]), "the trial's actor outlived the sweep driver by 30 s"
    # The step in flight at the kill and the one after the progress was read,
    # each at most micro-batch 16 x 128 tokens: four steps' worth is slack.
    last = json.loads(files[0].read_text())["train_tokens"]
    assert last - at["train_tokens"] <= 4 * 16 * 128, f"the orphaned trial trained on from {at['train_tokens']} to {last}"


def test_sweep_refuses_existing_output_without_resume(tmp_path: Path) -> None:
    from raymix.errors import RaymixError

    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    with pytest.raises(RaymixError, match="--resume"):
        run_sweep(load_space(SMOKE), [], out, resume=False)
    with pytest.raises(RaymixError, match="no sweep to resume"):
        run_sweep(load_space(SMOKE), [], tmp_path / "empty", resume=True)


def test_sweep_efficiency_counts_loops_over_wall() -> None:
    from raymix.sweep import sweep_efficiency

    t = sweep_efficiency([{"train_loop_seconds": 30.0, "wall_seconds": 50.0},
                          {"train_loop_seconds": 10.0, "total_wall_seconds_all_rounds": 40.0}], 60.0)
    assert t["trial_loop_seconds"] == 40.0 and t["trial_wall_seconds"] == 90.0
    assert t["efficiency"] == 40.0 / 60.0 and t["trial_wall_share"] == 1.5  # two trials side by side
