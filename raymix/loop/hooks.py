"""What the loop does around the step, each part deciding its own cadence:
the loss curve on fixed validation and test subsets (:class:`CurveHook`), the
training metrics (:class:`MetricsHook`), the progress file
(:class:`ProgressFile`), and the loop's own counters (:class:`Progress`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from raymix.files import write_json
from raymix.metrics_view import kl_uniform, per_task


@dataclass
class Progress:
    """Where the run is; a checkpoint part."""

    step: int = 0
    train_tokens: int = 0
    restores: int = 0
    """Worker-group restarts that restored a checkpoint."""
    meta_seconds: float = 0.0
    """Time in the policy's worker-side signal, and how often it ran."""
    meta_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "train_tokens": self.train_tokens, "restores": self.restores,
                "meta_seconds": self.meta_seconds, "meta_steps": self.meta_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.train_tokens = state["step"], state["train_tokens"]
        self.meta_seconds, self.meta_steps = state["meta_seconds"], state["meta_steps"]
        self.restores = state["restores"] + 1


class CurveHook:
    """Per-task validation and test loss on fixed subsets at
    ``eval.curve_points`` evenly spaced points of the budget (and at its
    start), with the meta tokens spent so far; a checkpoint part."""

    def __init__(self, w, exchange, metrics_log):
        from raymix.loop.evaluation import CurveEvaluator

        cfg = w.cfg
        self.w, self.exchange, self.metrics_log = w, exchange, metrics_log
        self.points = cfg.eval.curve_points
        per_task = cfg.eval.curve_per_task(len(w.loop.pool.tasks))  # bounded in all: eval.curve_max_examples
        self.evaluate = CurveEvaluator(w.loop.pool, per_task, w.rank, w.world, w.pad_id,
                                       cfg.eval.batch_size, w.device, lockstep=w.fsdp)
        # The same on the test split, which no policy reads: reports compare
        # runs (effective tokens) on it, not on what ADAPT's signal reads.
        self.evaluate_test = CurveEvaluator(w.loop.pool, per_task, w.rank, w.world,
                                            w.pad_id, cfg.eval.batch_size, w.device, lockstep=w.fsdp, split="test")
        self.next_curve = 1
        self.log: list = []
        self.seconds = 0.0

    def start(self, progress: Progress) -> None:
        if progress.step == 0:
            self.point(progress)  # the starting point of the curve

    def after_step(self, progress: Progress) -> None:
        due = self.w.budget / self.points
        if progress.train_tokens >= self.next_curve * due:
            while progress.train_tokens >= self.next_curve * due:
                self.next_curve += 1
            self.point(progress)

    def point(self, progress: Progress) -> None:
        t = time.perf_counter()
        vl, toks = self.evaluate(self.w.raw_model, self.w.all_reduce)
        tl, test_toks = self.evaluate_test(self.w.raw_model, self.w.all_reduce)
        self.seconds += time.perf_counter() - t
        finite, test_finite = vl[np.isfinite(vl)], tl[np.isfinite(tl)]
        nan = float("nan")
        point = {"train_tokens": progress.train_tokens,
                 "worst_val_loss": float(finite.max()) if len(finite) else nan,
                 "mean_val_loss": float(finite.mean()) if len(finite) else nan,
                 "worst_test_loss": float(test_finite.max()) if len(test_finite) else nan,
                 "mean_test_loss": float(test_finite.mean()) if len(test_finite) else nan}
        # Evaluation tokens are meta tokens: spent, but not on updates.
        self.exchange.report_meta_tokens(toks + test_toks)
        point["meta_tokens"] = self.exchange.meta_reported  # all meta tokens so far (rank 0), this point's too
        self.log.append(point)
        if self.metrics_log is not None:
            m = {f"curve/{k}": v for k, v in point.items()}
            m["curve/{task}/val_loss"] = per_task(vl, "loss")
            m["curve/{task}/test_loss"] = per_task(tl, "loss")
            self.metrics_log.log(self.w.task_metrics(m, progress.step), progress.step)

    def state_dict(self) -> dict:
        return {"next_curve": self.next_curve, "curve_log": list(self.log)}

    def load_state_dict(self, state: dict) -> None:
        self.next_curve, self.log = state["next_curve"], list(state["curve_log"])


class MetricsHook:
    """``train/*``, ``mixture/<task>``, ``mixture/kl_uniform`` and ``loss/<task>`` (or their
    ``tasks/...`` aggregates above ``tracking.per_task_metrics_max_tasks``) every
    ``train.log_every`` steps and at the end of the budget (rank 0)."""

    def __init__(self, w, metrics_log, step=None, not_training=lambda: 0.0):
        """``step``: the :class:`~raymix.loop.step.TrainStep`, whose model
        FLOPs give ``train/mfu`` on a GPU of known peak. ``not_training``:
        the loop's seconds so far that were not training (curve evaluations,
        checkpoints), left out of ``train/tokens_per_second`` as the loop's
        final figure leaves them out."""
        from raymix.flops import device_peak_flops

        self.w, self.metrics_log, self.step, self.not_training = w, metrics_log, step, not_training
        self.peak = device_peak_flops(w.device) if step is not None else None
        self.loss = np.zeros((2, len(w.loop.pool.tasks)))
        self.tokens_start, self.time_start = 0, 0.0  # set by start()

    def start(self, progress: Progress) -> None:
        self.tokens_start, self.time_start = progress.train_tokens, time.perf_counter() - self.not_training()

    def after_step(self, progress: Progress, outcome, weights: np.ndarray) -> None:
        if self.metrics_log is None:
            return
        self.loss += outcome.stats[1:]
        if progress.step % self.w.cfg.train.log_every and progress.train_tokens < self.w.budget:
            return
        now = time.perf_counter() - self.not_training()  # training time only
        budget = self.w.budget
        rate = (progress.train_tokens - self.tokens_start) / max(1e-9, now - self.time_start)
        metrics = {
            "train/loss": outcome.loss,
            "train/lr": outcome.lr,
            "train/tokens": progress.train_tokens,
            "train/tokens_per_second": rate,
            "train/budget_progress": progress.train_tokens / budget,
        }
        if self.peak:  # model FLOPs utilisation over the interval (raymix/flops.py), all workers
            from raymix.flops import mfu

            metrics["train/mfu"] = mfu(rate, self.step.model_flops_per_token, self.peak, self.w.world)
        # How far the mixture is from uniform, in one number: log T - H(p).
        metrics["mixture/kl_uniform"] = kl_uniform(np.asarray(weights, dtype=np.float64))
        metrics["mixture/{task}"] = per_task(weights, "weight")
        with np.errstate(invalid="ignore", divide="ignore"):  # no tokens of a task since the last log: NaN, not logged
            metrics["loss/{task}"] = per_task(np.where(self.loss[1] > 0, self.loss[0] / self.loss[1], np.nan), "loss")
        self.metrics_log.log(self.w.task_metrics(metrics, progress.step), progress.step)
        self.loss[:] = 0
        self.tokens_start, self.time_start = progress.train_tokens, now

    # A checkpoint part: the per-task sums since the last log, so that the
    # first ``loss/<task>`` after a restore averages the same steps as an
    # uninterrupted run's (it averaged those since the checkpoint only).
    def state_dict(self) -> dict:
        return {"metrics_interval_loss": self.loss.tolist()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("metrics_interval_loss")  # absent from checkpoints written before it was saved
        if saved is not None and np.shape(saved) == self.loss.shape:
            self.loss[:] = saved


class ProgressFile:
    """``OUTPUT/progress/rank<R>.json``: pid, step and tokens of each worker,
    rewritten atomically every ``train.log_every`` steps, for operators (and
    tests) that need to find a worker process or follow a run without MLflow."""

    def __init__(self, output_dir: str | None, rank: int):
        self.path = None
        if output_dir:
            os.makedirs(os.path.join(output_dir, "progress"), exist_ok=True)
            self.path = os.path.join(output_dir, "progress", f"rank{rank}.json")
        self.rank = rank

    def write(self, **fields) -> None:
        if self.path is None:
            return
        write_json(self.path, {"rank": self.rank, "pid": os.getpid(), "updated_at": time.time(), **fields})
