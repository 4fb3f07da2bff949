"""RegMix end to end: a swarm of proxy runs, a regression, the final run.

    python -m raymix.train --set policy.name=regmix --output DIR

1. The swarm: ``policy.regmix.proxy_runs`` static mixtures drawn from a
   Dirichlet around the pool's token distribution, capped by
   ``budget.max_epochs`` at the final budget (``raymix.policies.regmix.swarm``);
   each trained as an ordinary static run at the proxy budget (and the
   proxy model preset, if given), nested under the RegMix MLflow run and
   tagged as its round. A proxy run's folder is named by its identity hash
   (``SWARM/proxy-<identity>``, SWARM = ``policy.regmix.swarm_dir`` or
   ``DIR/swarm``), so a finished proxy is reused: by a resumed run, by a
   larger swarm (the first K mixtures of a swarm are those of a smaller
   one), and by the final runs of other seeds that share ``swarm_dir``.
   Each proxy run is a Ray Tune trial (:func:`train_swarm`), as many at a
   time as ``policy.regmix.concurrent_proxies`` or the cluster's CPUs allow;
   an SQLite store is then served by an MLflow server for the swarm
   (:mod:`raymix.tracking_server`), as a sweep's is. Inside a sweep's trial
   (a RegMix run in a tune space) the proxies train one after another in
   that trial's process instead: Ray Tune does not support a Tune run
   nested in a trial (ray-project/ray#36024).
2. The regression (``raymix.policies.regmix.regression``): the mixtures the
   proxies actually trained on (their ledgers) against their per-task
   validation losses; its quality on held-out proxy runs by k-fold; the
   optimum searched over ``candidates`` capped mixtures.
3. The final run: the chosen mixture as a static mixture at the full budget.

``DIR/summary.json`` is the final run's summary under the RegMix run's
identity, with the compute of every run (``total_*_all_rounds``, proxy tokens
included) and the ``regmix`` block (swarm, regression, chosen weights).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from raymix.config import RunConfig, identity_hash
from raymix.driver.setup import (
    budget_tokens,
    check_worker_resources,
    enter_driver_dir,
    init_ray,
    prepare_model_and_data,
    rounds_run,
    runs_as_trials,
    runs_at_a_time,
)
from raymix.driver.single import log_summary, run_round
from raymix.errors import RaymixError
from raymix.metrics_view import TaskMetricsView, per_task

ROUND_TAG = "raymix.round"
"""Tag of a proxy or final run (nested); the report lists the RegMix run, not these."""


def proxy_config(cfg: RunConfig, weights: dict[str, float], tokens: int, i: int, tracking_uri: str) -> RunConfig:
    """Proxy run ``i``: a static mixture at ``tokens``, the swarm's seed, the
    proxy preset if any, no lm-eval suite."""
    rc = cfg.policy.regmix
    model = cfg.model
    if rc.proxy_preset is not None:
        model = dataclasses.replace(cfg.model, preset=rc.proxy_preset, pretrained=None,
                                    tokenizer=cfg.model.tokenizer or cfg.model.pretrained)
    return dataclasses.replace(
        cfg, seed=rc.swarm_seed, model=model,
        policy=dataclasses.replace(cfg.policy, name="static", weights=weights),
        budget=dataclasses.replace(cfg.budget, tokens=int(tokens)),
        eval=dataclasses.replace(cfg.eval, suite=None),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri,
                                     run_name=f"{cfg.tracking.run_name or 'regmix'}-proxy{i}"))


TRIAL_CPUS = 0.05
"""CPUs a proxy trial reserves beside its training (a sweep's ``trial_cpus`` default)."""


def _proxy_trial(params: dict, configs: list[RunConfig]) -> None:
    """The Tune function trainable of one proxy run."""
    from ray import tune

    enter_driver_dir()  # relative paths (task files, models) mean the driver's directory
    i = params["index"]
    s = _train_proxy(configs[i], Path(params["folders"][i]), params["parent_run_id"], i)
    tune.report({"worst_val_loss": s["worst_val_loss"], "mean_val_loss": s["mean_val_loss"],
                 "train_tokens": s["train_tokens"], "mlflow_run_id": s["mlflow_run_id"]})


def _train_proxy(cfg: RunConfig, folder: Path, parent_run_id: str, i: int) -> dict:
    """Proxy run ``i`` (trained, resumed or read back), tagged as the RegMix run's round."""
    from mlflow.tracking import MlflowClient

    trained = not (folder / "summary.json").exists()
    s = run_round(cfg, folder, parent_run_id, "regmix")
    if trained:
        MlflowClient(s["mlflow_tracking_uri"]).set_tag(s["mlflow_run_id"], ROUND_TAG, f"proxy{i}")
    return s


def swarm_concurrency(cfg: RunConfig, cpus: float) -> int:
    """Proxy runs at a time: ``policy.regmix.concurrent_proxies``, else as
    many as ``cpus`` hold (one on 2 CPUs or fewer), as
    :func:`raymix.driver.setup.runs_at_a_time` counts a sweep's trials."""
    return runs_at_a_time([cfg], cpus, TRIAL_CPUS, cfg.policy.regmix.concurrent_proxies)


def train_swarm(cfg: RunConfig, configs: list[RunConfig], swarm_root: Path, parent_run_id: str,
                uri: str) -> list[dict]:
    """The proxy runs' summaries, in the swarm's order: the unfinished ones
    trained as Ray Tune trials (resumed from their last checkpoint where
    they have one), the finished ones read from their folders."""
    import ray

    folders = [swarm_root / f"proxy-{identity_hash(p)}" for p in configs]
    # A folder trained once, by its first proxy (two rows of one mixture, which
    # distinct sampling leaves only where the cap maps every mixture to one).
    todo = [i for i, f in enumerate(folders) if not (f / "summary.json").exists() and f not in folders[:i]]
    tokens = configs[0].budget.tokens
    print(f"[raymix] regmix: {len(configs)} proxy runs of {tokens} tokens, {len(configs) - len(todo)} finished "
          f"before, {len(todo)} to train", flush=True)
    if todo and os.environ.get("TUNE_ORIG_WORKING_DIR"):
        print("[raymix] regmix: inside a Ray Tune trial, the proxies train one after another in this process "
              "(Ray Tune runs no Tune run nested in a trial)", flush=True)
    elif todo:
        from ray import tune

        from raymix.tracking_server import serve_if_concurrent

        check_worker_resources(configs[0], trial_cpus=TRIAL_CPUS)  # else a proxy would wait for ever
        concurrent = swarm_concurrency(cfg, ray.cluster_resources().get("CPU", 1))
        server, served = serve_if_concurrent(uri, swarm_root, concurrent, len(todo), "proxy runs")
        # The trials log through the server; the read-back below, once it has
        # stopped, goes to the store itself (``configs`` as given).
        trial_configs = configs
        if server is not None:
            trial_configs = [dataclasses.replace(c, tracking=dataclasses.replace(c.tracking, tracking_uri=served))
                             for c in configs]
        try:
            tuner = runs_as_trials(
                tune.with_parameters(_proxy_trial, configs=trial_configs),
                {"index": tune.grid_search(todo), "folders": [str(f) for f in folders],
                 "parent_run_id": parent_run_id},
                trial_configs, TRIAL_CPUS, concurrent, "regmix-swarm", swarm_root / "ray")
            errors = [r.error for r in tuner.fit() if r.error]
        finally:
            if server is not None:
                server.stop()
        if errors:
            raise RaymixError(f"regmix: {len(errors)} proxy run(s) failed (finished ones are kept under "
                              f"{swarm_root} and reused by --resume); first: {errors[0]}")
    # Finished proxies are read back; inside a trial the others train here.
    return [_train_proxy(c, f, parent_run_id, i) for i, (c, f) in enumerate(zip(configs, folders))]


def _check(cfg: RunConfig, tasks: tuple[str, ...]) -> None:
    from raymix.models import PRESETS

    rc = cfg.policy.regmix
    if rc.target not in ("worst", "mean") and rc.target not in tasks:
        raise RaymixError(f"policy.regmix.target={rc.target!r}: not worst, mean or a task of the pool "
                          f"({', '.join(tasks)})")
    if rc.proxy_preset is not None and rc.proxy_preset not in PRESETS:
        raise RaymixError(f"policy.regmix.proxy_preset={rc.proxy_preset!r}: choose one of {', '.join(PRESETS)}")


def run_regmix(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None,
               resume: bool = False) -> dict:
    """:func:`raymix.driver.run` for ``policy.name=regmix`` (its registry entry
    names this driver): same contract (summary.json, one MLflow run)."""
    from raymix.policies import PoolInfo, example_weights, token_shares, tokens_per_example
    from raymix.policies.regmix import (
        MixtureRegression,
        aggregate,
        cap_rows,
        cross_validate,
        dirichlet_centre,
        sample_mixtures,
        search_optimum,
    )
    from raymix.tracking import plot_mixture

    with rounds_run(cfg, output_dir, parent_run_id, resume, "proxy runs") as run:
        out, tracker, t0 = run.out, run.tracker, run.t0
        rc = cfg.policy.regmix
        init_ray(cfg)
        _, _, pool, _ = prepare_model_and_data(cfg, out)
        setup_seconds = time.perf_counter() - t0
        tasks = pool.tasks
        _check(cfg, tasks)
        budget = budget_tokens(cfg, pool.pool_tokens)
        proxy_tokens = rc.proxy_tokens or max(1, int(round(rc.proxy_share * budget)))
        capacity = cfg.budget.max_epochs * pool.train_tokens().astype(np.float64)
        centre = dirichlet_centre(pool.train_tokens(), rc.temperature)
        # The swarm's mixtures, the regression's inputs and the chosen point
        # are token shares (what the ledgers record); a run samples examples,
        # so it is given the per-example weights that train those shares.
        per_example = tokens_per_example(PoolInfo(tasks, pool.train_tokens(), pool.train_examples(), budget))

        def sampled(shares: np.ndarray) -> dict[str, float]:
            return dict(zip(tasks, example_weights(shares, per_example).tolist()))

        mixtures = sample_mixtures([rc.swarm_seed, 0], centre, rc.proxy_runs, rc,
                                   capacity, budget, distinct=True)
        swarm_root = Path(rc.swarm_dir).resolve() if rc.swarm_dir else out / "swarm"
        configs = [proxy_config(cfg, sampled(w), proxy_tokens, i, tracker.uri) for i, w in enumerate(mixtures)]
        proxies = train_swarm(cfg, configs, swarm_root, tracker.run_id, tracker.uri)

        # What each proxy trained on (its ledger: the mixer's cap applied) against its validation losses.
        X = np.array([[s["ledger"][t]["train_tokens"] for t in tasks] for s in proxies], dtype=np.float64)
        X /= X.sum(axis=1, keepdims=True)
        Y = np.array([[s["val_loss"][t] for t in tasks] for s in proxies], dtype=np.float64)
        if not np.isfinite(Y).all():
            raise RaymixError("regmix: a proxy run has a non-finite validation loss (no validation examples for "
                              "a task, or a diverged run); see the proxies' summary.json under "
                              f"{swarm_root}")
        reg = MixtureRegression(rc.regressor, rc.min_child_samples, rc.trees)
        cv = cross_validate(reg, X, Y, rc.target, tasks, rc.folds, rc.swarm_seed)
        reg.fit(X, Y)
        candidates = sample_mixtures([rc.swarm_seed, 1], centre, rc.candidates, rc,
                                     capacity, budget)
        chosen, _ = search_optimum(reg, candidates, rc.target, tasks, rc.top_k)
        # The `uniform` policy's mixture in the regression's units: uniform
        # per example, so a task's token share follows its example length.
        uniform = cap_rows(token_shares(np.ones(len(tasks)), per_example)[None, :], capacity, budget)
        observed = aggregate(Y, rc.target, tasks)
        weights = dict(zip(tasks, chosen.tolist()))
        block = {
            "target": rc.target, "regressor": rc.regressor, "proxy_budget_tokens": proxy_tokens,
            "cv": cv, "weights": weights, "sampling_weights": sampled(chosen),
            "predicted_target": float(aggregate(reg.predict(chosen[None]), rc.target, tasks)[0]),
            "predicted_target_uniform": float(aggregate(reg.predict(uniform), rc.target, tasks)[0]),
            "best_proxy_target": float(observed.min()),
            "proxy_train_tokens": int(sum(s["train_tokens"] for s in proxies)),
            "proxies": [{"mixture": dict(zip(tasks, x.tolist())), "target": float(y),
                         "identity": s["identity"], "mlflow_run_id": s["mlflow_run_id"],
                         "train_tokens": s["train_tokens"], "meta_tokens": s["meta_tokens"],
                         "wall_seconds": s["wall_seconds"]} for x, y, s in zip(X, observed, proxies)],
        }
        print(f"[raymix] regmix: k-fold Spearman {cv['spearman']:.3f}, relative error {cv['relative_error']:.3f}; "
              f"final run on the chosen mixture", flush=True)

        fcfg = dataclasses.replace(
            cfg, policy=dataclasses.replace(cfg.policy, name="static", weights=block["sampling_weights"]),
            tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracker.uri,
                                         run_name=f"{cfg.tracking.run_name or 'regmix'}-final"))
        final = run_round(fcfg, out / "final", tracker.run_id, "regmix")
        tracker.client.set_tag(final["mlflow_run_id"], ROUND_TAG, "final")

        summary = _combine(cfg, final, proxies, block, run, setup_seconds)
        log_summary(tracker, summary, out, plot_mixture, {"regmix": block},
                    max_tasks=cfg.tracking.per_task_metrics_max_tasks)
        tracker.log_metrics({k: summary[k] for k in (
            "total_train_tokens_all_rounds", "total_meta_tokens_all_rounds", "total_wall_seconds_all_rounds")})
        tracker.log_metrics({
            "regmix/proxy_runs": len(proxies), "regmix/cv_spearman": cv["spearman"],
            "regmix/cv_relative_error": cv["relative_error"], "regmix/predicted_target": block["predicted_target"],
            "regmix/predicted_target_uniform": block["predicted_target_uniform"],
            "regmix/best_proxy_target": block["best_proxy_target"],
            "regmix/proxy_train_tokens": block["proxy_train_tokens"]})
        tasks = list(weights)  # per task only up to tracking.per_task_metrics_max_tasks, aggregates above
        tracker.log_metrics(TaskMetricsView(tasks, cfg.tracking.per_task_metrics_max_tasks)(
            {"regmix/weight/{task}": per_task([weights[t] for t in tasks], "weight")}, 0))
        run.write_summary(summary)
        return summary


def _combine(cfg: RunConfig, final: dict, proxies: list[dict], block: dict, run, setup_seconds: float) -> dict:
    """The RegMix run's summary: the final run's, with the compute of every
    run (proxy runs' and the final run's own wall time from their summaries,
    so a reused proxy still counts, plus this driver's setup)."""
    summary = run.combine(cfg, [*proxies, final], extra_wall_seconds=setup_seconds)
    summary["regmix"] = block
    return summary
