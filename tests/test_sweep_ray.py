"""A sweep on Ray Tune end to end: nested MLflow runs, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymix.sweep import load_space, run_sweep

pytestmark = pytest.mark.ray
SMOKE = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"


@pytest.mark.timeout(900)
def test_smoke_sweep_resume_and_report(tmp_path: Path, monkeypatch) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    try:
        space = load_space(SMOKE)
        out = tmp_path / "sweep"
        result = run_sweep(space, ["runtime.num_cpus=2"], out, resume=False)
        client = MlflowClient(result["tracking_uri"])
        exp_id = result["experiment_id"]
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
        assert sorted(r.data.params["policy.name"] for r in children) == ["proportional", "uniform"]
        assert all(r.info.status == "FINISHED" for r in children)
        assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
        assert len({r.data.tags["raymix.identity"] for r in children}) == 2
        # Every trial's checkpoint was scored through lm-eval on the configured suite.
        assert all("eval/aggregate" in r.data.metrics for r in children)
        assert all(any(k.startswith("eval/raymix_ood_") for k in r.data.metrics) for r in children)

        # A trial that did not finish: resume re-runs it alone, finished ones are not logged twice.
        victim = next(r for r in children if r.data.params["policy.name"] == "uniform")
        client.set_terminated(victim.info.run_id, "FAILED")
        trial_dir = Path(victim.data.tags["raymix.output_dir"])
        (trial_dir / "summary.json").unlink()
        result2 = run_sweep(space, ["runtime.num_cpus=2"], out, resume=True)
        assert result2["parent_run_id"] == result["parent_run_id"]
        after = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
        statuses = sorted((r.data.params["policy.name"], r.info.status) for r in after)
        assert statuses == [("proportional", "FINISHED"), ("uniform", "FAILED"), ("uniform", "FINISHED")]
        assert list(trial_dir.parent.glob(trial_dir.name + ".interrupted-*"))

        # The report is generated from MLflow and tabulates both policies.
        report = Path(result2["report"]).read_text()
        assert "| uniform |" in report and "| proportional |" in report
        assert "## Evaluation" in report and "aggregate" in report
        assert (Path(result2["report"]).parent / "metrics_vs_budget.png").stat().st_size > 0
        state = json.loads((out / "sweep.json").read_text())
        assert state["parent_run_id"] == result["parent_run_id"]
    finally:
        ray.shutdown()


def test_sweep_refuses_existing_output_without_resume(tmp_path: Path) -> None:
    from raymix.errors import RaymixError

    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    with pytest.raises(RaymixError, match="--resume"):
        run_sweep(load_space(SMOKE), [], out, resume=False)
    with pytest.raises(RaymixError, match="no sweep to resume"):
        run_sweep(load_space(SMOKE), [], tmp_path / "empty", resume=True)
