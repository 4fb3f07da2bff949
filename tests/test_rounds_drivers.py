"""The multi-round drivers' bookkeeping (DoReMi's rounds), with the rounds
themselves faked: no pool, no training, a SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymix.config import load_config


def _fake_rounds(monkeypatch, module, fail: set[str]) -> list[str]:
    """Rounds that finish at once as FINISHED MLflow runs nested under the
    driver's run (or fail, for the round folders named in ``fail``).
    Returns the run ids of the finished rounds, in order."""
    from mlflow.tracking import MlflowClient

    from raymix.config import identity_hash

    finished: list[str] = []

    def run_round(rcfg, rdir: Path, parent_run_id: str, driver: str) -> dict:
        if rdir.name in fail:
            raise RuntimeError(f"{rdir.name} failed")
        client = MlflowClient(rcfg.tracking.tracking_uri)
        exp = client.get_experiment_by_name(rcfg.tracking.experiment).experiment_id
        run_id = client.create_run(exp, tags={"mlflow.parentRunId": parent_run_id,
                                              "raymix.identity": identity_hash(rcfg)}).info.run_id
        client.set_terminated(run_id, "FINISHED")
        finished.append(run_id)
        return {"mlflow_run_id": run_id, "model_dir": str(rdir / "model"), "policy": rcfg.policy.name,
                "train_tokens": 10, "meta_tokens": 0, "wall_seconds": 1.0,
                "doremi": {"weights": {"a": 1.0}}}

    monkeypatch.setattr(module, "run_round", run_round)
    return finished


def test_doremi_round_finished_before_a_failure_is_tagged(tmp_path: Path, monkeypatch) -> None:
    """A DoReMi round that finished is a part of the DoReMi run, not a trial
    of its own (the report skips runs tagged ``raymix.round``). The tags were
    set only after every round had finished: a proxy round that failed left
    the finished reference round untagged, a FINISHED static run that the
    report listed as a trial beside the failed DoReMi run."""
    from mlflow.tracking import MlflowClient

    import raymix.driver.doremi as doremi

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["policy.name=doremi", "eval.suite=null", f"tracking.tracking_uri={uri}",
                             "tracking.experiment=rounds"])
    finished = _fake_rounds(monkeypatch, doremi, fail={"round2_proxy"})
    with pytest.raises(RuntimeError, match="round2_proxy failed"):
        doremi.run_doremi(cfg, tmp_path / "run")
    client = MlflowClient(uri)
    assert len(finished) == 1
    assert client.get_run(finished[0]).data.tags.get(doremi.ROUND_TAG) == "reference"
    parent = client.get_run(client.get_run(finished[0]).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_a_round_cut_off_after_its_summary_is_ended_when_reused(tmp_path: Path) -> None:
    """A round's summary.json is written before its MLflow run is ended: a
    driver killed between the two left the round's run RUNNING, and a
    resumed driver reused the round's summary and left it RUNNING for good
    (the sweep's trial ends such a run; a round did not). Now reusing the
    round ends it FINISHED, as the sweep does for a trial."""
    import json

    from mlflow.tracking import MlflowClient

    from raymix.driver.single import run_round

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("rounds", (tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp).info.run_id
    round_run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    rdir = tmp_path / "run" / "round1"
    rdir.mkdir(parents=True)
    (rdir / "summary.json").write_text(json.dumps({"mlflow_run_id": round_run, "mlflow_tracking_uri": uri,
                                                   "train_tokens": 10}))
    cfg = load_config(None, ["eval.suite=null", f"tracking.tracking_uri={uri}", "tracking.experiment=rounds"])
    s = run_round(cfg, rdir, parent, "ideal")
    assert s["train_tokens"] == 10
    assert client.get_run(round_run).info.status == "FINISHED"
    # A round's run in another store (a swarm shared across stores) is read back, not looked for.
    other = load_config(None, ["eval.suite=null", f"tracking.tracking_uri=sqlite:///{tmp_path / 'other.db'}"])
    assert run_round(other, rdir, parent, "regmix")["train_tokens"] == 10
