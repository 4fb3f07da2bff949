"""What every run does before it trains: Ray, the pool, the tokenizer and the
initial model, the budget in tokens, the lm-eval suite check, and the run's
output folder (``raymix.driver.output``) and MLflow run (new, or the saved
one to continue).

Used by the single run (``raymix.driver.single``), multi-run drivers such as
IDEAL's (``raymix.driver.ideal``), the sweep and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from raymix.config import RunConfig, identity_hash
from raymix.driver.output import RUN_FILE, prepare_output
from raymix.errors import RaymixError
from raymix.files import write_json


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    kwargs["num_cpus"] = cfg.runtime.num_cpus
    kwargs["object_store_memory"] = cfg.runtime.object_store_memory
    # A new local Ray (ray.init refuses num_cpus when it would join a running
    # cluster instead): one machine, no autoscaler, no node that a cloud can
    # drain. Set before it starts, so that its every process inherits them:
    # RAYMIX_LOCAL_RAY tells raymix's trainer so (see
    # raymix.driver.trainer.lean_trainer_class), and Ray Train's preemption
    # watcher, an actor (about 200 MB) polling for node drains that cannot
    # happen here, is off unless the user set it.
    env = {LOCAL_RAY_ENV: "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get(
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(**kwargs)
    except BaseException:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        raise


LOCAL_RAY_ENV = "RAYMIX_LOCAL_RAY"
"""Set to 1 in the environment of a local Ray instance that raymix started
(:func:`init_ray`): a single machine without an autoscaler."""


def runs_at_a_time(configs, cpus: float, extra_cpus: float, fixed: Optional[int] = None) -> int:
    """How many of these runs train at a time as Ray Tune trials (a sweep's
    trials, a RegMix swarm's proxies): ``fixed`` if set, else as many as
    ``cpus`` hold (a run reserves its workers' CPUs, one worker's in local
    mode, plus ``extra_cpus`` for its trial), one on 2 CPUs or fewer."""
    per_run = max(max(1, c.runtime.num_workers) * c.runtime.cpus_per_worker for c in configs) + extra_cpus
    return fixed or (max(1, int(cpus // per_run)) if cpus > 2 else 1)


def runs_as_trials(trainable, param_space: dict, configs, trial_cpus: float, concurrent: int, name: str,
                   storage: Path):
    """A Ray Tune ``Tuner`` that trains runs as trials (a sweep's, a RegMix
    swarm's proxies), ``concurrent`` at a time, none retried (a failed run
    fails its trial; finished ones are kept and reused on resume). A run in
    local mode trains in its trial's process, so its trial reserves a
    worker's CPUs beside ``trial_cpus``; otherwise its workers reserve
    theirs. Trials that follow each other reuse one process: a fresh one
    re-imported torch, transformers and MLflow and reloaded the tokenizer for
    every trial (about 7 s of a quickstart trial on 2 cores); a run keeps no
    state in its process, and all trials ask the same resources. Checkpoints
    go to ``RAYMIX_STORAGE`` (a bucket on clusters) or ``storage``."""
    from ray import tune

    local = max((c.runtime.cpus_per_worker for c in configs if c.runtime.num_workers == 0), default=0.0)
    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": trial_cpus + local}),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=os.environ.get("RAYMIX_STORAGE") or str(storage),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def enter_driver_dir() -> None:
    """Inside a Ray Tune trial, work in the directory the driver started
    from (Tune records it as ``TUNE_ORIG_WORKING_DIR``: locally the driver's,
    under ``ray job submit`` the job's working_dir on each node), so that
    relative paths in a space or ``--set`` (task files, models) mean what
    they meant there. ``RAY_CHDIR_TO_TRIAL_DIR=0`` would keep it too, but
    must be in the trial actors' environment before they start, which a
    driver joining a running cluster does not control."""
    if os.environ.get("TUNE_ORIG_WORKING_DIR"):
        os.chdir(os.environ["TUNE_ORIG_WORKING_DIR"])


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
    from raymix.data import cache_root, load_pool, pool_fingerprint, prepare_shards, saved_tokenizer_hash
    from raymix.models import build_model, load_tokenizer, local_or_hub, train_tokenizer

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
        tok_fp = "files:" + saved_tokenizer_hash(tok_dir)
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
        init_dir = local_or_hub(cfg.model.pretrained)
        build_model(cfg.model, tokenizer, cfg.seed)  # fail before training if it cannot load
    else:
        model = build_model(cfg.model, tokenizer, cfg.seed)
        init_dir = str(output_dir / "init_model")
        model.save_pretrained(init_dir)
        del model
    phases["model_init"] = time.perf_counter() - t
    return tokenizer, str(tok_dir), pool, init_dir


class _Preparer:
    """The one-off process of :func:`prepare_out_of_process`: an actor,
    killed once it answers (as a ``max_calls=1`` task it outlived a cold
    cache's Ray Data run, owning an object still referenced: 1 GB idle
    through training; README, "Limits")."""

    def run(self, cfg: RunConfig, output_dir: Path, cwd: str, tracking: Optional[tuple]):
        """:func:`prepare_model_and_data` from the driver's working directory
        (relative paths are the user's); with ``tracking`` (the parent run's
        id and the saved run record), the run's MLflow run opened first and
        the pool logged to it, as :func:`start_tracking` and :func:`log_pool` do."""
        os.chdir(cwd)
        phases: dict[str, float] = {}
        t = time.perf_counter()
        tracker = start_tracking(cfg, output_dir, *tracking, phases) if tracking is not None else None
        _, tok_dir, pool, init_dir = prepare_model_and_data(cfg, output_dir, phases)
        if tracker is not None:
            log_pool(tracker, cfg, pool, output_dir, tracking[1])
        return tok_dir, pool, init_dir, phases, time.perf_counter() - t, tracker.ids() if tracker else None


def prepare_out_of_process(cfg: RunConfig, output_dir: Path, phases: dict, tracking: Optional[tuple] = None
                           ) -> tuple[str, Any, str, Any]:
    """:func:`prepare_model_and_data` for a run whose training happens in Ray Train workers: in a one-off Ray
    worker process (:class:`_Preparer`). The driver then never loads the records, transformers or torch (the
    tokenizer and the initial model need them), and holds about 300 MB less while the workers train (``python -m
    raymix.bench memory``); the workers load both from the directories returned.

    With ``tracking`` (``(parent_run_id, saved)``), that process also opens the MLflow run and logs the pool to
    it: the driver then imports no MLflow while its workers train (about 100 MB); the tracker returned is
    attached to that run (else None), and the driver ends it (:func:`opened_tracker` after a failure). Returns
    the tokenizer's directory, the pool, the initial model's directory and the tracker; adds the phases to
    ``phases``, with ``prepare_process``: the seconds the process adds. An error is raised as it was raised
    there (a :class:`RaymixError` naming the bad file or field)."""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raymix.tracking import RunTracker

    # num_cpus=0, as the driver it stands for (Ray Data's actors take the
    # CPUs); no retry: a failure here is the input's. On the driver's node,
    # where the driver would have read and written its files.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    preparer = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, scheduling_strategy=here)(_Preparer).remote()
    t = time.perf_counter()
    try:
        tok_dir, pool, init_dir, got, inside, ids = ray.get(preparer.run.remote(cfg, output_dir, os.getcwd(), tracking))
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    finally:
        ray.kill(preparer, no_restart=True)
    phases.update(got)
    # The process's start and the transfers (counted with the preparation in reports).
    phases["prepare_process"] = max(0.0, time.perf_counter() - t - inside)
    return tok_dir, pool, init_dir, RunTracker.attached(**ids) if ids else None


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
    if spec["kind"] == "natural_instructions":  # eval.ni_dir given, and no task in it trained on
        from raymix.tasks.natural_instructions import check_held_out
        check_held_out(name, cfg.eval.ni_dir, spec.get("tasks"), cfg.data.sources)
    return name


def check_worker_resources(cfg: RunConfig, trial_cpus: float = 0.0) -> None:
    """Refuse a worker group that the local Ray raymix started can never
    place (it cannot autoscale: Ray Train would retry its start forever). On
    a cluster the autoscaler may add nodes, so it only says what it waits for.
    ``trial_cpus``: what the Tune trial that starts the group holds itself (a
    sweep's trial, a RegMix proxy), checked before any trial starts."""
    import ray

    if cfg.runtime.num_workers == 0:
        return
    # An elastic run starts once its minimum fits.
    workers = cfg.runtime.min_workers if cfg.runtime.elastic else cfg.runtime.num_workers
    want_cpu = workers * cfg.runtime.cpus_per_worker + trial_cpus
    want_gpu = workers if cfg.runtime.use_gpu else 0
    total = ray.cluster_resources()
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if want_cpu <= have_cpu + 1e-9 and want_gpu <= have_gpu:
        return
    named = "min_workers" if cfg.runtime.elastic else "num_workers"
    trial = f" + {trial_cpus:g} for its Tune trial" if trial_cpus else ""
    asked = (f"runtime.{named}={workers} x runtime.cpus_per_worker={cfg.runtime.cpus_per_worker}{trial}"
             f" = {want_cpu:g} CPU(s){f' and {want_gpu} GPU(s)' if want_gpu else ''}")
    if os.environ.get("RAY_ADDRESS"):
        print(f"[raymix] waiting for the cluster to place {asked}; it has {have_cpu:g} CPU(s) and "
              f"{have_gpu:g} GPU(s) now (the autoscaler may add nodes)", flush=True)
        return
    raise RaymixError(f"{asked}, but the local Ray has {have_cpu:g} CPU(s) and {have_gpu:g} GPU(s) "
                      "(runtime.num_cpus) and cannot grow: lower runtime.num_workers or "
                      "runtime.cpus_per_worker, or run on a cluster (RAY_ADDRESS)")


def open_tracker(cfg: RunConfig, out: Path, parent_run_id: Optional[str], saved: Optional[dict]):
    """The run's MLflow run: the saved one continued, or a new one recorded
    in OUTPUT/run.json (what --resume finds)."""
    from raymix.tracking import RunTracker

    if saved:
        # An explicit tracking URI wins over the saved one: a sweep's MLflow
        # server listens on another port after the sweep is resumed.
        return RunTracker(cfg, out, resume_run_id=saved["mlflow_run_id"],
                          resume_uri=cfg.tracking.tracking_uri or saved["mlflow_tracking_uri"])
    tracker = RunTracker(cfg, out, parent_run_id)
    # Whole or not at all: a half run.json would make the folder neither new nor resumable.
    write_json(out / RUN_FILE, {
        "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.uri,
        "mlflow_experiment_id": tracker.experiment_id, "identity": identity_hash(cfg),
        "started": time.time()}, indent=1)
    return tracker


def start_tracking(cfg: RunConfig, out: Path, parent_run_id: Optional[str], saved: Optional[dict], phases: dict):
    """:func:`open_tracker`, and a new run's config.yaml logged (phase ``tracking_setup``)."""
    t = time.perf_counter()
    tracker = open_tracker(cfg, out, parent_run_id, saved)
    if not saved:
        tracker.log_artifact(out / "config.yaml")
    phases["tracking_setup"] = time.perf_counter() - t
    return tracker


def opened_tracker(cfg: RunConfig, out: Path, saved: Optional[dict]):
    """The MLflow run opened by a preparation process that failed before
    returning it: the saved run continued, or the new one in OUTPUT/run.json
    (a new run's folder has none before it); None if there is none."""
    from raymix.tracking import RunTracker

    if saved:
        return RunTracker.attached(cfg.tracking.tracking_uri or saved["mlflow_tracking_uri"],
                                   saved["mlflow_run_id"], saved.get("mlflow_experiment_id", ""))
    try:
        rec = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return RunTracker.attached(rec["mlflow_tracking_uri"], rec["mlflow_run_id"], rec["mlflow_experiment_id"])


def log_pool(tracker, cfg: RunConfig, pool, out: Path, saved: Optional[dict]) -> None:
    """pool_stats.json, and the pool's and budget's figures at step 0 (once:
    a resumed run logged them when it started)."""
    from raymix.data import pool_summary
    from raymix.metrics_view import TaskMetricsView, per_task

    tracker.log_json(pool.stats, "pool_stats.json", out)
    if saved and "pool/tokens" in tracker.client.get_run(tracker.run_id).data.metrics:
        return
    stats = pool_summary(pool)
    tokens = stats["tokens_per_task"]
    tracker.log_metrics(TaskMetricsView(pool.tasks, cfg.tracking.per_task_metrics_max_tasks)(
        {"pool/tokens": stats["pool_tokens"], "pool/num_tasks": stats["num_tasks"],
         "pool/truncated": stats["truncated"], "pool/dropped": stats["dropped"],
         "pool/prepare_seconds": pool.seconds, "pool/cache_hit": float(pool.cache_hit),
         "budget/tokens": budget_tokens(cfg, pool.pool_tokens),
         "pool/tokens/{task}": per_task([tokens[t] for t in pool.tasks], "count")}, 0))


@dataclass
class RoundsRun:
    """What a multi-round driver's body works in (see :func:`rounds_run`)."""

    out: Path
    saved: Optional[dict]
    """The run record being resumed, or None for a new run."""
    tracker: Any
    t0: float
    """``time.perf_counter()`` when the driver started."""

    def combine(self, cfg: RunConfig, runs: list[dict], extra_meta_tokens: int = 0,
                extra_wall_seconds: float = 0.0) -> dict:
        """The driver's summary: the last run's (its ledger, losses and
        mixture), under this driver's identity and MLflow run, with the compute
        of every run. ``extra_*``: what the driver spent between runs (setup,
        scoring); runs' wall times come from their records, so a resumed
        driver still counts the runs it reused. ``wall_seconds`` is this
        driver invocation's own time. The last run's loss curve and lm-eval
        scores are copied onto this driver's MLflow run, where reports read them."""
        import copy

        last = runs[-1]
        _copy_round_metrics(self.tracker, last["mlflow_run_id"])
        summary = copy.deepcopy(last)
        summary.update({
            "policy": cfg.policy.name,
            "identity": identity_hash(cfg),
            "wall_seconds": time.perf_counter() - self.t0,
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "mlflow_experiment_id": self.tracker.experiment_id,
            "final_round": {k: last[k] for k in ("train_tokens", "meta_tokens", "wall_seconds", "mlflow_run_id",
                                                 "identity")},
            "total_train_tokens_all_rounds": int(sum(s["train_tokens"] for s in runs)),
            "total_meta_tokens_all_rounds": int(sum(s["meta_tokens"] for s in runs) + extra_meta_tokens),
            "total_wall_seconds_all_rounds": float(sum(s["wall_seconds"] for s in runs) + extra_wall_seconds),
        })
        return summary

    def write_summary(self, summary: dict) -> None:
        """``OUTPUT/summary.json``, also as an MLflow artifact (``RunTracker.log_summary``)."""
        self.tracker.log_summary(summary, self.out)


def _copy_round_metrics(tracker, round_run_id: str, prefixes=("curve/", "eval/")) -> None:
    """A multi-round policy's last round's loss curve (``curve/*``) and
    lm-eval scores (``eval/*``, logged by ``raymix.eval`` to the round's run)
    on the policy's own run, where the report reads them (IDEAL, DoReMi,
    RegMix); the eval JSON artifacts stay with the round."""
    from collections import defaultdict

    keys = [k for k in tracker.client.get_run(round_run_id).data.metrics if k.startswith(prefixes)]
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for key in keys:
        for m in tracker.client.get_metric_history(round_run_id, key):
            by_step[m.step][key] = m.value
    for step, metrics in sorted(by_step.items()):
        tracker.log_metrics(metrics, step=step)


@contextlib.contextmanager
def rounds_run(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str], resume: bool,
               kept: str = "rounds") -> Iterator[RoundsRun]:
    """The frame every multi-round driver (IDEAL's, DoReMi's, RegMix's) shares:
    the output folder checked (a finished run is never overwritten; with
    --resume the finished ``kept`` are reused), the lm-eval suite checked
    before round 1 rather than after the last, one MLflow run (new, or the
    saved one continued) with the config as its artifact, and that run
    ended FINISHED when the body returns, FAILED when it raises."""
    out, saved = prepare_output(cfg, output_dir, resume, f"it (finished {kept} are kept)")
    t0 = time.perf_counter()
    resolve_suite(cfg)
    tracker = open_tracker(cfg, out, parent_run_id, saved)
    if saved:
        print(f"[raymix] {cfg.policy.name}: resuming MLflow run {tracker.run_id} in {out}", flush=True)
    status = "FAILED"
    try:
        if not saved:
            tracker.log_artifact(out / "config.yaml")
        yield RoundsRun(out, saved, tracker, t0)
        status = "FINISHED"
    finally:
        tracker.end(status)
