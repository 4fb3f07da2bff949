"""RegMix end to end in process (Ray Train local mode) on a tiny pool: a
swarm of 4 proxy runs nested under the RegMix run, the regression, the final
run on the chosen mixture, the compute of all runs, the report's section,
and a larger swarm reusing the finished proxy runs."""

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
    "policy.name=regmix",
    "policy.regmix.proxy_runs=4",
    "policy.regmix.proxy_tokens=1500",
    "policy.regmix.folds=2",
    "policy.regmix.regressor=linear",
    "policy.regmix.candidates=500",
    "policy.regmix.top_k=8",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_regmix_swarm_regression_final_run(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raymix.driver import run
    from raymix.driver.regmix import ROUND_TAG
    from raymix.report import write_report

    cfg = load_config(None, TINY)
    out = tmp_path / "regmix"
    summary = run(cfg, out)
    r = summary["regmix"]
    assert summary["policy"] == "regmix" and summary["budget_tokens"] == 6000
    proxies = [json.loads(p.read_text()) for p in sorted((out / "swarm").glob("proxy-*/summary.json"))]
    assert len(proxies) == 4 and len(r["proxies"]) == 4
    # Each proxy a Ray Tune trial of the swarm's experiment.
    trials = [d for d in (out / "swarm" / "ray" / "regmix-swarm").iterdir() if d.name.startswith("_proxy_trial")]
    assert len(trials) == 4, sorted(d.name for d in trials)
    # Every proxy at the proxy budget (the loop stops within one global batch past it).
    for s in proxies:
        assert s["budget_tokens"] == 1500 and 0 <= s["train_tokens"] - 1500 < s["global_batch_tokens"]
        assert s["policy"] == "static"
    # Nested MLflow runs under the RegMix run, tagged as its rounds.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    for p in r["proxies"]:
        run_p = client.get_run(p["mlflow_run_id"])
        assert run_p.info.status == "FINISHED"
        assert run_p.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        assert run_p.data.tags[ROUND_TAG].startswith("proxy")
    final = json.loads((out / "final" / "summary.json").read_text())
    assert client.get_run(final["mlflow_run_id"]).data.tags[ROUND_TAG] == "final"
    # The regression's features are the proxies' ledgers, its targets their worst validation loss.
    tasks = list(final["ledger"])
    by_run = {s["mlflow_run_id"]: s for s in proxies}
    for p in r["proxies"]:
        ledger = by_run[p["mlflow_run_id"]]["ledger"]
        total = sum(row["train_tokens"] for row in ledger.values())
        # Token counts over their total, in float64: 1e-12.
        np.testing.assert_allclose([p["mixture"][t] for t in tasks],
                                   [ledger[t]["train_tokens"] / total for t in tasks], atol=1e-12)
        assert p["target"] == by_run[p["mlflow_run_id"]]["worst_val_loss"]
    assert np.isfinite(r["cv"]["spearman"]) and r["cv"]["relative_error"] > 0
    # The final run trains the chosen mixture (token shares) at the full
    # budget, sampling examples with the weights that give those shares; the
    # mixer's float64 cap renormalises them: rtol 1e-9.
    weights = load_config(str(out / "final" / "config.yaml")).policy.weights
    np.testing.assert_allclose([weights[t] for t in tasks], [r["sampling_weights"][t] for t in tasks], rtol=1e-9)
    assert final["budget_tokens"] == 6000
    # Compute of all runs: the proxies' tokens plus the final run's.
    assert summary["total_train_tokens_all_rounds"] == sum(s["train_tokens"] for s in proxies) + final["train_tokens"]
    assert r["proxy_train_tokens"] == sum(s["train_tokens"] for s in proxies)
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["regmix/proxy_runs"] == 4 and "regmix/cv_spearman" in metrics
    text = write_report(summary["mlflow_tracking_uri"], "raymix", tmp_path / "report").read_text()
    assert "## RegMix" in text and "held-out Spearman" in text
    assert text.count("| regmix") >= 1  # one row: the proxies and the final run are not trials

    # A larger swarm sharing the folder: the first 4 proxies are reused, one is trained.
    cfg5 = load_config(None, TINY + ["policy.regmix.proxy_runs=5", f"policy.regmix.swarm_dir={out / 'swarm'}",
                                     f"tracking.tracking_uri={summary['mlflow_tracking_uri']}"])
    s5 = run(cfg5, tmp_path / "regmix5")
    ids5 = [p["mlflow_run_id"] for p in s5["regmix"]["proxies"]]
    assert ids5[:4] == [p["mlflow_run_id"] for p in r["proxies"]]
    assert ids5[4] not in ids5[:4] and len(list((out / "swarm").glob("proxy-*/summary.json"))) == 5
    assert s5["identity"] != summary["identity"]
