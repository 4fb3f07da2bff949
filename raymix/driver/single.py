"""One budgeted multi-task SFT run on Ray: the driver's side.

Prepares the pool and the model (``raymix.driver.setup``), starts the mixer
actor, runs the training loop (``raymix.loop``) on a Ray Train worker group
or in this process, scores the final checkpoint through lm-eval, and writes
``DIR/summary.json`` (the fields scripts compare runs by), the final Hugging
Face checkpoint in ``DIR/model``, and one MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from raymix.config import RunConfig, effective_grad_accum, identity_hash
from raymix.driver.output import prepare_output
from raymix.driver.setup import (
    budget_tokens,
    check_worker_resources,
    init_ray,
    log_pool,
    opened_tracker,
    prepare_model_and_data,
    prepare_out_of_process,
    resolve_suite,
    start_tracking,
)
from raymix.errors import RaymixError
from raymix.loop.contract import LoopConfig, LoopResult


def run_single(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None,
               resume: bool = False) -> dict:
    """Train under the budget, evaluate, write summary.json; return the summary.

    ``resume=True`` continues the unfinished run in ``output_dir`` (a killed
    driver, a failed attempt): the same MLflow run, Ray Train restoring the
    latest checkpoint in the run's storage."""
    from raymix.data import pool_summary
    from raymix.policies import PoolInfo
    from raymix.tracking import plot_mixture

    out, saved = prepare_output(cfg, output_dir, resume, "it from its last checkpoint")
    t0 = time.perf_counter()
    suite = resolve_suite(cfg)
    # Trained in Ray Train workers: the records, transformers, torch and the
    # MLflow run's opening stay out of this process, unless it holds torch
    # already (a Tune trial's reused process after an lm-eval): then moving
    # out saves no memory and costs a process start and its imports.
    remote = bool(cfg.runtime.num_workers) and "torch" not in sys.modules
    if saved:
        print(f"[raymix] resuming MLflow run {saved['mlflow_run_id']} from the latest checkpoint in {out}",
              flush=True)
    tracker = None
    status, error = "FAILED", None
    try:
        phases: dict[str, float] = {}
        if not remote:
            tracker = start_tracking(cfg, out, parent_run_id, saved, phases)
        t = time.perf_counter()
        init_ray(cfg)
        check_worker_resources(cfg)
        phases["ray_init"] = time.perf_counter() - t
        if remote:
            tok_dir, pool, init_dir, tracker = prepare_out_of_process(cfg, out, phases, (parent_run_id, saved))
        else:
            _, tok_dir, pool, init_dir = prepare_model_and_data(cfg, out, phases)
            log_pool(tracker, cfg, pool, out, saved)
        stats = pool_summary(pool)
        budget = budget_tokens(cfg, pool.pool_tokens)
        print(f"[raymix] pool: {stats['num_tasks']} tasks, N={stats['pool_tokens']} tokens "
              f"(prepared in {pool.seconds:.1f}s, cache {'hit' if pool.cache_hit else 'miss'}; "
              f"over data.max_seq_len={cfg.data.max_seq_len}: {stats['truncated']} truncated, "
              f"{stats['dropped']} dropped); "
              f"budget {budget} tokens; policy {cfg.policy.name}", flush=True)

        t = time.perf_counter()
        summary, loop_result = _train(cfg, out, tracker, pool, tok_dir, init_dir, budget,
                                      PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), budget))
        phases["ray_train"] = time.perf_counter() - t
        if suite and not loop_result.stopped_early:
            from raymix.eval import evaluate_checkpoint

            t = time.perf_counter()
            ev = evaluate_checkpoint(summary["model_dir"], suite, str(out / "eval"), cfg.eval.suite_limit,
                                     ni_dir=cfg.eval.ni_dir, seed=cfg.seed, mlflow_run_id=tracker.run_id,
                                     tracking_uri=tracker.uri)
            summary["eval"] = ev["tasks"]
            summary["eval_aggregate"] = ev["aggregate"]
            summary["eval_suite"] = suite
            phases["lm_eval"] = time.perf_counter() - t
        summary["wall_seconds"] = time.perf_counter() - t0
        summary["phase_seconds"] = phases
        summary["pool"] = stats
        # The signal's reports (GradEx's scores and verification) as JSON artifacts too.
        t = time.perf_counter()
        log_summary(tracker, summary, out, plot_mixture,
                    {k: v for k, v in loop_result.signal_summary.items() if isinstance(v, dict)},
                    cfg.tracking.per_task_metrics_max_tasks)
        phases["log_summary"] = time.perf_counter() - t  # after wall_seconds: its own phase
        tracker.log_summary(summary, out)  # summary.json only once whole and logged
        status = "FINISHED"
        return summary
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if tracker is None and remote:  # opened in the preparation's process, which failed
            tracker = opened_tracker(cfg, out, saved)
        if tracker is not None:
            tracker.end(status, error)


def _train(cfg, out, tracker, pool, tok_dir, init_dir, budget, pool_info) -> tuple[dict, LoopResult]:
    import ray
    import ray.train

    from raymix.mixer import start_mixer_actor

    mixer_name = f"mixer-{tracker.run_id}-{uuid.uuid4().hex[:6]}"
    mixer = start_mixer_actor(mixer_name, cfg.policy, pool_info, cfg.budget.max_epochs,
                              cfg.runtime.mixer_max_restarts)
    try:
        ray.get(mixer.mixture.remote(), timeout=120)  # surfaces policy errors here
        loop_config = LoopConfig(
            run=cfg, pool=pool, budget_tokens=budget, tokenizer_dir=tok_dir, init_model_dir=init_dir,
            mixer_name=mixer_name, mlflow_run_id=tracker.run_id, mlflow_tracking_uri=tracker.uri,
            output_dir=str(out),
            local_checkpoint_dir=str(out / "checkpoints") if cfg.runtime.num_workers == 0 else None,
        )
        result = None
        try:
            if cfg.runtime.num_workers == 0:
                result, fit_started, fit_ended = _train_in_process(cfg, loop_config)
            else:
                result, fit_started, fit_ended = _train_on_workers(cfg, out, tracker, loop_config)
                if result.error:
                    raise result.error
        except Exception as e:
            _raise_if_mixer_lost(cfg, out, mixer, mixer_name, _last_checkpoint(result, loop_config), e)
            raise
        metrics = result.metrics or {}
        if metrics.get("aborted"):
            where = result.checkpoint.path if result.checkpoint is not None else "(no checkpoint)"
            raise RaymixError(f"{metrics['aborted']}. The last good state (model, optimizer, data positions, "
                              f"mixer, ledger) is checkpointed at {where}")
        if result.checkpoint is None or "checkpoint_reason" in metrics:
            # The loop returned without its final checkpoint: it stopped
            # because the mixer actor is gone (see raymix.loop.loop._mixer_lost).
            _raise_if_mixer_lost(cfg, out, mixer, mixer_name, _last_checkpoint(result, loop_config), None)
            raise RaymixError("training stopped without its final checkpoint (see the workers' log above); "
                              f"continue with python -m raymix.train --output {out} --resume")
    finally:
        ray.kill(mixer)
    return _summarise(cfg, out, tracker, result, fit_started, fit_ended, budget)


def _last_checkpoint(result, loop_config: LoopConfig) -> Optional[str]:
    """Where the run's last checkpoint is: Ray Train's result's, or the newest in OUTPUT/checkpoints."""
    from raymix.loop.checkpoint import latest_local_checkpoint

    if result is not None and result.checkpoint is not None:
        return result.checkpoint.path
    if loop_config.local_checkpoint_dir:
        return latest_local_checkpoint(loop_config.local_checkpoint_dir)
    return None


def _raise_if_mixer_lost(cfg: RunConfig, out: Path, mixer, mixer_name: str, checkpoint: Optional[str],
                         error: Optional[Exception]) -> None:
    """A RaymixError naming the mixer actor when it is dead for good (Ray
    will not restart it): the run fails, and resumes from its last
    checkpoint, which holds the mixer's state, with a new actor."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError

    from raymix.mixer import death_cause

    try:
        ray.get(mixer.mixture.remote(), timeout=60)
        return  # alive (or restarted): the failure was something else
    except ActorDiedError as e:
        cause = death_cause(e)
    except GetTimeoutError:
        return
    where = (f"its last checkpoint ({checkpoint}) holds the mixer's state" if checkpoint
             else "no checkpoint was written yet, so it starts again")
    raise RaymixError(
        f"the mixer actor {mixer_name} died and cannot be restarted ({cause.rstrip('.')}; runtime.mixer_max_restarts="
        f"{cfg.runtime.mixer_max_restarts}). Training stopped; {where}: continue with "
        f"python -m raymix.train --output {out} --resume"
    ) from error


@dataclasses.dataclass
class _InProcessResult:
    metrics: Optional[dict]
    checkpoint: Any


def _train_in_process(cfg: RunConfig, loop_config: LoopConfig):
    """``runtime.num_workers=0``: the training function in this process (a
    Tune trial's, in a sweep), one rank, no worker group to start."""
    import ray.train

    from raymix.loop import InProcessSession, train_loop

    session = InProcessSession(cfg.runtime.use_gpu, loop_config.local_checkpoint_dir)
    fit_started = time.time()
    train_loop(loop_config, session)
    fit_ended = time.time()
    with_ckpt = [(m, d) for m, d in session.reports if d]
    metrics = session.reports[-1][0] if session.reports else None
    checkpoint = ray.train.Checkpoint.from_directory(with_ckpt[-1][1]) if with_ckpt else None
    return _InProcessResult(metrics, checkpoint), fit_started, fit_ended


def _train_on_workers(cfg: RunConfig, out: Path, tracker, loop_config: LoopConfig):
    import ray.train

    from raymix.driver.trainer import lean_trainer_class
    from raymix.loop import train_loop

    TorchTrainer = lean_trainer_class()  # noqa: N806 (a class)

    # Read by TorchTrainer.fit, which passes it on to the run's controller
    # actor (see RuntimeConfig.train_poll_seconds for why it is not Ray's 2 s).
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.runtime.train_poll_seconds)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config.as_train_loop_config(),
        scaling_config=ray.train.ScalingConfig(
            # Elastic (a [min, max] range, Ray Train V2): the group starts at
            # what fits and is resized from the last checkpoint as nodes come and go.
            num_workers=((cfg.runtime.min_workers, cfg.runtime.num_workers) if cfg.runtime.elastic
                         else cfg.runtime.num_workers),
            use_gpu=cfg.runtime.use_gpu,
            resources_per_worker={"CPU": cfg.runtime.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{tracker.run_id}",
            # A bucket URI (RAYMIX_STORAGE) on clusters, the run folder otherwise.
            storage_path=os.environ.get("RAYMIX_STORAGE") or str((out / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.runtime.max_failures),
            # The periodic ones, plus the final model (or the aborted state).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep + 1),
        ),
    )
    fit_started = time.time()
    result = trainer.fit()
    fit_ended = time.time()
    return result, fit_started, fit_ended


def _summarise(cfg, out, tracker, result, fit_started, fit_ended, budget) -> tuple[dict, LoopResult]:
    model_dir = out / "model"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, model_dir, dirs_exist_ok=True)
    ev = LoopResult.read(str(model_dir))
    mix = ev.mixer
    val, em, test = ev.val_loss, ev.test_exact_match, ev.test_loss
    finite = [v for v in val.values() if v == v]
    test_finite = [v for v in test.values() if v == v]
    em_vals = [v for v in em.values() if v == v]
    # The worker count at the end: an elastic run's may differ from its maximum.
    world = ev.world if cfg.runtime.num_workers else 0
    micro = cfg.train.micro_batch_size * effective_grad_accum(cfg, world=world) * max(1, world)
    summary = {
        "policy": cfg.policy.name,
        "seed": cfg.seed,
        "identity": identity_hash(cfg),
        "budget_tokens": budget,
        "train_tokens": mix["train_tokens"],
        "meta_tokens": mix["meta_tokens"],
        "meta_seconds": ev.meta_seconds,
        "meta_steps": ev.meta_steps,
        "curve": ev.curve,
        # Where a TorchTrainer run's time goes besides training: starting the
        # worker group, per-worker setup, and checkpointing plus shutdown.
        "ray_train_seconds": {
            "worker_start": ev.worker_entered_at - fit_started,
            "worker_setup": ev.worker_setup_seconds,
            "train_loop": ev.loop_seconds + ev.curve_seconds + ev.checkpoint_seconds,
            "checkpoints": ev.checkpoint_seconds,
            "final_eval": ev.eval_seconds,
            "report_and_shutdown": fit_ended - ev.reported_at,
        },
        "curve_seconds": ev.curve_seconds,
        # Worker-group restarts restored from a checkpoint, and mixer actor restarts.
        "restores": ev.restores,
        "workers": world,
        # Which training examples of each task were drawn, over all workers.
        "data_positions": ev.data_positions,
        "mixer_restarts": ev.mixer_restarts,
        # Over this loop's time: after a restore, the signal's since then.
        "meta_time_share": (ev.meta_seconds if ev.timed_meta_seconds is None else ev.timed_meta_seconds)
        / max(1e-9, ev.loop_seconds),
        # Host time drawing and laying out the examples (rank 0), of the loop's.
        "batch_time_share": ev.batch_seconds / max(1e-9, ev.loop_seconds),
        "overshoot_tokens": mix["train_tokens"] - budget,
        "global_batch_examples": micro,
        "global_batch_tokens": micro * cfg.data.max_seq_len,
        "mean_step_tokens": ev.train_tokens / max(1, ev.steps),
        "loop_train_tokens": ev.train_tokens,  # the workers' own all-reduced count
        "steps": ev.steps,
        "ledger": mix["ledger"],
        "val_loss": val,
        "worst_val_loss": max(finite) if finite else float("nan"),
        "worst_val_task": max(val, key=lambda t: val[t] if val[t] == val[t] else -1.0),
        "mean_val_loss": sum(finite) / len(finite) if finite else float("nan"),
        # The test split: read by no policy (ADAPT's meta-gradient reads
        # the validation split), so it is what runs are compared on.
        "test_loss": test,
        "worst_test_loss": max(test_finite) if test_finite else float("nan"),
        "worst_test_task": max(test, key=lambda t: test[t] if test[t] == test[t] else -1.0) if test else None,
        "mean_test_loss": sum(test_finite) / len(test_finite) if test_finite else float("nan"),
        "test_exact_match": em,
        "mean_test_exact_match": sum(em_vals) / len(em_vals) if em_vals else float("nan"),
        "tokens_per_second": ev.tokens_per_second,
        # Real tokens per computed position (padding or packing slack), and the layout that gave it.
        "utilisation": ev.utilisation,
        "batch_layout": ev.batch_layout,
        # Training FLOPs the model needed per real token, and their rate over
        # the GPUs' bf16 peak (None on CPU or an unlisted GPU): raymix/flops.py.
        "model_flops_per_token": ev.model_flops_per_token,
        "mfu": ev.mfu,
        "peak_device_memory_bytes": ev.peak_device_memory_bytes,
        "train_loop_seconds": ev.loop_seconds,
        "eval_seconds": ev.eval_seconds,
        "exact_match_seconds": ev.exact_match_seconds,  # of eval_seconds: greedy generation
        "mixer_update_seconds": mix["mixer_update_seconds"],
        "mixture_schedule": mix["mixture_schedule"],
        "final_weights": mix["final_weights"],
        "spill_tokens": mix["spill_tokens"],
        "model_dir": str(model_dir.resolve()),
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_experiment_id": tracker.experiment_id,
    }
    summary.update(mix.get("policy_summary", {}))  # what the mixer-side policy adds
    summary.update(ev.signal_summary)  # what the policy's worker-side signal adds
    return summary, ev


def log_summary(tracker, summary: dict, out: Path, plot_mixture, artifacts: Optional[dict] = None,
                max_tasks: int = 64) -> None:
    """The summary's numbers as MLflow metrics (per task up to ``max_tasks``
    tasks, aggregates above it: ``raymix.metrics_view``); the ledger, the
    schedule, the mixture plot and ``artifacts`` (``{name: json-able}``) as
    artifacts, and above ``max_tasks`` the per-task finals as
    ``per_task/final.parquet`` and the top tasks as tags."""
    from raymix.metrics_view import TaskMetricsView, per_task

    metrics: dict = {k: summary[k] for k in (
        "train_tokens", "meta_tokens", "budget_tokens", "overshoot_tokens", "worst_val_loss",
        "mean_val_loss", "worst_test_loss", "mean_test_loss", "mean_test_exact_match", "tokens_per_second",
        "wall_seconds", "train_loop_seconds", "eval_seconds", "mixer_update_seconds")}
    tasks = list(summary["ledger"])
    nan = float("nan")
    metrics["val_loss/{task}"] = per_task([summary["val_loss"].get(t, nan) for t in tasks], "loss")
    metrics["test_loss/{task}"] = per_task([summary["test_loss"].get(t, nan) for t in tasks], "loss")
    metrics["test_exact_match/{task}"] = per_task([summary["test_exact_match"].get(t, nan) for t in tasks], "score")
    metrics["ledger/{task}/train_tokens"] = per_task([summary["ledger"][t]["train_tokens"] for t in tasks], "count")
    metrics["ledger/{task}/meta_tokens"] = per_task([summary["ledger"][t]["meta_tokens"] for t in tasks], "count")
    for key in ("utilisation", "model_flops_per_token", "mfu"):  # absent from summaries written before them
        if summary.get(key) is not None:
            metrics[key] = summary[key]
    view = TaskMetricsView(tasks, max_tasks)
    tracker.log_metrics(view(metrics, summary["steps"]), step=summary["steps"])
    if not view.per_task_keys:
        path = view.write(out / "per_task", "final")
        tracker.log_artifact(Path(path), "per_task")
        tracker.set_tags(top_task_tags(summary, tasks))
    tracker.log_json(summary["ledger"], "ledger.json", out)
    tracker.log_json(summary["mixture_schedule"], "mixture_schedule.json", out)
    for name, value in (artifacts or {}).items():
        tracker.log_json(value, f"{name}.json", out)
    png = plot_mixture(summary["mixture_schedule"], summary["ledger"], out / "mixture.png",
                       summary["budget_tokens"])
    tracker.log_artifact(png)


def top_task_tags(summary: dict, tasks: list[str], k: int = 5) -> dict[str, str]:
    """MLflow tags naming the top ``k`` tasks by final weight and the worst by
    validation and test loss (``task=value, ...``): what a person looks for
    first in a run too large for one metric per task."""
    from raymix.metrics_view import top_tasks

    nan = float("nan")

    def fmt(pairs) -> str:
        return ", ".join(f"{t}={v:.4g}" for t, v in pairs)[:4900]  # MLflow caps a tag at 5000 characters

    tags = {}
    if summary.get("final_weights"):
        w = [summary["final_weights"].get(t, nan) for t in tasks]
        tags["raymix.top_tasks_by_weight"] = fmt(top_tasks(w, tasks, k))
        tags["raymix.bottom_tasks_by_weight"] = fmt(top_tasks(w, tasks, k, largest=False))
    for split in ("val", "test"):
        tags[f"raymix.worst_tasks_by_{split}_loss"] = fmt(
            top_tasks([summary[f"{split}_loss"].get(t, nan) for t in tasks], tasks, k))
    return tags


def run_round(cfg: RunConfig, rdir: Path, parent_run_id: str, driver: str) -> dict:
    """One round of a multi-run driver (IDEAL's, DoReMi's), nested under its
    run: a finished round's summary is reused, an unfinished one resumed
    from its last checkpoint, a new one trained."""
    if (rdir / "summary.json").exists():
        print(f"[raymix] {driver}: {rdir.name} finished before; not trained again", flush=True)
        summary = json.loads((rdir / "summary.json").read_text())
        from raymix.tracking import end_if_running

        end_if_running(cfg.tracking.tracking_uri or summary.get("mlflow_tracking_uri"), summary.get("mlflow_run_id"))
        return summary
    return run_single(cfg, rdir, parent_run_id=parent_run_id, resume=(rdir / "run.json").exists())

