"""``ray job submit`` of the smoke space against a local ``ray start --head``.

The head is started by this test on free ports with its own temp dir, bound
to 127.0.0.1, and stopped by this test alone (its processes are found by that
temp dir: ``ray stop`` would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_smoke_space(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    # Short: Ray's socket paths under the temp dir must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rmx-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Token authentication, with a token of this test's own: the head and
    # the job client read it from RAY_AUTH_TOKEN_PATH.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RAYMIX_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    start = subprocess.run(
        [ray_cli, "start", "--head", "--num-cpus=2", "--object-store-memory=200000000",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        out = tmp_path / "sweep"
        t0 = time.monotonic()
        submit = [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                  "--", sys.executable, "-m", "raymix.sweep", "--space", "tune_spaces/smoke.yaml",
                  "--output", str(out), "--no-report"]
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=840, cwd=REPO)
            logs = job.stdout + job.stderr
            # The head's dashboard agent comes up a few seconds after `ray start`.
            if "No available agent to submit job" not in logs or time.monotonic() - t0 > 120:
                break
            time.sleep(3)
        assert job.returncode == 0, logs[-5000:]
        assert "succeeded" in logs, logs[-3000:]
        print(f"ray job submit of the smoke space: {time.monotonic() - t0:.0f} s")

        summary = json.loads((out / "sweep_summary.json").read_text())
        assert [t["status"] for t in summary["trials"]] == ["FINISHED", "FINISHED"]
        state = json.loads((out / "sweep.json").read_text())
        client = MlflowClient(state["tracking_uri"])
        children = client.search_runs([state["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
        assert sorted(r.data.params["policy.name"] for r in children) == ["proportional", "uniform"]
        assert all(r.info.status == "FINISHED" for r in children)
        assert all("worst_val_loss" in r.data.metrics for r in children)
        assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
