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


class _Stop(Exception):
    pass


def test_regmix_swarm_has_no_two_proxies_of_one_identity(tmp_path: Path, monkeypatch) -> None:
    """Weights under ``min_weight`` are dropped, so a concentrated draw is
    one-hot, and two one-hot draws on one task are the same mixture: the same
    proxy identity, hence the same folder. The swarm then had two proxies in
    one folder (trained by two Tune trials at once when proxies train side by
    side), counted twice in the compute totals, and the same point on both
    sides of a k-fold split. Here (23 tasks, the default options, swarm seed
    0) rows 5 and 7 were both one-hot on task 14."""
    from types import SimpleNamespace

    import numpy as np

    import raymix.driver.regmix as regmix
    from raymix.config import identity_hash

    tokens = np.random.default_rng(0).integers(1000, 20000, 23)
    tasks = tuple(f"t{i:02d}" for i in range(23))
    pool = SimpleNamespace(tasks=tasks, train_tokens=lambda: tokens, train_examples=lambda: tokens // 50,
                           pool_tokens=int(tokens.sum()))
    monkeypatch.setattr(regmix, "init_ray", lambda cfg: None)
    monkeypatch.setattr(regmix, "prepare_model_and_data", lambda cfg, out: (None, None, pool, None))
    seen: list = []

    def train_swarm(cfg, configs, swarm_root, parent_run_id, uri):
        seen.extend(configs)
        raise _Stop

    monkeypatch.setattr(regmix, "train_swarm", train_swarm)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["policy.name=regmix", "eval.suite=null", f"tracking.tracking_uri={uri}",
                             f"budget.tokens={int(tokens.sum()) // 10}"])
    with pytest.raises(_Stop):
        regmix.run_regmix(cfg, tmp_path / "run")
    assert len(seen) == cfg.policy.regmix.proxy_runs
    assert len({identity_hash(c) for c in seen}) == len(seen)


def test_distinct_swarm_keeps_its_other_rows_and_its_prefix() -> None:
    """Only the repeated row is drawn again (the swarms already trained keep
    their other proxies), and the first k rows of a larger swarm are still
    the swarm of k."""
    import numpy as np

    from raymix.config_regmix import RegmixConfig
    from raymix.policies.regmix import dirichlet_centre, sample_mixtures

    tokens = np.random.default_rng(0).integers(1000, 20000, 23)
    c, cap, budget = dirichlet_centre(tokens, 0.5), tokens * 1e3, tokens.sum() / 10
    plain = sample_mixtures([0, 0], c, 32, RegmixConfig(), cap, budget)
    swarm = sample_mixtures([0, 0], c, 32, RegmixConfig(), cap, budget, distinct=True)
    changed = [i for i in range(32) if not (plain[i] == swarm[i]).all()]
    assert changed == [7] and len(np.unique(swarm, axis=0)) == 32
    np.testing.assert_array_equal(sample_mixtures([0, 0], c, 9, RegmixConfig(), cap, budget, distinct=True),
                                  swarm[:9])


def test_regmix_predicts_uniform_as_the_uniform_policy_trains_it(tmp_path: Path, monkeypatch) -> None:
    """The report sets RegMix's predicted target for "uniform" beside the
    `uniform` policy's run, which is uniform per example: in the regression's
    units (token shares) that is each task's share of tokens per example,
    not 1/K of the tokens (which it predicted before)."""
    from types import SimpleNamespace

    import numpy as np

    import raymix.driver.regmix as regmix
    import raymix.policies.regmix as policies_regmix
    from raymix.policies import PoolInfo, token_shares, tokens_per_example

    tokens = np.random.default_rng(0).integers(1000, 20000, 6)
    examples = np.array([10, 20, 40, 80, 160, 320])  # tokens per example differ from task to task
    tasks = tuple(f"t{i}" for i in range(6))
    pool = SimpleNamespace(tasks=tasks, train_tokens=lambda: tokens, train_examples=lambda: examples,
                           pool_tokens=int(tokens.sum()))
    monkeypatch.setattr(regmix, "init_ray", lambda cfg: None)
    monkeypatch.setattr(regmix, "prepare_model_and_data", lambda cfg, out: (None, None, pool, None))
    rng = np.random.default_rng(1)

    def train_swarm(cfg, configs, swarm_root, parent_run_id, uri):
        return [{"ledger": {t: {"train_tokens": int(rng.integers(1, 1000))} for t in tasks},
                 "val_loss": {t: float(rng.uniform(1, 3)) for t in tasks}, "train_tokens": 1, "meta_tokens": 0,
                 "identity": str(i), "mlflow_run_id": str(i), "wall_seconds": 0.0} for i in range(len(configs))]

    predicted: list = []

    class Recording(policies_regmix.MixtureRegression):
        def predict(self, X):
            predicted.append(np.array(X))
            return super().predict(X)

    def final_round(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(regmix, "train_swarm", train_swarm)
    monkeypatch.setattr(regmix, "run_round", final_round)
    monkeypatch.setattr(policies_regmix, "MixtureRegression", Recording)
    budget = int(tokens.sum()) // 10
    cfg = load_config(None, ["policy.name=regmix", "policy.regmix.regressor=linear", "policy.regmix.proxy_runs=8",
                             "policy.regmix.candidates=50", "policy.regmix.top_k=4", "eval.suite=null",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"budget.tokens={budget}"])
    with pytest.raises(_Stop):
        regmix.run_regmix(cfg, tmp_path / "run")
    want = token_shares(np.ones(6), tokens_per_example(PoolInfo(tasks, tokens, examples, budget)))
    # The budget is a tenth of the pool at 8 epochs: no cap binds, the shares are the policy's.
    assert any(x.shape == (1, 6) and np.allclose(x[0], want, rtol=1e-12) for x in predicted)
    assert not any(x.shape == (1, 6) and np.allclose(x[0], 1 / 6) for x in predicted)


def test_doremi_reference_model_is_checked_and_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """A reference model given by a relative path reaches the proxy round as
    an absolute one (the proxy reads it in Ray Train workers, whose working
    directory is Ray's, not the driver's); a missing one is refused naming
    the field before any MLflow run or output exists."""
    import raymix.driver.doremi as doremi
    from raymix.errors import RaymixError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "prior" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    base = ["policy.name=doremi", "eval.suite=null", f"tracking.tracking_uri={uri}", "tracking.experiment=rounds"]
    seen: dict = {}

    def run_round(rcfg, rdir: Path, parent_run_id: str, driver: str) -> dict:
        seen[rdir.name] = rcfg.policy.doremi.reference_model
        raise RuntimeError("stop after the first round")

    monkeypatch.setattr(doremi, "run_round", run_round)
    with pytest.raises(RuntimeError, match="stop after the first round"):
        doremi.run_doremi(load_config(None, base + ["policy.doremi.reference_model=prior/model"]), tmp_path / "run")
    assert seen == {"round2_proxy": str(tmp_path.resolve() / "prior" / "model")}  # no reference round

    with pytest.raises(RaymixError, match=r"policy\.doremi\.reference_model: no model directory at prior/missing"):
        doremi.run_doremi(load_config(None, base + ["policy.doremi.reference_model=prior/missing"]),
                          tmp_path / "run2")
    assert not (tmp_path / "run2").exists()
