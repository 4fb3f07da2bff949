"""One budgeted multi-task SFT run on Ray.

    python -m raymix.train [CONFIG.yaml] [--set key=value ...] --output DIR

With no config, the embedded default runs: the built-in synthetic suite, a
small Llama model built from a config and a tokenizer trained on the pool.
Writes ``DIR/summary.json`` (the fields scripts compare runs by), the final
Hugging Face checkpoint in ``DIR/model``, and one MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from raymix.config import RunConfig, effective_grad_accum, identity_hash, load_config, to_dict, to_yaml
from raymix.errors import RaymixError


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = cfg.runtime.num_cpus
        kwargs["object_store_memory"] = cfg.runtime.object_store_memory
    ray.init(**kwargs)


def budget_tokens(cfg: RunConfig, pool_tokens: int) -> int:
    if cfg.budget.tokens is not None:
        budget = int(cfg.budget.tokens)
    else:
        budget = int(round(cfg.budget.fraction * pool_tokens))
    if budget <= 0:
        raise RaymixError(
            f"budget.fraction={cfg.budget.fraction} of the pool's {pool_tokens} tokens is 0 tokens; "
            "raise budget.fraction or set budget.tokens"
        )
    capacity = cfg.budget.max_epochs * pool_tokens
    if budget > capacity:
        raise RaymixError(
            f"budget of {budget} tokens exceeds what the repetition cap allows "
            f"(budget.max_epochs={cfg.budget.max_epochs} x {pool_tokens} pool tokens = {capacity:.0f}); "
            "lower the budget or raise budget.max_epochs"
        )
    return budget


TOKENIZER_SAMPLE = 100_000


def tokenizer_corpus(records, limit: int = TOKENIZER_SAMPLE):
    """Training texts for a local tokenizer: an evenly strided sample of at
    most ``limit`` train examples (BPE statistics settle long before the
    whole pool, and training time grows with the corpus)."""
    train = [r for r in records if r.split == "train"]
    step = max(1, len(train) // limit)
    return (f"{r.prompt}\nAnswer: {r.completion}" for r in train[::step])


def prepare_model_and_data(cfg: RunConfig, output_dir: Path, phases: Optional[dict] = None):
    """Records -> tokenizer -> shards -> initial model. Returns what workers need."""
    from raymix.data import cache_root, load_pool, pool_fingerprint, prepare_shards
    from raymix.models import build_model, load_tokenizer, train_tokenizer

    phases = {} if phases is None else phases
    t = time.perf_counter()
    fingerprint = pool_fingerprint(cfg.data)
    loaded: list = []

    def records():
        # Loaded at most once, and only when a cache misses.
        if not loaded:
            t_load = time.perf_counter()
            loaded.append(load_pool(cfg.data))
            phases["records"] = time.perf_counter() - t_load
        return loaded[0]

    if cfg.model.pretrained or cfg.model.tokenizer:
        tok_name = cfg.model.tokenizer or cfg.model.pretrained
        tokenizer = load_tokenizer(tok_name, "model.tokenizer" if cfg.model.tokenizer else "model.pretrained")
        tok_dir = output_dir / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        tok_fp = f"{tok_name}:{len(tokenizer)}"
    else:
        texts = lambda: tokenizer_corpus(records())  # noqa: E731
        tokenizer, tok_path = train_tokenizer(texts, cfg.model.vocab_size, cache_root(cfg.data),
                                              f"{fingerprint}:sample{TOKENIZER_SAMPLE}")
        tok_dir = Path(tok_path)
        tok_fp = f"trained:{tok_path}"
    phases["tokenizer"] = time.perf_counter() - t
    pool = prepare_shards(records, fingerprint, str(tok_dir), tok_fp, cfg.data, cfg.runtime.data_concurrency)
    phases["shards"] = pool.seconds
    t = time.perf_counter()
    if cfg.model.pretrained:
        init_dir = cfg.model.pretrained
        build_model(cfg.model, tokenizer, cfg.seed)  # fail before training if it cannot load
    else:
        model = build_model(cfg.model, tokenizer, cfg.seed)
        init_dir = str(output_dir / "init_model")
        model.save_pretrained(init_dir)
        del model
    phases["model_init"] = time.perf_counter() - t
    return tokenizer, str(tok_dir), pool, init_dir


def resolve_suite(cfg: RunConfig) -> Optional[str]:
    """The lm-eval suite to score the final checkpoint on, checked before any
    training: an unknown suite, or a hub suite whose datasets cannot be
    reached, fails here."""
    from raymix.eval import check_harness_suite, load_suite

    name = cfg.eval.suite
    if name == "auto":
        name = "ood_embedded" if all(s.kind == "synthetic" for s in cfg.data.sources) else None
    if not name:
        return None
    try:
        spec = load_suite(name)
    except RaymixError as e:
        raise RaymixError(str(e).replace("--suite", "eval.suite")) from None
    if spec["kind"] == "harness":
        check_harness_suite(spec)
    if spec["kind"] == "natural_instructions" and not cfg.eval.ni_dir:
        raise RaymixError(f"eval.suite={name} needs eval.ni_dir (a directory of held-out task files)")
    return name


RUN_FILE = "run.json"


def _identity_diff(saved: RunConfig, cfg: RunConfig) -> list[str]:
    from raymix.config import IDENTITY_SECTIONS, flatten

    a, b = flatten(saved), flatten(cfg)
    keys = sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] in IDENTITY_SECTIONS and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys]


def check_resumable(cfg: RunConfig, out: Path) -> dict:
    """The saved run record of ``out``, if ``cfg`` may continue it."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise RaymixError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
    saved = json.loads(run_file.read_text())
    if saved["identity"] != identity_hash(cfg):
        diff = _identity_diff(load_config(str(out / "config.yaml")), cfg)
        raise RaymixError(f"--resume: the config differs from the run in {out} in fields that change "
                          f"results: {'; '.join(diff) or saved['identity']}")
    return saved


def prepare_output(cfg: RunConfig, output_dir: str | Path, resume: bool, continue_hint: str
                   ) -> tuple[Path, Optional[dict]]:
    """The run's folder, checked before anything is written (a finished run
    is never overwritten, an unfinished one only continued with --resume),
    with its config.yaml; and the saved run to continue, if resuming."""
    # Absolute: Ray workers do not share the driver's working directory.
    out = Path(output_dir).resolve()
    if (out / "summary.json").exists():
        raise RaymixError(
            f"--output {out} already holds a finished run (summary.json); choose another directory"
        )
    saved = check_resumable(cfg, out) if resume else None
    if not resume and (out / RUN_FILE).exists():
        raise RaymixError(f"--output {out} holds an unfinished run ({RUN_FILE}); pass --resume to continue "
                          f"{continue_hint}, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "config.yaml").write_text(to_yaml(cfg))
    return out, saved


def open_tracker(cfg: RunConfig, out: Path, parent_run_id: Optional[str], saved: Optional[dict]):
    """The run's MLflow run: the saved one continued, or a new one recorded
    in OUTPUT/run.json (what --resume finds)."""
    from raymix.tracking import RunTracker

    if saved:
        return RunTracker(cfg, out, resume_run_id=saved["mlflow_run_id"], resume_uri=saved["mlflow_tracking_uri"])
    tracker = RunTracker(cfg, out, parent_run_id)
    (out / RUN_FILE).write_text(json.dumps({
        "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.uri,
        "mlflow_experiment_id": tracker.experiment_id, "identity": identity_hash(cfg),
        "started": time.time()}, indent=1))
    return tracker


def run(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None,
        resume: bool = False) -> dict:
    """Train under the budget, evaluate, write summary.json; return the summary.

    ``resume=True`` continues the unfinished run in ``output_dir`` (a killed
    driver, a failed attempt): the same MLflow run, Ray Train restoring the
    latest checkpoint in the run's storage."""
    if cfg.policy.name == "ideal":
        # Multi-round: one nested run of this function per round.
        from raymix.ideal import run_ideal

        return run_ideal(cfg, output_dir, parent_run_id, resume)
    from raymix.data import pool_summary
    from raymix.policies import PoolInfo
    from raymix.tracking import plot_mixture

    out, saved = prepare_output(cfg, output_dir, resume, "it from its last checkpoint")
    t0 = time.perf_counter()
    suite = resolve_suite(cfg)
    tracker = open_tracker(cfg, out, parent_run_id, saved)
    if saved:
        print(f"[raymix] resuming MLflow run {tracker.run_id} from the latest checkpoint in {out}", flush=True)
    status = "FAILED"
    try:
        if not saved:
            tracker.log_artifact(out / "config.yaml")
        phases: dict[str, float] = {"tracking_setup": time.perf_counter() - t0}
        t = time.perf_counter()
        init_ray(cfg)
        phases["ray_init"] = time.perf_counter() - t
        tokenizer, tok_dir, pool, init_dir = prepare_model_and_data(cfg, out, phases)
        stats = pool_summary(pool)
        budget = budget_tokens(cfg, pool.pool_tokens)
        tracker.log_json(pool.stats, "pool_stats.json", out)
        tracker.log_metrics(
            {"pool/tokens": stats["pool_tokens"], "pool/num_tasks": stats["num_tasks"],
             "pool/truncated": stats["truncated"], "pool/dropped": stats["dropped"],
             "pool/prepare_seconds": pool.seconds, "pool/cache_hit": float(pool.cache_hit),
             "budget/tokens": budget,
             **{f"pool/tokens/{t}": v for t, v in stats["tokens_per_task"].items()}}
        )
        print(f"[raymix] pool: {stats['num_tasks']} tasks, N={stats['pool_tokens']} tokens "
              f"(prepared in {pool.seconds:.1f}s, cache {'hit' if pool.cache_hit else 'miss'}; "
              f"over data.max_seq_len={cfg.data.max_seq_len}: {stats['truncated']} truncated, "
              f"{stats['dropped']} dropped); "
              f"budget {budget} tokens; policy {cfg.policy.name}", flush=True)

        t = time.perf_counter()
        summary = _train(cfg, out, tracker, pool, tok_dir, init_dir, budget,
                         PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), budget))
        phases["ray_train"] = time.perf_counter() - t
        if suite and not summary.get("gradex_scores_only"):
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
        _log_summary(tracker, summary, out, plot_mixture)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        tracker.log_artifact(out / "summary.json")
        status = "FINISHED"
        return summary
    finally:
        tracker.end(status)


def _train(cfg, out, tracker, pool, tok_dir, init_dir, budget, pool_info) -> dict:
    import ray
    import ray.train

    from raymix.mixer import start_mixer_actor

    mixer_name = f"mixer-{tracker.run_id}-{uuid.uuid4().hex[:6]}"
    mixer = start_mixer_actor(mixer_name, cfg.policy, pool_info, cfg.budget.max_epochs,
                              cfg.runtime.mixer_max_restarts)
    try:
        ray.get(mixer.mixture.remote(), timeout=120)  # surfaces policy errors here
        loop_config = {
            "run": to_dict(cfg),
            "pool": {"root": pool.root, "tasks": pool.tasks, "stats": pool.stats,
                     "cache_hit": pool.cache_hit, "seconds": pool.seconds},
            "budget_tokens": budget,
            "tokenizer_dir": tok_dir,
            "init_model_dir": init_dir,
            "mixer_name": mixer_name,
            "mlflow_run_id": tracker.run_id,
            "mlflow_tracking_uri": tracker.uri,
            "output_dir": str(out),
            "local_checkpoint_dir": str(out / "checkpoints") if cfg.runtime.num_workers == 0 else None,
        }
        if cfg.runtime.num_workers == 0:
            result, fit_started, fit_ended = _train_in_process(cfg, loop_config)
        else:
            result, fit_started, fit_ended = _train_on_workers(cfg, out, tracker, loop_config)
        aborted = (result.metrics or {}).get("aborted")
        if aborted:
            where = result.checkpoint.path if result.checkpoint is not None else "(no checkpoint)"
            raise RaymixError(f"{aborted}. The last good state (model, optimizer, data positions, mixer, "
                              f"ledger) is checkpointed at {where}")
    finally:
        ray.kill(mixer)
    return _summarise(cfg, out, tracker, result, fit_started, fit_ended, budget)


@dataclasses.dataclass
class _InProcessResult:
    metrics: Optional[dict]
    checkpoint: Any


def _train_in_process(cfg: RunConfig, loop_config: dict):
    """``runtime.num_workers=0``: the training function in this process (a
    Tune trial's, in a sweep), one rank, no worker group to start."""
    import ray.train

    from raymix.worker import InProcessSession, train_loop

    session = InProcessSession(cfg.runtime.use_gpu, loop_config["local_checkpoint_dir"])
    fit_started = time.time()
    train_loop(loop_config, session)
    fit_ended = time.time()
    with_ckpt = [(m, d) for m, d in session.reports if d]
    metrics = session.reports[-1][0] if session.reports else None
    checkpoint = ray.train.Checkpoint.from_directory(with_ckpt[-1][1]) if with_ckpt else None
    return _InProcessResult(metrics, checkpoint), fit_started, fit_ended


def _train_on_workers(cfg: RunConfig, out: Path, tracker, loop_config: dict):
    import ray.train
    from ray.train.torch import TorchTrainer

    from raymix.worker import train_loop

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.runtime.num_workers,
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
    if result.error:
        raise result.error
    return result, fit_started, fit_ended


def _summarise(cfg, out, tracker, result, fit_started, fit_ended, budget) -> dict:
    model_dir = out / "model"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, model_dir, dirs_exist_ok=True)
    ev = json.loads((model_dir / "raymix_eval.json").read_text())
    mix = ev["mixer"]
    val, em = ev["val_loss"], ev["test_exact_match"]
    finite = [v for v in val.values() if v == v]
    em_vals = [v for v in em.values() if v == v]
    micro = cfg.train.micro_batch_size * effective_grad_accum(cfg) * max(1, cfg.runtime.num_workers)
    summary = {
        "policy": cfg.policy.name,
        "seed": cfg.seed,
        "identity": identity_hash(cfg),
        "budget_tokens": budget,
        "train_tokens": mix["train_tokens"],
        "meta_tokens": mix["meta_tokens"],
        "meta_seconds": ev.get("meta_seconds", 0.0),
        "meta_steps": ev.get("meta_steps", 0),
        "curve": ev.get("curve", []),
        # Where a TorchTrainer run's time goes besides training: starting the
        # worker group, per-worker setup, and checkpointing plus shutdown.
        "ray_train_seconds": {
            "worker_start": ev["worker_entered_at"] - fit_started,
            "worker_setup": ev["worker_setup_seconds"],
            "train_loop": ev["loop_seconds"] + ev.get("curve_seconds", 0.0) + ev.get("checkpoint_seconds", 0.0),
            "checkpoints": ev.get("checkpoint_seconds", 0.0),
            "final_eval": ev["eval_seconds"],
            "report_and_shutdown": fit_ended - ev["reported_at"],
        },
        "curve_seconds": ev.get("curve_seconds", 0.0),
        # Worker-group restarts restored from a checkpoint, and mixer actor restarts.
        "restores": ev.get("restores", 0),
        "mixer_restarts": ev.get("mixer_restarts", 0),
        "meta_time_share": ev.get("meta_seconds", 0.0) / max(1e-9, ev["loop_seconds"]),
        "overshoot_tokens": mix["train_tokens"] - budget,
        "global_batch_examples": micro,
        "global_batch_tokens": micro * cfg.data.max_seq_len,
        "mean_step_tokens": ev["train_tokens"] / max(1, ev["steps"]),
        "loop_train_tokens": ev["train_tokens"],  # the workers' own all-reduced count
        "steps": ev["steps"],
        "ledger": mix["ledger"],
        "val_loss": val,
        "worst_val_loss": max(finite) if finite else float("nan"),
        "worst_val_task": max(val, key=lambda t: val[t] if val[t] == val[t] else -1.0),
        "mean_val_loss": sum(finite) / len(finite) if finite else float("nan"),
        "test_exact_match": em,
        "mean_test_exact_match": sum(em_vals) / len(em_vals) if em_vals else float("nan"),
        "tokens_per_second": ev["tokens_per_second"],
        "train_loop_seconds": ev["loop_seconds"],
        "eval_seconds": ev["eval_seconds"],
        "mixer_update_seconds": mix["mixer_update_seconds"],
        "mixture_schedule": mix["mixture_schedule"],
        "final_weights": mix["final_weights"],
        "spill_tokens": mix["spill_tokens"],
        "model_dir": str(model_dir.resolve()),
        "mlflow_run_id": tracker.run_id,
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_experiment_id": tracker.experiment_id,
    }
    if cfg.policy.name == "gradex":
        # Scores, selection, per-subset estimate vs actual (raymix.gradex_step);
        # scores_only runs stop after it, short of the budget.
        summary["gradex"] = ev.get("gradex")
        summary["gradex_scores_only"] = bool(ev.get("gradex_scores_only"))
    return summary


def _log_summary(tracker, summary: dict, out: Path, plot_mixture) -> None:
    metrics = {k: summary[k] for k in (
        "train_tokens", "meta_tokens", "budget_tokens", "overshoot_tokens", "worst_val_loss",
        "mean_val_loss", "mean_test_exact_match", "tokens_per_second", "wall_seconds",
        "train_loop_seconds", "eval_seconds", "mixer_update_seconds")}
    for t, v in summary["val_loss"].items():
        metrics[f"val_loss/{t}"] = v
    for t, v in summary["test_exact_match"].items():
        metrics[f"test_exact_match/{t}"] = v
    for t, row in summary["ledger"].items():
        metrics[f"ledger/{t}/train_tokens"] = row["train_tokens"]
        metrics[f"ledger/{t}/meta_tokens"] = row["meta_tokens"]
    tracker.log_metrics(metrics, step=summary["steps"])
    tracker.log_json(summary["ledger"], "ledger.json", out)
    tracker.log_json(summary["mixture_schedule"], "mixture_schedule.json", out)
    if summary.get("gradex"):
        tracker.log_json(summary["gradex"], "gradex.json", out)
    png = plot_mixture(summary["mixture_schedule"], summary["ledger"], out / "mixture.png",
                       summary["budget_tokens"])
    tracker.log_artifact(png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymix.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML run config (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set policy.name=proportional (repeatable)")
    parser.add_argument("--output", required=True, help="run directory (summary.json, model, MLflow store)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --output from its last checkpoint (its saved "
                             "config unless CONFIG/--set are given; runtime.* may change, nothing else)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = args.config
        if args.resume and config is None:
            saved = Path(args.output) / "config.yaml"
            if not saved.exists():
                raise RaymixError(f"--resume: {Path(args.output).resolve()} holds no run to resume (no config.yaml)")
            config = str(saved)
        cfg = load_config(config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        summary = run(cfg, args.output, resume=args.resume)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    keys = ("policy", "seed", "budget_tokens", "train_tokens", "overshoot_tokens", "worst_val_loss",
            "worst_val_task", "mean_val_loss", "mean_test_exact_match", "tokens_per_second", "wall_seconds", "restores",
            "mixer_restarts")
    if summary.get("gradex"):
        from raymix.gradex_step import score_table

        print(score_table(summary["gradex"]))
    if summary.get("gradex_scores_only"):
        print(f"[raymix] policy.gradex.scores_only: stopped after the estimation, at {summary['train_tokens']} "
              f"of {summary['budget_tokens']} train tokens (the meta initialisation)")
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    print(f"[raymix] wrote {Path(args.output) / 'summary.json'}; MLflow run {summary['mlflow_run_id']} "
          f"at {summary['mlflow_tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
