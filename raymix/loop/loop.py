"""The training function: budgeted SFT inside a Ray Train ``TorchTrainer``
worker, or in the calling process.

Every worker samples each example's task from the current mixture, trains
with the loss on completion tokens only, and all-reduces per-task token and
loss counts after each step, so all ranks agree on ``train_tokens`` and stop
at the same step. Rank 0 alone talks to the mixer actor (every
``train.sync_every`` steps, without waiting on the reply until the next
interval) and to MLflow, and evaluates the final model.

:func:`train_loop` reads as a table of contents; each part lives in its own
module of this package and owns its state (see ``checkpoint.py``).
"""

from __future__ import annotations

import time
from typing import Optional

from raymix.loop.checkpoint import Checkpointer
from raymix.loop.contract import LoopConfig
from raymix.loop.exchange import MixerExchange
from raymix.loop.final import finish
from raymix.loop.hooks import CurveHook, MetricsHook, Progress, ProgressFile
from raymix.loop.session import RayTrainSession
from raymix.loop.setup import Worker
from raymix.loop.step import TrainStep
from raymix.policies.signal import NoSignal, SignalContext, StepView
from raymix.registry import policy_spec, resolve


def train_loop(config: dict | LoopConfig, session=None, mixer=None) -> None:
    """Train one budgeted run. ``config``: a :class:`LoopConfig` (or Ray
    Train's ``{"loop": LoopConfig}``); ``session``: None inside a Ray Train
    worker, an ``InProcessSession`` otherwise; ``mixer``: a mixer client for
    rank 0 (default: the actor named in the config)."""
    entered_at = time.time()  # wall clock: compared with the driver's, to time worker start-up
    loop = LoopConfig.from_train_loop_config(config)
    cfg, budget, session = loop.run, loop.budget_tokens, session or RayTrainSession()
    w = Worker.build(loop, session)
    step = TrainStep(w)  # builds the optimizer
    client, lost = _mixer_client(loop, mixer) if w.rank == 0 else (None, None)
    exchange = MixerExchange(client, step.T, w.rank, w.distributed, lost)
    metrics_log = _metric_logger(loop) if w.rank == 0 else None
    signal = _signal(w)
    progress = Progress()
    curve = CurveHook(w, exchange, metrics_log) if cfg.eval.curve_points > 0 else None
    metrics = MetricsHook(w, metrics_log, step,
                          not_training=lambda: (curve.seconds if curve else 0.0) + checkpointer.seconds)
    checkpointer = Checkpointer(w, session, exchange, metrics_log,
                                [progress, step, exchange, signal, w.task_metrics, metrics]
                                + ([curve] if curve else []))
    if not checkpointer.restore():
        return  # the run had finished; its final checkpoint was reported again
    progress.restores = exchange.start(progress.train_tokens, progress.restores)
    if exchange.lost is not None:
        return _mixer_lost(exchange, w.rank)
    if progress.restores and w.rank == 0:
        print(f"[raymix] restored from checkpoint at {progress.train_tokens} train tokens, step {progress.step} "
              f"(restore {progress.restores})", flush=True)
    files = ProgressFile(loop.output_dir, w.rank)

    t_loop = time.perf_counter()
    # A restored run's earlier tokens and signal time are not this loop's to time.
    tokens_at_start, meta_at_start = progress.train_tokens, progress.meta_seconds
    setup_seconds = time.time() - entered_at
    w.model.train()
    if curve is not None:
        curve.start(progress)
    metrics.start(progress)
    aborted, stopped = None, False
    while progress.train_tokens < budget:
        session.stop_if_orphaned()
        outcome = step(exchange.weights, progress.train_tokens / budget)
        if not outcome.finite:
            aborted = (f"{outcome.why_not_finite()} at step {progress.step + 1} ({progress.train_tokens} "
                       f"train tokens of {budget}); lower train.lr or check the data")
            break
        progress.step += 1
        progress.train_tokens += int(outcome.stats[0].sum())
        exchange.add(outcome.stats)
        view = StepView(progress.step, progress.train_tokens, budget, outcome.lr, exchange.weights, outcome.stats)
        signal.observe(view)
        if signal.due(view):
            _run_signal(signal, view, exchange, metrics_log, progress, t_loop, meta_at_start, w.task_metrics)
            if signal.stops_run() and exchange.lost is None:
                stopped = True
                break
        elif progress.step % cfg.train.sync_every == 0 and progress.train_tokens < budget:
            exchange.sync(None, progress.train_tokens)
        if exchange.lost is not None:
            return _mixer_lost(exchange, w.rank)
        if curve is not None:
            curve.after_step(progress)
        metrics.after_step(progress, outcome, exchange.weights)
        if progress.step % cfg.train.log_every == 0:
            files.write(step=progress.step, train_tokens=progress.train_tokens, budget=budget,
                        restores=progress.restores, mixer_pid=exchange.pid, mixer_restarts=exchange.restarts)
        if checkpointer.due(progress.train_tokens):
            checkpointer.save("periodic", {"train_tokens": progress.train_tokens, "steps": progress.step})
    if aborted is not None:
        # Non-finite loss: keep the last good state as the run's checkpoint
        # and stop cleanly (an exception would make Ray Train retry the
        # same divergence ``max_failures`` times).
        checkpointer.save("aborted", {"train_tokens": progress.train_tokens, "steps": progress.step,
                                      "aborted": aborted})
        return
    # Curve evaluations and checkpoints are not training: their time is reported apart.
    loop_seconds = (time.perf_counter() - t_loop - (curve.seconds if curve is not None else 0.0)
                    - checkpointer.seconds)
    finish(w, session, exchange, metrics_log, signal, progress, curve, checkpointer,
           {"loop_seconds": loop_seconds, "entered_at": entered_at, "setup_seconds": setup_seconds,
            "stopped_early": stopped, "data_positions": step.data_positions(), "utilisation": step.utilisation,
            "model_flops_per_token": step.model_flops_per_token, "batch_layout": step.batches.mode,
            "batch_seconds": step.batch_seconds, "timed_tokens": progress.train_tokens - tokens_at_start,
            "timed_meta_seconds": progress.meta_seconds - meta_at_start})


def _run_signal(signal, view: StepView, exchange: MixerExchange, metrics_log, progress: Progress,
                t_loop: float, meta_at_start: float, task_metrics) -> None:
    """The policy's worker-side computation, its report to the mixer (whose
    new mixture applies at once), and its metrics (``time_share``: of this
    loop's time since ``t_loop``, the signal's since then,
    ``meta_at_start`` being the restored checkpoint's)."""
    t = time.perf_counter()
    signals = signal.compute(view)
    progress.meta_seconds += time.perf_counter() - t
    progress.meta_steps += 1
    exchange.sync(signals, view.train_tokens)
    if metrics_log is not None:
        now = time.perf_counter()
        timing = {"step_seconds": now - t,
                  "time_share": (progress.meta_seconds - meta_at_start) / max(1e-9, now - t_loop)}
        metrics_log.log(task_metrics(signal.metrics(signals, exchange.weights, timing), view.step), view.step)


def _signal(w: Worker):
    """The policy's worker-side signal (its registry entry names it), or one that does nothing."""
    spec = policy_spec(w.cfg.policy.name)
    if spec.signal is None:
        return NoSignal()
    ctx = SignalContext(w.raw_model, w.cfg, w.loop.pool, w.budget, w.rank, w.world, w.distributed, w.pad_id,
                        w.device)
    return resolve(spec.signal)(ctx)


def _mixer_lost(exchange: MixerExchange, rank: int) -> None:
    """Stop without a checkpoint: the mixer's state since the last one (the
    policy's, the ledger's) died with the actor, so the last checkpoint is
    what the run resumes from. The driver names the actor and fails the run;
    raising here instead would make Ray Train restart the workers, who would
    find the actor gone again."""
    if rank == 0:
        print(f"[raymix] {exchange.lost}; training stops at the last checkpoint", flush=True)


def _mixer_client(loop: LoopConfig, given) -> tuple[object, Optional[str]]:
    """Rank 0's mixer client, and why the mixer is lost if it already is."""
    if given is not None:
        return given, None
    import ray

    from raymix.mixer import MIXER_NAMESPACE, MixerClient

    try:
        actor = ray.get_actor(loop.mixer_name, namespace=MIXER_NAMESPACE)
    except ValueError:
        # A dead actor's name is released: the worker group was restarted
        # after the mixer died for good.
        return None, f"the mixer actor {loop.mixer_name} is dead and will not be restarted (no actor by that name)"
    return MixerClient(actor, len(loop.pool.tasks), name=loop.mixer_name), None


def _metric_logger(loop: LoopConfig) -> Optional[object]:
    if not loop.mlflow_run_id:
        return None
    from mlflow.tracking import MlflowClient

    from raymix.tracking import MetricLogger

    return MetricLogger(MlflowClient(loop.mlflow_tracking_uri), loop.mlflow_run_id)
