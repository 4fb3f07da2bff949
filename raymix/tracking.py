"""MLflow tracking for a run: where the store is, the run's lifecycle, and the
end-of-run plot.

Default store: SQLite under the run's output directory (artifacts beside it).
``MLFLOW_TRACKING_URI`` (or ``tracking.tracking_uri``) points raymix at a
server instead; a server that does not answer fails the run before any
training time is spent.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from raymix.config import RunConfig, flatten, identity_hash
from raymix.errors import RaymixError

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Tags of the experiments raymix creates: ``mlflow.experimentKind``
``custom_model_development`` (the UI's "Machine learning" kind; the UI's
bundle lists ``genai_development``, ``custom_model_development``,
``finetuning``, ...) marks them as model training, for the UIs and tools
that read it. MLflow 3.17's UI reads it only with its GenAI / Model training
switch turned off, which it is not by default: the addresses raymix prints
set that switch (:func:`ui_url`)."""


def ui_url(base: str, experiment_id: str, run_id: Optional[str] = None) -> str:
    """The MLflow UI's page of an experiment (or of one of its runs) on the
    training view. MLflow 3.17's UI has a GenAI / Model training switch of
    its own (remembered by the browser, GenAI at first) that decides the
    view before ``mlflow.experimentKind`` is read; ``workflowType`` in the
    address sets it."""
    page = f"/runs/{run_id}" if run_id else ""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{page}?workflowType=machine_learning"


def resolve_tracking_uri(cfg: RunConfig, output_dir: Path) -> str:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{output_dir.resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an HTTP tracking server that does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise RaymixError(f"MLflow server {uri} answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError) as e:
        raise RaymixError(
            f"MLflow tracking server {uri} is unreachable ({e}); start it or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        ) from None


def check_active(experiment, uri: str, field: str) -> None:
    """Refuse an experiment deleted in MLflow (its name stays taken: MLflow
    makes no new one under it, and no run can be created in it)."""
    if experiment.lifecycle_stage != "active":
        raise RaymixError(f"MLflow experiment {experiment.name!r} at {uri} is deleted: restore it (mlflow "
                          f"experiments restore --experiment-id {experiment.experiment_id}), remove it for good "
                          f"(mlflow gc), or log to another experiment ({field})")


def _metric_items(metrics: dict[str, float], step: int, timestamp_ms: int) -> list:
    """The finite metrics as MLflow ``Metric`` entities."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]


def _batches(items: list) -> list[list]:
    """Batches of at most 900 (MLflow caps a batch at 1000 metrics)."""
    return [items[i : i + 900] for i in range(0, len(items), 900)]


def log_metrics(client, run_id, metrics: dict[str, float], step: int) -> None:
    for batch in _batches(_metric_items(metrics, step, int(time.time() * 1000))):
        client.log_batch(run_id, metrics=batch)


METRICS_THROUGH_TAG = "raymix.metrics_through_step"
"""Run tag: the last training step whose metrics were written (see :class:`MetricLogger`)."""


class MetricLogger:
    """The training loop's metrics (rank 0), written to MLflow so that each
    (key, step) has exactly one value, even across worker failures.

    Why buffered: after a worker failure Ray Train restarts the workers from
    the last checkpoint, and the steps after it are trained (and logged)
    again. MLflow cannot delete or replace a logged value, so anything written
    for those steps before the failure would stay beside the new value, and
    a chart would show two series. :meth:`log` therefore only keeps a step's
    metrics in memory; :meth:`commit` writes them when the checkpoint that
    covers their step is written (the loop calls it just before each
    checkpoint's report, and once before the final one). A failure loses the
    uncommitted interval, which the restarted workers train again and log
    once. The cost: MLflow's charts advance at checkpoint cadence
    (``train.checkpoint_tokens`` / ``checkpoint_fraction``), not per step;
    ``OUTPUT/progress/rank<R>.json`` follows every ``train.log_every`` steps.

    Why before the report, not after: Ray Train registers a reported
    checkpoint at its controller's next poll of the workers (every 2 s), so
    whether the restart begins at the newest checkpoint or the one before is
    not known to the worker. Committed after the report, a worker lost
    between the two restarts at the new checkpoint with the interval's
    buffer gone: those steps would never be written. Committed before, the
    restart either begins after them or retrains them; a run tag
    (:data:`METRICS_THROUGH_TAG`), set to the last committed step *before*
    the values are written and read when the logger starts, keeps retrained
    steps from being logged again. Only a failure in the middle of a commit
    can leave a step without some of its values, never with two.

    A commit writes synchronously in batches of up to 900 values: one
    synchronous call per step cost about 40 ms against SQLite (13% of a small
    model's training loop), one per checkpoint is negligible. The buffer holds
    one checkpoint interval: ``steps / log_every`` entries of the metrics
    dict, a few kB each for a few dozen tasks.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.buffer: list[tuple[int, int, dict[str, float]]] = []  # (step, timestamp ms, metrics)
        self.through = int(client.get_run(run_id).data.tags.get(METRICS_THROUGH_TAG, -1))
        """Steps at or below this are in the store already (committed by this or an earlier attempt)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.through:
            return  # an attempt whose newer checkpoint was lost logged this step already
        self.buffer.append((step, int(time.time() * 1000), dict(metrics)))

    def commit(self, through_step: Optional[int] = None) -> None:
        """Write the buffered metrics of every step up to ``through_step``
        (all of them by default); raises if the store refuses a batch."""
        ready = [e for e in self.buffer if through_step is None or e[0] <= through_step]
        if not ready:
            return
        self.buffer = [e for e in self.buffer if through_step is not None and e[0] > through_step]
        last = max(step for step, _, _ in ready)
        self.client.set_tag(self.run_id, METRICS_THROUGH_TAG, str(last))  # first: see the class docstring
        self.through = last
        items = [m for step, ts, metrics in ready for m in _metric_items(metrics, step, ts)]
        for batch in _batches(items):
            self.client.log_batch(self.run_id, metrics=batch)


ERROR_TAG = "raymix.error"
"""Run tag: why a FAILED run failed (the exception's type and message)."""


class RunTracker:
    """One MLflow run: created RUNNING, ended FINISHED or FAILED, never left open."""

    def __init__(self, cfg: RunConfig, output_dir: Path, parent_run_id: Optional[str] = None,
                 resume_run_id: Optional[str] = None, resume_uri: Optional[str] = None):
        self.uri = resume_uri or resolve_tracking_uri(cfg, output_dir)
        check_reachable(self.uri)
        self._client = None
        if resume_run_id:
            # The same run continues: marked RUNNING again, params already logged.
            try:
                run = self.client.get_run(resume_run_id)
            except Exception as e:
                raise RaymixError(f"--resume: MLflow run {resume_run_id} not found at {self.uri}: {e}") from None
            self.client.update_run(resume_run_id, status="RUNNING")
            if ERROR_TAG in run.data.tags:
                self.client.delete_tag(resume_run_id, ERROR_TAG)  # the failure it resumes from
            self.run_id, self.experiment_id = resume_run_id, run.info.experiment_id
            return
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:") or "://" not in self.uri:
                artifact_location = (output_dir.resolve() / "mlartifacts").as_uri()
            try:
                exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location,
                                                       tags=EXPERIMENT_TAGS)
            except Exception:  # created concurrently by another process
                exp_id = self.client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        else:
            check_active(exp, self.uri, "tracking.experiment")
            exp_id = exp.experiment_id
        tags = {
            "raymix.identity": identity_hash(cfg),
            "raymix.policy": cfg.policy.name,
            "raymix.seed": str(cfg.seed),
            "raymix.output_dir": str(output_dir.resolve()),
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(exp_id, tags=tags, run_name=cfg.tracking.run_name)
        self.run_id = run.info.run_id
        self.experiment_id = exp_id
        self.log_params(flatten(cfg))

    @classmethod
    def attached(cls, uri: str, run_id: str, experiment_id: str) -> RunTracker:
        """A run opened by another process (see
        ``raymix.driver.setup.prepare_out_of_process``). MLflow is imported at
        its first call, not here: a driver whose workers train holds no
        MLflow client while they do (about 100 MB, ``python -m raymix.bench
        memory``)."""
        tracker = cls.__new__(cls)
        tracker.uri, tracker.run_id, tracker.experiment_id, tracker._client = uri, run_id, experiment_id, None
        return tracker

    def ids(self) -> dict[str, str]:
        """What :meth:`attached` needs to continue this run elsewhere."""
        return {"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    @property
    def client(self):
        """The MLflow client, made at the first use."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, obj, name: str, directory: Path) -> Path:
        path = directory / name
        path.write_text(json.dumps(obj, indent=1))
        self.log_artifact(path)
        return path

    def log_summary(self, summary: dict, out: Path) -> None:
        """``OUTPUT/summary.json``, the mark of a finished run, and its
        artifact: written and logged under ``OUTPUT/.summary/``, then moved
        into place, so that a failure before (a full disk, a store refusing
        the artifact) leaves no summary.json, half written or beside a FAILED
        run, and the run resumable."""
        staged = out / ".summary" / "summary.json"
        staged.parent.mkdir(exist_ok=True)
        staged.write_text(json.dumps(summary, indent=1))
        self.log_artifact(staged)
        staged.replace(out / "summary.json")
        staged.parent.rmdir()

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the run; a failed one carries its error in the ``raymix.error`` tag."""
        if error:
            self.client.set_tag(self.run_id, ERROR_TAG, error[:4000])  # well under MLflow's cap on tag values
        self.client.set_terminated(self.run_id, status=status)


def mixture_lim(schedule: list, tasks: list) -> float:
    """The largest |log2(T w)| of a schedule (at least 1): a colour scale
    several heatmaps can share."""
    import numpy as np

    T = len(tasks)
    vals = [abs(float(np.log2(max(w.get(t, 0.0) * T, 1e-3)))) for _, w in schedule for t in tasks]
    return max([1.0] + vals)


LABEL_ALL_TASKS = 48
"""Up to this many tasks a plot names every task; above it tasks are sorted
(by weight, by tokens) and only the top and bottom :data:`LABELLED_TASKS` are named."""
LABELLED_TASKS = 10


def plot_height(T: int) -> float:
    """Inches for a plot with one row per task: 0.22 a row up to
    :data:`LABEL_ALL_TASKS` tasks, then no taller (rows become pixel lines)."""
    return max(4.5, 0.22 * min(T, LABEL_ALL_TASKS) + 1.5)


def sparse_labels(names: list[str], k: int = LABELLED_TASKS) -> list[str]:
    """The names of a sorted list's first and last ``k``, blank between."""
    if len(names) <= 2 * k:
        return list(names)
    return [n if (i < k or i >= len(names) - k) else "" for i, n in enumerate(names)]


def name_extremes(ax, names: list[str], values: list[float], unit: str, k: int = LABELLED_TASKS) -> None:
    """On a plot with one row per task sorted (``names``, top row first): row
    ranks as ticks, and the first and last ``k`` tasks named with their
    ``values`` in the left margin, beside the rows they are."""
    import numpy as np

    T = len(names)
    ranks = sorted({0, T // 4, T // 2, (3 * T) // 4, T - 1})
    ax.set_yticks(np.array(ranks) + 0.5)
    ax.set_yticklabels([f"#{r + 1}" for r in ranks], fontsize=7)
    top = "\n".join(f"{n} ({v:.3g}{unit})" for n, v in zip(names[:k], values[:k]))
    bottom = "\n".join(f"{n} ({v:.3g}{unit})" for n, v in zip(names[-k:], values[-k:]))
    kw = {"transform": ax.transAxes, "ha": "right", "fontsize": 6, "family": "monospace"}
    ax.text(-0.07, 1.0, f"top {k}:\n{top}", va="top", **kw)
    ax.text(-0.07, 0.0, f"bottom {k}:\n{bottom}", va="bottom", **kw)


def by_mean_weight(schedule: list, tasks: list) -> list:
    """Tasks sorted by their mean applied weight over a schedule, largest first."""
    import numpy as np

    mean = {t: float(np.mean([w.get(t, 0.0) for _, w in schedule])) for t in tasks}
    return sorted(tasks, key=lambda t: -mean[t])


def mixture_heatmap(ax, schedule: list, tasks: list, end: float, lim: Optional[float] = None):
    """Draw each task's applied weight relative to uniform (T * w, on a log2
    colour scale centred on 1 = uniform) over training tokens, task names on
    rows; ``lim``: the colour scale's half-range (default: this schedule's).
    Above :data:`LABEL_ALL_TASKS` tasks the rows are sorted by mean weight and
    only the top and bottom :data:`LABELLED_TASKS` are named.
    Returns the image for a colour bar, or None without a schedule."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    if not schedule:
        return None
    T = len(tasks)
    many = T > LABEL_ALL_TASKS
    if many:
        tasks = by_mean_weight(schedule, tasks)
    edges = [o for o, _ in schedule] + [max(end, schedule[-1][0] + 1)]
    rel = np.array([[max(w.get(t, 0.0) * T, 1e-3) for _, w in schedule] for t in tasks])
    z = np.log2(rel)
    lim = lim or max(1.0, float(np.abs(z).max()))
    img = ax.pcolormesh(edges, np.arange(T + 1), z, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim),
                        shading="flat")
    if many:
        mean_rel = [float(np.mean([w.get(t, 0.0) * T for _, w in schedule])) for t in tasks]
        name_extremes(ax, tasks, mean_rel, "x uniform")
        ax.set_ylabel(f"{T} tasks by mean weight", fontsize=8)
    else:
        ax.set_yticks(np.arange(T) + 0.5)
        ax.set_yticklabels(tasks, fontsize=max(4, min(8, int(400 / max(T, 1)))))
    ax.invert_yaxis()
    ax.set_xlabel("train tokens")
    return img


def plot_mixture(schedule: list, ledger: dict, path: Path, budget: int) -> Path:
    """Two panels a person can read: each task's weight relative to uniform
    over training tokens (a heatmap, task names on rows; red: more than
    uniform, blue: less), and train tokens per task with the uniform share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(ledger)
    T = max(1, len(tasks))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, plot_height(T)), gridspec_kw={"width_ratios": [3, 2]})
    end = max(budget, schedule[-1][0] if schedule else 0)
    img = mixture_heatmap(ax1, schedule, tasks, end)
    if img is not None:
        bar = fig.colorbar(img, ax=ax1, fraction=0.04, pad=0.01)
        bar.set_label("weight / uniform (log2: +1 = twice uniform)")
    ax1.set_title("applied mixture relative to uniform")
    consumed = [ledger[t]["train_tokens"] for t in tasks]
    if T > LABEL_ALL_TASKS:
        # One bar per task, sorted: the shape of the allocation, its extremes named.
        order = sorted(range(T), key=lambda i: -consumed[i])
        ax2.barh(np.arange(T) + 0.5, [consumed[i] for i in order], height=1.0)
        ax2.set_ylim(0, T)
        name_extremes(ax2, [tasks[i] for i in order], [consumed[i] for i in order], " tokens")
        ax2.set_ylabel(f"{T} tasks by train tokens", fontsize=8)
    else:
        ax2.barh(tasks, consumed)
        ax2.tick_params(axis="y", labelsize=7)
    ax2.axvline(sum(consumed) / T, color="k", linestyle="--", linewidth=1, label="uniform share")
    ax2.set_xlabel("train tokens consumed")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def end_if_running(uri: Optional[str], run_id: Optional[str]) -> None:
    """End FINISHED a finished run's MLflow run that is still RUNNING: its
    summary.json is written before the run is ended, so a driver killed
    between the two left it open (a sweep's trial or a multi-run driver's
    round found finished on ``--resume``). A run that is not in this store
    (a RegMix swarm shared with runs logged elsewhere) is left alone."""
    if not uri or not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        status = client.get_run(run_id).info.status
    except Exception:  # not in this store
        return
    if status == "RUNNING":
        client.set_terminated(run_id, "FINISHED")
