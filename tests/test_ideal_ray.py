"""IDEAL end to end: two rounds in process (Ray Train local mode) on a tiny
pool, the influence step between them, the compute of all rounds, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_IN_PROCESS

from raymix.config import load_config

pytestmark = pytest.mark.ray

TINY = [
    *TINY_IN_PROCESS,
    "policy.name=ideal",
    "policy.ideal.rounds=2",
    "policy.ideal.curvature=kfac",
    "policy.ideal.examples_per_task=4",
    "policy.ideal.reference_examples_per_task=4",
]


@pytest.mark.timeout(600)
def test_ideal_two_rounds_end_to_end(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from raymix.driver import run
    from raymix.driver.ideal import ROUND_TAG, SCORES_FILE
    from raymix.policies.ideal.influence import ideal_volumes

    cfg = load_config(None, TINY)
    out = tmp_path / "ideal"
    summary = run(cfg, out)
    assert summary["policy"] == "ideal"
    budget = summary["budget_tokens"]
    assert budget == 6000
    rounds = [json.loads((out / f"round{r}" / "summary.json").read_text()) for r in (1, 2)]

    # Two nested runs, FINISHED, under the IDEAL run, tagged as its rounds.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    for r, s in enumerate(rounds, 1):
        run_r = client.get_run(s["mlflow_run_id"])
        assert run_r.info.status == "FINISHED"
        assert run_r.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        assert run_r.data.tags[ROUND_TAG] == str(r)
    parent = client.get_run(summary["mlflow_run_id"]).data.metrics

    # Round 1: uniform volumes summing exactly to the budget.
    tasks = list(rounds[0]["ledger"])
    v1 = np.array([summary["ideal_rounds"][0]["volumes"][t] for t in tasks])
    assert v1.sum() == budget and v1.max() - v1.min() <= 1
    # Round 2's mixture is the volume step computed from round 1's scores.
    scores = json.loads((out / "round1" / SCORES_FILE).read_text())["scores"]
    s1 = np.array([scores[t] for t in tasks])
    assert np.all(np.isfinite(s1)) and np.any(s1 != 0)
    # Stepped from the volumes round 1 trained under the repetition cap.
    c1 = np.array([summary["ideal_rounds"][0]["capped_volumes"][t] for t in tasks])
    assert c1.sum() == budget
    v2 = ideal_volumes(c1, s1, m=0.15, budget=budget, integer=True)
    assert not np.array_equal(v1, v2)
    weights2 = load_config(str(out / "round2" / "config.yaml")).policy.weights
    # The round samples examples with the weights that give the volumes'
    # token shares (raymix.policies.example_weights): a few float64
    # operations and YAML's 17-digit round trip, rtol 1e-12. The applied
    # mixture is renormalised by the mixer: rtol 1e-9.
    from raymix.policies import token_shares

    pool = summary["pool"]
    per_example = np.array([pool["tokens_per_task"][t] / pool["examples_per_task"][t] for t in tasks])
    np.testing.assert_allclose(token_shares(np.array([weights2[t] for t in tasks]), per_example), v2 / budget,
                               rtol=1e-12)
    applied = rounds[1]["mixture_schedule"][0][1]
    np.testing.assert_allclose([applied[t] for t in tasks], [weights2[t] for t in tasks], rtol=1e-9)
    for t in tasks:
        # MLflow stores metrics as float64: the JSON's value, default rel 1e-6.
        assert parent[f"ideal/round1/score/{t}"] == pytest.approx(scores[t])
        assert parent[f"ideal/round2/volume/{t}"] == v2[tasks.index(t)]

    # Every round retrains from the same base model.
    a = load_file(str(out / "round1" / "init_model" / "model.safetensors"))
    b = load_file(str(out / "round2" / "init_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)

    # Ledger semantics, per round and in the IDEAL run.
    for s in rounds:
        assert 0 <= s["train_tokens"] - budget <= s["global_batch_tokens"]
        assert sum(row["train_tokens"] for row in s["ledger"].values()) == s["train_tokens"]
    infl = summary["influence_meta_tokens"]
    assert infl > 0
    assert summary["train_tokens"] == rounds[1]["train_tokens"]
    assert summary["meta_tokens"] == rounds[1]["meta_tokens"] + infl
    assert sum(row["train_tokens"] for row in summary["ledger"].values()) == summary["train_tokens"]
    assert sum(row["meta_tokens"] for row in summary["ledger"].values()) == summary["meta_tokens"]

    # The compute of all rounds, next to the final round's own.
    assert summary["total_train_tokens_all_rounds"] == sum(s["train_tokens"] for s in rounds)
    assert summary["total_meta_tokens_all_rounds"] == sum(s["meta_tokens"] for s in rounds) + infl
    # A float64 sum of a few timings, in another order than the run's.
    assert summary["total_wall_seconds_all_rounds"] == pytest.approx(
        summary["phase_seconds"]["setup"] + sum(s["wall_seconds"] for s in rounds) + summary["influence_seconds"])
    assert summary["total_wall_seconds_all_rounds"] <= summary["wall_seconds"]
    assert summary["final_round"]["train_tokens"] == rounds[1]["train_tokens"]
    assert parent["total_train_tokens_all_rounds"] == summary["total_train_tokens_all_rounds"]
    assert json.loads((out / "summary.json").read_text())["total_meta_tokens_all_rounds"] == \
        summary["total_meta_tokens_all_rounds"]
    # The final round's loss curve is on the IDEAL run too (the report reads it there).
    def curve(run_id):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "curve/worst_val_loss"))

    assert len(curve(summary["mlflow_run_id"])) >= 2
    assert curve(summary["mlflow_run_id"]) == curve(rounds[1]["mlflow_run_id"])
    assert set(summary["phase_seconds"]) == {"setup", "round1", "influence1", "round2"}

    # --resume of an IDEAL run whose rounds finished trains nothing again:
    # no new round runs, the same scores, the same totals.
    (out / "summary.json").unlink()
    again = run(cfg, out, resume=True)
    children = client.search_runs([summary["mlflow_experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert len(children) == 2
    assert again["total_train_tokens_all_rounds"] == summary["total_train_tokens_all_rounds"]
    assert again["ideal_rounds"][1]["volumes"] == summary["ideal_rounds"][1]["volumes"]
