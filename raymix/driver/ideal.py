"""IDEAL end to end: R training rounds, influence scores between them.

    python -m raymix.train --set policy.name=ideal --output DIR

Round r trains the base model on the static mixture of the current volumes
(weights = n / budget) as an ordinary run, nested under the IDEAL MLflow run
in ``DIR/round<r>``; every round builds the same initial model from the seed
(or loads the same pretrained one), so each round restarts from the base
model. After rounds 1..R-1 the driver loads the round's final checkpoint and
scores every task, s_j = -∇L_refᵀ H⁻¹ ∇L_j (``raymix.policies.ideal.influence``), steps the
volumes the round trained under the repetition cap (``capped_volumes``:
the planned ones where no cap binds) with ``raymix.policies.ideal.next_volumes``
and starts the next round.

``DIR/summary.json`` is the final round's summary (its model, evaluation,
ledger train tokens) under the IDEAL run's identity, with the influence
tokens added to the ledger's ``meta_tokens`` and the compute of all rounds
(``total_*_all_rounds``) next to the final round's own (``final_round``).

Resume: a round whose ``summary.json`` exists is not trained again, an
unfinished round continues from its last checkpoint, and scores already
written (``round<r>/ideal_scores.json``) are not recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from raymix.config import RunConfig
from raymix.driver.setup import (
    budget_tokens,
    init_ray,
    prepare_model_and_data,
    rounds_run,
)
from raymix.driver.single import log_summary, run_round
from raymix.files import write_json
from raymix.metrics_view import TaskMetricsView, per_task

SCORES_FILE = "ideal_scores.json"
ROUND_TAG = "raymix.ideal_round"
"""Tag of a round's nested run; the report lists the IDEAL run, not its rounds."""


def round_config(cfg: RunConfig, r: int, weights: dict[str, float], tracking_uri: str) -> RunConfig:
    """Round ``r``'s run: a static mixture of the round's volumes, logged to
    the IDEAL run's MLflow store. Only the last round is scored on the
    lm-eval suite (earlier rounds' checkpoints only feed the influence scores)."""
    policy = dataclasses.replace(cfg.policy, name="static", weights=weights)
    tracking = dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri,
                                   run_name=f"{cfg.tracking.run_name or 'ideal'}-round{r}")
    ev = cfg.eval if r == cfg.policy.ideal.rounds else dataclasses.replace(cfg.eval, suite=None)
    return dataclasses.replace(cfg, policy=policy, tracking=tracking, eval=ev)


def run_ideal(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None,
              resume: bool = False) -> dict:
    """:func:`raymix.driver.run` for ``policy.name=ideal`` (its registry entry
    names this driver): same contract (summary.json, one MLflow run)."""
    from raymix.policies import PoolInfo
    from raymix.policies.ideal import capped_volumes, initial_volumes, next_volumes, round_weights
    from raymix.policies.ideal.scoring import reference_tasks, score_tasks
    from raymix.tracking import plot_mixture

    with rounds_run(cfg, output_dir, parent_run_id, resume, "rounds") as run:
        out, tracker, t0 = run.out, run.tracker, run.t0
        icfg = cfg.policy.ideal
        init_ray(cfg)
        # The pool and tokenizer the rounds will find cached; the driver needs
        # them for the budget, the initial volumes and the influence batches.
        tokenizer, _, pool, _ = prepare_model_and_data(cfg, out)
        phases = {"setup": time.perf_counter() - t0}
        budget = budget_tokens(cfg, pool.pool_tokens)
        info = PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), budget)
        ref = reference_tasks(cfg, pool.tasks)
        volumes = initial_volumes(icfg, info)
        rounds, summaries, influence_meta = [], [], np.zeros(len(pool.tasks), dtype=np.int64)
        influence_seconds = 0.0
        for r in range(1, icfg.rounds + 1):
            rcfg = round_config(cfg, r, round_weights(volumes, info), tracker.uri)
            rdir = out / f"round{r}"
            print(f"[raymix] ideal: round {r}/{icfg.rounds}, volumes "
                  f"{dict(zip(pool.tasks, volumes.tolist()))}", flush=True)
            t_phase = time.perf_counter()
            s = run_round(rcfg, rdir, tracker.run_id, "ideal")
            phases[f"round{r}"] = time.perf_counter() - t_phase
            tracker.client.set_tag(s["mlflow_run_id"], ROUND_TAG, str(r))
            summaries.append(s)
            trained = capped_volumes(volumes, info, cfg.budget.max_epochs)
            rec = {"round": r, "volumes": dict(zip(pool.tasks, volumes.tolist())),
                   "capped_volumes": dict(zip(pool.tasks, trained.tolist())),
                   "weights": rcfg.policy.weights, "mlflow_run_id": s["mlflow_run_id"],
                   **{k: s.get(k) for k in ("train_tokens", "meta_tokens", "wall_seconds", "worst_val_loss",
                                        "worst_val_task", "mean_val_loss", "worst_test_loss", "mean_test_loss",
                                        "mean_test_exact_match", "val_loss", "test_loss")}}
            metrics = {f"ideal/round{r}/{k}": s.get(k, float("nan")) for k in (
                "train_tokens", "meta_tokens", "wall_seconds", "worst_val_loss", "mean_val_loss", "worst_test_loss",
                "mean_test_loss")}
            metrics[f"ideal/round{r}/volume/{{task}}"] = per_task(volumes, "count")
            if r < icfg.rounds:
                score_file = rdir / SCORES_FILE
                t_phase = time.perf_counter()
                if score_file.exists():
                    sc = json.loads(score_file.read_text())
                else:
                    sc = score_tasks(cfg, s["model_dir"], pool, tokenizer.pad_token_id, ref, r)
                    write_json(score_file, sc, indent=1)  # whole or absent: --resume reads it
                phases[f"influence{r}"] = time.perf_counter() - t_phase
                scores = np.array([sc["scores"][t] for t in pool.tasks])
                beta, volumes = next_volumes(trained, scores, icfg, budget)
                influence_meta += np.array([sc["meta_tokens"][t] for t in pool.tasks], dtype=np.int64)
                influence_seconds += sc["seconds"]
                rec.update({"scores": sc["scores"], "beta": dict(zip(pool.tasks, beta.tolist())),
                            "next_volumes": dict(zip(pool.tasks, volumes.tolist())),
                            "influence_meta_tokens": int(sum(sc["meta_tokens"].values())),
                            "influence_seconds": sc["seconds"], "curvature": sc["curvature"]})
                metrics[f"ideal/round{r}/score/{{task}}"] = per_task(scores, "score")
                metrics[f"ideal/round{r}/beta/{{task}}"] = per_task(beta, "score")
                metrics[f"ideal/round{r}/influence_seconds"] = sc["seconds"]
                metrics[f"ideal/round{r}/influence_meta_tokens"] = rec["influence_meta_tokens"]
            tracker.log_metrics(TaskMetricsView(pool.tasks, cfg.tracking.per_task_metrics_max_tasks)(metrics, 0))
            rounds.append(rec)

        summary = _combine(cfg, summaries, rounds, influence_meta, influence_seconds, run, phases["setup"])
        # This driver's phases (a round's own are in its summary.json); a
        # round finished before a resume takes no time here.
        summary["phase_seconds"] = phases
        tracker.log_json(rounds, "ideal_rounds.json", out)
        log_summary(tracker, summary, out, plot_mixture, max_tasks=cfg.tracking.per_task_metrics_max_tasks)
        tracker.log_metrics({k: summary[k] for k in (
            "total_train_tokens_all_rounds", "total_meta_tokens_all_rounds", "total_wall_seconds_all_rounds",
            "influence_seconds", "influence_meta_tokens")})
        run.write_summary(summary)
        return summary


def _combine(cfg: RunConfig, summaries: list[dict], rounds: list[dict], influence_meta: np.ndarray,
             influence_seconds: float, run, setup_seconds: float) -> dict:
    """The IDEAL run's summary: the final round's, with the influence tokens
    in the ledger's meta tokens and the compute of every round (the driver's
    setup, every round's wall time and the influence scoring, the latter two
    from their records so that a resumed driver still counts them)."""
    summary = run.combine(cfg, summaries, extra_meta_tokens=int(influence_meta.sum()),
                          extra_wall_seconds=setup_seconds + influence_seconds)
    for t, extra in zip(list(summaries[-1]["ledger"]), influence_meta.tolist()):
        summary["ledger"][t]["meta_tokens"] += int(extra)
    summary.update({
        "meta_tokens": summaries[-1]["meta_tokens"] + int(influence_meta.sum()),
        "influence_meta_tokens": int(influence_meta.sum()),
        "influence_seconds": influence_seconds,
        "rounds_wall_seconds": [s["wall_seconds"] for s in summaries],
        "ideal_rounds": rounds,
    })
    return summary
