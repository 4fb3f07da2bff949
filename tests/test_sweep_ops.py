"""The sweep's operational edges without Ray: resume's MLflow store, space
fields given as null, cluster defaults against a space's own choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymix.errors import RaymixError
from raymix.sweep import load_space

SMOKE = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"


def _no_ray(monkeypatch) -> None:
    import ray

    import raymix.driver.setup as setup

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(setup, "init_ray", lambda cfg: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})


def _finished_sweep(store: str, out: Path) -> dict:
    """A sweep of the smoke space whose every trial FINISHED in ``store``,
    its driver killed before it ended the parent run: what --resume finds."""
    from mlflow.tracking import MlflowClient

    from raymix.config import identity_hash

    space = load_space(SMOKE)
    client = MlflowClient(store)
    exp_id = client.create_experiment(space.name, (out / "mlartifacts").as_uri())
    parent = client.create_run(exp_id, run_name=space.name, tags={"raymix.sweep": space.name}).info.run_id
    for cfg in space.configs():
        child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent,
                                                "raymix.identity": identity_hash(cfg)}).info.run_id
        client.set_terminated(child, "FINISHED")
    out.mkdir(parents=True, exist_ok=True)
    state = {"space": space.name, "parent_run_id": parent, "experiment_id": exp_id, "tracking_uri": store,
             "extra": [], "started": 0.0}
    (out / "sweep.json").write_text(json.dumps(state, indent=1))
    return state


def test_resume_finishes_the_sweep_in_the_store_it_was_started_on(tmp_path: Path, monkeypatch) -> None:
    """A sweep started with ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``)
    resumed without it continues its own parent run in the store sweep.json
    names: it looked in OUTPUT/mlflow.db instead, created the experiment
    there and failed with MLflow's traceback (no such parent run)."""
    from mlflow.tracking import MlflowClient

    from raymix.sweep import run_sweep

    _no_ray(monkeypatch)
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    out = tmp_path / "sweep"
    state = _finished_sweep(store, out)
    result = run_sweep(load_space(SMOKE), [], out, resume=True, report=False)
    assert result["parent_run_id"] == state["parent_run_id"] and result["tracking_uri"] == store
    assert MlflowClient(store).get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert not (out / "mlflow.db").exists()
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["FINISHED", "FINISHED"]


def test_resume_on_a_store_without_the_sweep_is_refused_naming_the_flag(tmp_path: Path, monkeypatch) -> None:
    """``--resume --tracking-uri`` naming a store that does not hold the
    sweep's parent run: a RaymixError naming the flag and the sweep's own
    store, not MLflow's traceback, and no experiment made there."""
    from mlflow.tracking import MlflowClient

    from raymix.sweep import run_sweep

    _no_ray(monkeypatch)
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    out = tmp_path / "sweep"
    _finished_sweep(store, out)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(RaymixError, match=r"--resume: .*parent run .* not in the MLflow store .*other.db.*"
                                          r"--tracking-uri .*elsewhere.db"):
        run_sweep(load_space(SMOKE), [], out, resume=True, report=False, tracking_uri=other)
    assert MlflowClient(other).get_experiment_by_name("smoke") is None


def test_space_fields_given_as_null_mean_their_defaults(tmp_path: Path) -> None:
    """``trial_cpus:`` with no value (YAML null) is the default, as a null
    ``max_concurrent_trials`` or ``base`` is: it was a TypeError traceback
    from ``float(None)`` instead of a sweep or a named error."""
    from raymix import sweep

    p = tmp_path / "nulls.yaml"
    p.write_text("name: x\ntrial_cpus:\nmax_concurrent_trials:\nbase:\ngrid: {seed: [0]}\n")
    space = load_space(p)
    assert space.trial_cpus == 0.05 and space.max_concurrent_trials is None
    assert sweep.main(["--space", str(p), "--dry-run"]) == 0


def test_cluster_default_keeps_a_spaces_runtime_mapping() -> None:
    """A space or ``--set`` that gives ``runtime.max_failures`` inside a
    ``runtime`` mapping has given it: joining a cluster must not override it
    with the default retries (it was applied after, silently)."""
    from raymix.sweep import Space, cluster_defaults

    cluster = {"RAY_ADDRESS": "http://127.0.0.1:8265"}
    space = Space(name="x", base={"runtime": {"max_failures": 0}}, grid={"seed": [0]})
    extra = cluster_defaults(space, [], env=cluster)
    assert [c.runtime.max_failures for c in space.configs(extra)] == [0]
    grid = Space(name="x", grid={"runtime": [{"max_failures": 1}, {"max_failures": 2}]})
    extra = cluster_defaults(grid, [], env=cluster)
    assert [c.runtime.max_failures for c in grid.configs(extra)] == [1, 2]
    plain = Space(name="x", grid={"seed": [0]})
    assert cluster_defaults(plain, ["runtime={max_failures: 0}"], env=cluster) == []
    assert cluster_defaults(plain, ["runtime={num_cpus: 2}"], env=cluster) == ["runtime.max_failures=3"]


def _tracker(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from raymix.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", (tmp_path / "mlartifacts").as_uri())
    return RunTracker.attached(uri, client.create_run(exp).info.run_id, exp)


def test_a_failed_summary_write_leaves_no_summary_json(tmp_path: Path, monkeypatch) -> None:
    """summary.json marks a run finished (a new run there is refused, and
    --resume too; a sweep reuses it as the trial's result). A write cut
    short (a full disk) left half a file, and a store that refused the
    artifact left a whole one beside a FAILED MLflow run: either way the run
    could be neither resumed nor run again. Now neither leaves one."""
    import errno

    from raymix.driver.setup import RoundsRun

    out = tmp_path / "run"
    out.mkdir()
    tracker = _tracker(tmp_path)
    summary = {"policy": "uniform", "curve": list(range(2000))}
    real_write = Path.write_text

    def full_disk(self, data, *a, **k):
        if self.name.startswith("summary.json"):
            real_write(self, data[: len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_disk)
        with pytest.raises(OSError):
            RoundsRun(out, None, tracker, 0.0).write_summary(summary)
    assert not (out / "summary.json").exists()

    def refused(*a, **k):
        raise RuntimeError("artifact store refused the upload")

    with monkeypatch.context() as m:
        m.setattr(tracker.client, "log_artifact", refused)
        with pytest.raises(RuntimeError):
            RoundsRun(out, None, tracker, 0.0).write_summary(summary)
    assert not (out / "summary.json").exists()

    RoundsRun(out, None, tracker, 0.0).write_summary(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [f.path for f in tracker.client.list_artifacts(tracker.run_id)] == ["summary.json"]



def _fake_trials(monkeypatch) -> list:
    """Trials that finish at once: each a FINISHED MLflow run under the
    sweep's parent run with the trial's identity (no pool, no training).
    Returns the list of the trials' configs each tuner was given."""
    from mlflow.tracking import MlflowClient

    import raymix.driver.setup as setup
    from raymix.config import identity_hash

    ran: list = []

    def runs_as_trials(trainable, params, configs, *a, **k):
        class Tuner:
            def fit(self):
                client = MlflowClient(params["tracking_uri"])
                exp = client.get_experiment_by_name(params["experiment"]).experiment_id
                for cfg in configs:
                    child = client.create_run(exp, tags={"mlflow.parentRunId": params["parent_run_id"],
                                                         "raymix.identity": identity_hash(cfg)}).info.run_id
                    client.set_terminated(child, "FINISHED")
                ran.append(list(configs))
                return []
        return Tuner()

    monkeypatch.setattr(setup, "prepare_model_and_data", lambda cfg, out: None)
    monkeypatch.setattr(setup, "runs_as_trials", runs_as_trials)
    return ran


def test_resume_after_the_space_file_changed_what_trials_compute_is_refused(tmp_path: Path, monkeypatch) -> None:
    """The space file edited between a sweep's start and its ``--resume``
    (a base value that changes results): the resumed sweep ran the new
    grid's trials under the old sweep's parent run, beside the finished
    trials of the old grid, the mix its --set check refuses. Refused naming
    the space, before anything is written; an edit that changes no trial's
    identity (runtime.*, the description) resumes."""
    from raymix.sweep import run_sweep

    _no_ray(monkeypatch)
    ran = _fake_trials(monkeypatch)
    space_file = tmp_path / "s.yaml"
    space_file.write_text(SMOKE.read_text())
    out = tmp_path / "sweep"
    run_sweep(load_space(space_file), [], out, resume=False, report=False)
    assert len(ran) == 1 and len(ran[0]) == 2
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    space_file.write_text(SMOKE.read_text().replace("budget.tokens: 4000", "budget.tokens: 5000"))
    with pytest.raises(RaymixError, match=r"--resume: the space of sweep 'smoke' changed since the sweep started"):
        run_sweep(load_space(space_file), [], out, resume=True, report=False)
    assert len(ran) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    space_file.write_text(SMOKE.read_text().replace("runtime.cpus_per_worker: 0.5", "runtime.cpus_per_worker: 0.25")
                          .replace("Tiny synthetic pool", "A tiny synthetic pool"))
    result = run_sweep(load_space(space_file), [], out, resume=True, report=False)
    assert len(ran) == 1 and result["trials"] == 2


def test_a_deleted_mlflow_experiment_is_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    """An experiment deleted in the MLflow UI keeps its name (MLflow makes no
    new one under it): a run or sweep logging to it died with MLflow's
    'must be in the active state' traceback. Refused naming the experiment,
    the field and what to do; the sweep starts nothing."""
    from mlflow.tracking import MlflowClient

    from raymix.config import load_config
    from raymix.sweep import run_sweep
    from raymix.tracking import RunTracker

    _no_ray(monkeypatch)
    ran = _fake_trials(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name in ("raymix", "smoke"):
        client.delete_experiment(client.create_experiment(name))
    with pytest.raises(RaymixError, match=r"MLflow experiment 'raymix' .* deleted.*tracking.experiment"):
        RunTracker(load_config(None, [f"tracking.tracking_uri={uri}"]), tmp_path / "run")
    with pytest.raises(RaymixError, match=r"MLflow experiment 'smoke' .* deleted.*name"):
        run_sweep(load_space(SMOKE), [], tmp_path / "sweep", resume=False, report=False, tracking_uri=uri)
    assert not ran and not (tmp_path / "sweep" / "sweep.json").exists()
    assert client.search_runs([client.get_experiment_by_name("smoke").experiment_id], run_view_type=3) == []


def test_resumed_sweep_ends_a_finished_trials_run_left_running(tmp_path: Path, monkeypatch) -> None:
    """A trial killed (or its store briefly gone) after its summary.json was
    in place but before its MLflow run was ended: the run stayed RUNNING, so
    every --resume reused the summary, found no FINISHED run for the trial
    and failed the sweep ('trials without a finished MLflow run'), forever.
    The resumed trial ends that run FINISHED (summary.json is written only
    once everything is logged)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from raymix import sweep
    from raymix.config import identity_hash, load_config

    monkeypatch.setattr(tune, "report", lambda metrics: reported.append(metrics))
    reported: list = []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("smoke")
    parent = client.create_run(exp).info.run_id
    space = load_space(SMOKE)
    overrides = space.overrides()[0]
    cfg = load_config(None, overrides + [f"tracking.tracking_uri={uri}", "tracking.experiment=smoke"])
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "raymix.identity": identity_hash(cfg)})
    out = tmp_path / "sweep" / "trials" / sweep.trial_name(cfg)
    out.mkdir(parents=True)
    keys = ("worst_val_loss", "mean_val_loss", "worst_test_loss", "mean_test_loss", "mean_test_exact_match",
            "train_tokens", "budget_tokens", "wall_seconds")
    (out / "summary.json").write_text(json.dumps({**dict.fromkeys(keys, 1.0), "mlflow_run_id": child.info.run_id}))
    sweep._trial({"overrides": overrides, "sweep_dir": str(tmp_path / "sweep"), "parent_run_id": parent,
                  "tracking_uri": uri, "experiment": "smoke"})
    assert reported and reported[0]["mlflow_run_id"] == child.info.run_id
    assert client.get_run(child.info.run_id).info.status == "FINISHED"
    assert sweep.finished_identities(client, exp, parent) == {identity_hash(cfg): child.info.run_id}
