"""DoReMi end to end: reference, proxy and final runs as nested MLflow runs.

    python -m raymix.train --set policy.name=doremi --output DIR

Round 1 (skipped when ``policy.doremi.reference_model`` names a prior run's
model) trains the reference model on the ``baseline`` static mixture.
Round 2, the proxy, trains from the base model under Group DRO against it
(``raymix.policies.doremi``: the signal reads the reference's per-token
losses, the mixer steps alpha) and reports the averaged weights. Round 3
(``final_round``) trains from the base model on those weights as a static
mixture, as the paper's main model. Every round spends the run's budget.

``DIR/summary.json`` is the last round's summary under the DoReMi run's
identity, with every round's tokens (``total_*_all_rounds``, ``doremi_rounds``)
beside the last round's own, and the proxy's ``doremi`` block (its averaged
weights). Resume: a round whose ``summary.json`` exists is not trained again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from raymix.config import RunConfig
from raymix.driver.setup import rounds_run
from raymix.driver.single import log_summary, run_round
from raymix.errors import RaymixError
from raymix.metrics_view import TaskMetricsView, per_task

ROUND_TAG = "raymix.round"
"""Tag of a round's nested run; the report lists the DoReMi run, not its rounds."""


def _round_cfg(cfg: RunConfig, round_name: str, tracking_uri: str, last: bool, **policy) -> RunConfig:
    pol = dataclasses.replace(cfg.policy, **policy)
    tracking = dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri,
                                   run_name=f"{cfg.tracking.run_name or 'doremi'}-{round_name}")
    ev = cfg.eval if last else dataclasses.replace(cfg.eval, suite=None)
    return dataclasses.replace(cfg, policy=pol, tracking=tracking, eval=ev)


def _reference_dir(given: Optional[str]) -> Optional[str]:
    """A given reference model, checked and made absolute in the driver's
    directory before anything starts: the proxy reads it in Ray Train
    workers, which run in directories of their own (a relative path failed
    there, once the driver had opened its MLflow run and started a round)."""
    if given is None:
        return None
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise RaymixError(f"policy.doremi.reference_model: no model directory at {given} ({path}); "
                          "give a prior run's model directory, or leave it unset to train the reference first")
    return str(path)


def run_doremi(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None,
               resume: bool = False) -> dict:
    """:func:`raymix.driver.run` for ``policy.name=doremi`` (its registry entry
    names this driver): same contract (summary.json, one MLflow run)."""
    from raymix.tracking import plot_mixture

    reference = _reference_dir(cfg.policy.doremi.reference_model)
    with rounds_run(cfg, output_dir, parent_run_id, resume, "rounds") as run:
        out, tracker = run.out, run.tracker
        d = cfg.policy.doremi
        rounds: list[tuple[str, dict]] = []
        if reference is None:
            rcfg = _round_cfg(cfg, "reference", tracker.uri, False, name=d.baseline)
            rounds.append(("reference", run_round(rcfg, out / "round1_reference", tracker.run_id, "doremi")))
            _tag(tracker, rounds[-1])
            reference = rounds[-1][1]["model_dir"]
        pcfg = _round_cfg(cfg, "proxy", tracker.uri, not d.final_round,
                          doremi=dataclasses.replace(d, reference_model=reference))
        rounds.append(("proxy", run_round(pcfg, out / "round2_proxy", tracker.run_id, "doremi")))
        _tag(tracker, rounds[-1])
        weights = rounds[-1][1]["doremi"]["weights"]
        if d.final_round:
            fcfg = _round_cfg(cfg, "final", tracker.uri, True, name="static", weights=weights)
            rounds.append(("final", run_round(fcfg, out / "round3_final", tracker.run_id, "doremi")))
            _tag(tracker, rounds[-1])
        summary = _combine(cfg, rounds, run)
        log_summary(tracker, summary, out, plot_mixture, max_tasks=cfg.tracking.per_task_metrics_max_tasks)
        tracker.log_metrics({k: summary[k] for k in ("total_train_tokens_all_rounds", "total_meta_tokens_all_rounds",
                                                     "total_wall_seconds_all_rounds")})
        tasks = list(weights)
        tracker.log_metrics(TaskMetricsView(tasks, cfg.tracking.per_task_metrics_max_tasks)(
            {"doremi/weight/{task}": per_task([weights[t] for t in tasks], "weight")}, 0))
        run.write_summary(summary)
        return summary


def _tag(tracker, round_: tuple[str, dict]) -> None:
    """Tag a round's run as this DoReMi run's round as soon as it finished
    (or was read back): a later round's failure leaves no finished round
    untagged, which the report would list as a trial of its own."""
    name, s = round_
    tracker.client.set_tag(s["mlflow_run_id"], ROUND_TAG, name)


def _combine(cfg: RunConfig, rounds: list[tuple[str, dict]], run) -> dict:
    """The DoReMi run's summary: the last round's, with the proxy's weights and every round's compute."""
    summary = run.combine(cfg, [s for _, s in rounds])
    summary.update({
        "doremi": dict(rounds)["proxy"]["doremi"],
        "doremi_rounds": [{"round": name, "policy": s["policy"], "mlflow_run_id": s["mlflow_run_id"],
                           **{k: s[k] for k in ("train_tokens", "meta_tokens", "wall_seconds", "mean_val_loss",
                                                "worst_val_loss")}} for name, s in rounds],
    })
    return summary
