"""The end of a loop: the last counts to the mixer, the final evaluation on
the pool's own splits (validation loss, test loss, test exact match) by rank 0, and the
final checkpoint (the Hugging Face model, its tokenizer and the
:class:`~raymix.loop.contract.LoopResult`)."""

from __future__ import annotations

import time

from raymix.loop.checkpoint import report_checkpoint
from raymix.loop.contract import LoopResult


def finish(w, session, exchange, metrics_log, signal, progress, curve, checkpointer, timing: dict) -> None:
    from raymix.flops import device_peak_flops, mfu
    from raymix.loop.evaluation import exact_match, losses_on_test, validation_losses

    cfg = w.cfg
    session.stop_if_orphaned()
    if metrics_log is not None:
        # Every logged metric reaches the store, before the final checkpoint:
        # a failure from here on retrains from the last periodic checkpoint,
        # and MetricLogger skips the steps it committed (its run tag).
        metrics_log.commit()
        _log_per_task_series(w, metrics_log)
    mixer_summary = exchange.summary() if w.rank == 0 else None  # and every counted token the ledger
    loop_seconds = timing["loop_seconds"]
    numbers = {"train_tokens": progress.train_tokens, "steps": progress.step, "loop_seconds": loop_seconds,
               "worker_entered_at": timing["entered_at"], "worker_setup_seconds": timing["setup_seconds"],
               # Over the tokens this loop trained: after a restore, loop_seconds
               # starts at the restore and the earlier tokens are not in it.
               "timed_tokens": timing["timed_tokens"],
               "tokens_per_second": timing["timed_tokens"] / max(1e-9, loop_seconds),
               "meta_seconds": progress.meta_seconds, "meta_steps": progress.meta_steps,
               "timed_meta_seconds": timing["timed_meta_seconds"],
               "curve_seconds": curve.seconds if curve is not None else 0.0, "restores": progress.restores,
               "checkpoint_seconds": checkpointer.seconds, "utilisation": timing["utilisation"],
               "model_flops_per_token": timing["model_flops_per_token"], "batch_seconds": timing["batch_seconds"],
               "peak_device_memory_bytes": _peak_device_memory(w.device)}
    peak = device_peak_flops(w.device)
    if peak:  # the whole loop's model FLOPs utilisation, all workers (None on CPU: the LoopResult's default)
        numbers["mfu"] = mfu(numbers["tokens_per_second"], numbers["model_flops_per_token"], peak, w.world)
    model = w.final_model()  # a collective under FSDP: every rank takes part
    if w.rank != 0:
        session.report(numbers, None)
        return
    t_eval = time.perf_counter()
    pool = w.loop.pool
    # The test split is read once for its losses and its exact match.
    with pool.splits_read_once(["input_ids", "prompt_len", "references"]):
        val = validation_losses(model, pool, w.pad_id, cfg.eval.batch_size, w.device)
        test = losses_on_test(model, pool, w.pad_id, cfg.eval.batch_size, w.device)
        t_em = time.perf_counter()
        em = exact_match(model, w.tokenizer, pool, cfg.eval.exact_match_per_task(len(pool.tasks)),
                         cfg.eval.max_new_tokens, cfg.eval.batch_size, w.device)
    t_end = time.perf_counter()
    result = LoopResult(**numbers, eval_seconds=t_end - t_eval, exact_match_seconds=t_end - t_em,
                        reported_at=0.0, val_loss=val,
                        test_loss=test,
                        test_exact_match=em, curve=curve.log if curve is not None else [], mixer=mixer_summary,
                        mixer_restarts=exchange.restarts, stopped_early=timing["stopped_early"],
                        signal_summary=signal.summary(), world=w.world,
                        data_positions=timing["data_positions"], batch_layout=timing["batch_layout"])
    reported: dict = {}

    def write_final(d: str) -> None:
        model.save_pretrained(d)
        w.tokenizer.save_pretrained(d)
        result.reported_at = time.time()  # after saving the model, before persisting
        result.write(d)
        reported.update(result.metrics())

    report_checkpoint(session, reported, write_final, w.local_checkpoint_dir, "final", None)


def _peak_device_memory(device) -> int:
    """Peak allocated bytes on a CUDA device so far (training, before the final evaluation); 0 elsewhere."""
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _log_per_task_series(w, metrics_log) -> None:
    """The per-task series kept instead of per-task metrics (above
    ``tracking.per_task_metrics_max_tasks``) as ``per_task/loop.parquet``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = w.task_metrics.write(tmp, "loop")
        if path is not None:
            metrics_log.client.log_artifact(metrics_log.run_id, path, "per_task")
