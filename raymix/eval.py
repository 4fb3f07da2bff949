"""Out-of-domain evaluation of a checkpoint with lm-eval.

    python -m raymix.eval --checkpoint RUN/model --suite ood_embedded --output DIR
        [--limit N] [--batch-size auto|N] [--ni-dir DIR] [--seed S] [--threads N]
        [--mlflow-run-id ID] [--tracking-uri URI] [--confirm-run-unsafe-code]

A *suite* is a file in ``raymix/eval_suites/`` naming lm-eval tasks and the
primary metric of each; ``aggregate`` is the mean of the primary metrics:

* ``ood_embedded``: the synthetic suite's held-out OOD tasks, generated at
  evaluation time (``generate_ood``, seeded) into JSONL, with lm-eval task
  YAMLs rendered from ``eval_suites/templates/``; fully offline.
* ``ni_heldout``: Natural Instructions task files from ``--ni-dir`` (tasks
  kept out of training), the same way.
* ``ood_paper``: 11 standard lm-eval benchmarks; their datasets are probed
  before any model is loaded, so an offline machine fails in seconds with the
  list of tasks that cannot run.

Prompts of the first two use raymix's plain training template
(``"{prompt}\\nAnswer:"``, answers scored as ``" {answer}"``, with the BOS
token first as in training); checkpoints fine-tuned with a chat template are
still scored in the plain format. The checkpoint (a Hugging Face model and
tokenizer directory, as raymix writes to ``<run>/model/``) and lm-eval's task
index are loaded once per call. Outputs in ``--output``: ``results.json``
(lm-eval's results), ``eval_summary.json`` (``{"tasks": {task: {metric:
value}}, "aggregate", "suite", "limit", "seconds", "primary_metrics"}``),
``samples/<task>.jsonl`` (every document with the model's answer) and
``lm_eval_tasks/`` (the rendered task YAMLs and data, usable with lm-eval's
own CLI through ``--include_path``). With ``--mlflow-run-id`` the metrics go
to that run as ``eval/<task>/<metric>`` and ``eval/aggregate``, and both JSON
files as artifacts under ``eval/<suite>/``.

Over 500 lines on purpose: one module per Ray role, and this is the lm-eval
role whole (suites, offline task rendering, the hub check, the CLI), which
the training driver and the command line share.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import string
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

import yaml

from raymix.errors import RaymixError

SUITES_DIR = Path(__file__).with_name("eval_suites")
TEMPLATES_DIR = SUITES_DIR / "templates"
KINDS = ("synthetic_ood", "natural_instructions", "harness")
# lm-eval's batch-size search runs full-length forward passes until one fails
# for memory, which on a CPU is slow and never fails cleanly: use a fixed size.
CPU_AUTO_BATCH_SIZE = 32
# On CPU, models below this size are evaluated on 1 torch thread unless told
# otherwise: their matmuls are too small for intra-op parallelism to pay, and on
# a busy 2-core machine 2 threads made ood_embedded 5x slower (100 s vs 18 s).
CPU_SINGLE_THREAD_PARAMS = 100_000_000
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


# ------------------------------------------------------------------ suites
def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> dict:
    """The suite file ``eval_suites/<name>.yaml``, checked, with ``name`` added."""
    from raymix.config import _suggest

    suites = list_suites()
    if name not in suites:
        raise RaymixError(
            f"--suite: unknown suite {name!r}; choose one of {', '.join(suites)}{_suggest(name, suites)}"
        )
    path = SUITES_DIR / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise RaymixError(f"{path}: 'kind' must be one of {', '.join(KINDS)}")
    if spec["kind"] != "natural_instructions":
        tasks = spec.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RaymixError(f"{path}: 'tasks' must be a non-empty list")
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or not t.get("task") or not t.get("primary_metric"):
                raise RaymixError(f"{path}: tasks[{i}] needs 'task' and 'primary_metric'")
        names = [t["task"] for t in tasks]
        if len(set(names)) != len(names):
            raise RaymixError(f"{path}: task names repeat")
    return {**spec, "name": name, "path": str(path)}


def metric_key(primary: str) -> str:
    """lm-eval's results key for a suite's primary metric (bare name: filter 'none')."""
    return primary if "," in primary else f"{primary},none"


def metric_name(key: str) -> str:
    """An lm-eval ``metric,filter`` key as written in eval_summary.json and MLflow."""
    metric, _, filt = key.partition(",")
    name = metric if filt in ("", "none") else f"{metric}/{filt}"
    return re.sub(r"[^\w.\- /]", "_", name.replace("@", "_at_"))


# --------------------------------------------------------- task rendering
def _substitute(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        return string.Template(value).safe_substitute(subs)
    if isinstance(value, dict):
        return {k: _substitute(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, subs) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks double-quoted ("...\\n..."), as in lm-eval's own YAMLs."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def render_task(template: str, out_dir: Path, task: str, subs: dict[str, str],
                merge: Optional[dict] = None) -> Path:
    """Write ``<out_dir>/<task>.yaml`` from ``templates/<template>.yaml``."""
    path = TEMPLATES_DIR / f"{template}.yaml"
    if not path.exists():
        raise RaymixError(f"eval suite: unknown template {template!r} (no {path})")
    cfg = _substitute(yaml.safe_load(path.read_text()), {"task": task, **subs})
    for key, value in (merge or {}).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    out = out_dir / f"{task}.yaml"
    out.write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _row(rec) -> dict:
    # Leading spaces: raymix renders a completion as " {completion}" after "Answer:".
    choices = [f" {c}" for c in rec.choices]
    return {
        "id": rec.id, "prompt": rec.prompt, "answer": rec.completion,
        "targets": [f" {r}" for r in rec.references],
        "choices": choices,
        "gold": choices.index(f" {rec.completion}") if f" {rec.completion}" in choices else -1,
    }


def _prepare_synthetic(suite: dict, work: Path, n: int, seed: int) -> dict[str, str]:
    from raymix.tasks.records import group_by_task
    from raymix.tasks.synthetic import generate_ood

    entries = suite["tasks"]
    ood = list(dict.fromkeys(e["ood_task"] for e in entries))
    by_task = group_by_task(generate_ood(n_per_task=n, seed=seed, tasks=ood))
    for name, recs in by_task.items():
        _write_jsonl(work / "data" / f"{name}.jsonl", [_row(r) for r in recs])
    primary = {}
    for e in entries:
        if e["template"] == "multiple_choice" and not by_task[e["ood_task"]][0].choices:
            raise RaymixError(f"{suite['path']}: {e['task']}: OOD task {e['ood_task']} has no choices")
        merge = {"generation_kwargs": suite.get("generation", {})} if e["template"] == "generate_until" else {}
        render_task(e["template"], work, e["task"], _subs(work, f"data/{e['ood_task']}.jsonl"), merge)
        primary[e["task"]] = metric_key(e["primary_metric"])
    return primary


def _prepare_ni(suite: dict, work: Path, n: int, ni_dir: Optional[str]) -> dict[str, str]:
    from raymix.tasks.natural_instructions import load_natural_instructions
    from raymix.tasks.records import group_by_task

    if not ni_dir:
        raise RaymixError(f"--suite {suite['name']} needs --ni-dir: a directory of held-out "
                          "Natural Instructions task files (task*.json)")
    records = load_natural_instructions(ni_dir, positive_examples=int(suite.get("positive_examples", 0)),
                                        max_instances=n, tasks=suite.get("tasks"))
    primary = {}
    for name, recs in group_by_task(records).items():
        task = f"{suite.get('task_prefix', 'ni_')}{name}"
        _write_jsonl(work / "data" / f"{name}.jsonl", [_row(r) for r in recs])
        render_task(suite.get("template", "generate_until"), work, task, _subs(work, f"data/{name}.jsonl"),
                    {"generation_kwargs": suite.get("generation", {})})
        primary[task] = metric_key(suite["primary_metric"])
    return primary


def _subs(work: Path, data_file: str) -> dict[str, str]:
    return {"data_file": str((work / data_file).resolve()), "hf_cache": str((work / "hf_cache").resolve())}


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.origin:
        raise RaymixError("lm-eval is not installed; install raymix's dependencies (lm-eval[hf])")
    return Path(spec.origin).parent / "tasks"


def _prepare_harness(suite: dict, work: Path) -> dict[str, str]:
    primary = {}
    for e in suite["tasks"]:
        base = _lm_eval_tasks_dir() / e["lm_eval_yaml"]
        render_task("harness_task", work, e["task"], {"lm_eval_yaml": str(base)},
                    {"num_fewshot": int(e["num_fewshot"])})
        primary[e["task"]] = metric_key(e["primary_metric"])
    return primary


# --------------------------------------------------- harness availability
def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _ensure_hub_mode() -> bool:
    """True when the hub is off limits: set so in the environment, or unreachable
    (then offline mode is switched on here, since datasets otherwise retries for
    tens of seconds per dataset before giving up)."""
    offline = any(_truthy(os.environ.get(v)) for v in _OFFLINE_VARS)
    if not offline:
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        port = url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=3).close()
        except OSError:
            offline = True
    if offline:
        for v in _OFFLINE_VARS:
            os.environ[v] = "1"
        # Modules already imported read these flags at import time.
        hub: Any = sys.modules.get("huggingface_hub.constants")
        if hub is not None:
            hub.HF_HUB_OFFLINE = True
        if "datasets.config" in sys.modules:
            cfg: Any = sys.modules["datasets.config"]
            cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True
    return offline


def _cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface")


def _offline_resource_found(kind: str, name: str) -> bool:
    """Whether a resource a task downloads at run time is already on disk (checked
    by path, without importing the libraries, which takes seconds)."""
    if kind == "hf_metric":  # Hugging Face evaluate's cache of hub metric scripts
        modules = Path(os.environ.get("HF_MODULES_CACHE") or _cache_home() / "modules")
        found = modules / "evaluate_modules" / "metrics" / f"evaluate-metric--{name}"
        return found.is_dir() and any(len(h.name) == 64 for h in found.iterdir())
    if kind == "nltk_data":  # nltk's default search path
        roots = [*filter(None, os.environ.get("NLTK_DATA", "").split(os.pathsep)), str(Path.home() / "nltk_data"),
                 *(str(Path(sys.prefix) / d) for d in ("nltk_data", "share/nltk_data", "lib/nltk_data")),
                 "/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
        return any(Path(r, name).exists() or Path(r, f"{name}.zip").exists() for r in roots)
    raise RaymixError(f"eval suite: unknown offline resource kind {kind!r} (hf_metric, nltk_data)")


def check_harness_suite(suite: dict, confirm_run_unsafe_code: bool = False) -> None:
    """Fail before any model is loaded if a task of a ``harness`` suite cannot run:
    its dataset cannot be loaded (``load_dataset_builder``, which reads only the
    hub's or the cache's metadata), a module it needs is missing, a file it
    downloads at run time is absent while offline (``offline_needs``), or it
    executes model-written code without ``confirm_run_unsafe_code``."""
    offline = _ensure_hub_mode()
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    no_data: dict[str, str] = {}
    other: list[str] = []
    for e in suite["tasks"]:
        task, base = e["task"], _lm_eval_tasks_dir() / e["lm_eval_yaml"]
        if not base.exists():
            other.append(f"{task}: lm-eval has no task file {e['lm_eval_yaml']}")
            continue
        cfg = load_yaml(base, resolve_func=False)
        missing = [m for m in e.get("requires", []) if importlib.util.find_spec(m) is None]
        if missing:
            other.append(f"{task}: missing Python module(s) {', '.join(missing)}")
        if offline:
            absent = [f"{kind} {name}" for kind, names in (e.get("offline_needs") or {}).items()
                      for name in names if not _offline_resource_found(kind, name)]
            if absent:
                other.append(f"{task}: offline and not on disk: {', '.join(absent)}")
        if cfg.get("unsafe_code") and not confirm_run_unsafe_code:
            other.append(f"{task}: executes model-written code; pass --confirm-run-unsafe-code")
        path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
        if not path:
            continue
        try:
            datasets.load_dataset_builder(path, name)
        except Exception as exc:  # any failure means lm-eval could not load it either
            no_data[task] = f"{path}" + (f" ({name})" if name else "") + f": {exc.__class__.__name__}"
    problems = []
    if no_data:
        mode = "offline (no hub, not in the datasets cache)" if offline else "from the hub or the cache"
        problems.append(f"datasets that could not be loaded {mode} for {len(no_data)} task(s): "
                        + ", ".join(no_data))
        problems += [f"  {task}: {why}" for task, why in no_data.items()]
    problems += other
    if problems:
        raise RaymixError(f"suite {suite['name']} cannot run (checked before loading the model; "
                          "nothing was evaluated):\n  " + "\n  ".join(problems))


# ------------------------------------------------------------- the model
def _eval_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer, made to put BOS first the way raymix's
    training does (prompt ids = BOS + tokens of the rendered prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    if getattr(tok, "chat_template", None):
        print(f"[raymix] warning: {checkpoint}'s tokenizer has a chat template; a run with "
              "data.template auto/chat trained in that format, but prompts here use the plain "
              "template", file=sys.stderr)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    bos = tok.bos_token_id
    if bos is None:
        return tok, False
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    if tok("a b")["input_ids"] != [bos] + plain:
        backend = getattr(tok, "_tokenizer", None)
        if backend is None:  # a slow tokenizer: leave it as it is
            return tok, False
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
            special_tokens=[(tok.bos_token, bos)])
    return tok, True


def _load_lm(checkpoint: Path, batch_size: Any):
    import torch
    from lm_eval.models.huggingface import HFLM

    cuda = torch.cuda.is_available()
    if batch_size == "auto" and not cuda:
        batch_size = CPU_AUTO_BATCH_SIZE
    tok, add_bos = _eval_tokenizer(checkpoint)
    # An absolute path: lm-eval asks the hub about anything shaped like a repo id.
    return HFLM(pretrained=str(checkpoint.resolve()), tokenizer=tok, add_bos_token=add_bos,
                device="cuda" if cuda else "cpu", dtype="auto" if cuda else "float32",
                batch_size=batch_size, max_batch_size=64)


# ------------------------------------------------------------- summaries
def summarise(results: dict, primary: dict[str, str]) -> tuple[dict[str, dict[str, float]], float]:
    """``{task: {metric: value}}`` (no stderrs) and the mean of the primary metrics."""
    tasks: dict[str, dict[str, float]] = {}
    scores = []
    for task, key in primary.items():
        row = results["results"].get(task)
        if row is None:
            raise RaymixError(f"lm-eval returned no results for task {task}")
        tasks[task] = {metric_name(k): float(v) for k, v in row.items()
                       if "," in k and "_stderr" not in k
                       and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metric_name(key) not in tasks[task]:
            raise RaymixError(f"task {task}: primary metric {key!r} is not among lm-eval's results "
                              f"({', '.join(k for k in row if ',' in k)}); fix the suite file")
        scores.append(tasks[task][metric_name(key)])
    return tasks, sum(scores) / len(scores)


def _write_outputs(out: Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", None) or {}
    (out / "samples").mkdir(exist_ok=True)
    for task, rows in samples.items():
        with (out / "samples" / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


def _mlflow_client(run_id: str, tracking_uri: Optional[str]):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise RaymixError(f"--mlflow-run-id {run_id}: no such run at {client.tracking_uri} "
                          f"({str(e)[:200]})") from None
    return client


def log_to_mlflow(client, run_id: str, summary: dict, out: Path) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(f"eval/{task}/{m}", v, ts, 0)
               for task, row in summary["tasks"].items() for m, v in row.items() if math.isfinite(v)]
    if math.isfinite(summary["aggregate"]):
        metrics.append(Metric("eval/aggregate", summary["aggregate"], ts, 0))
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for name in ("results.json", "eval_summary.json"):
        client.log_artifact(run_id, str(out / name), f"eval/{summary['suite']}")


# ------------------------------------------------------------ entry points
def _check_args(checkpoint: str, limit: Optional[int], batch_size: Any) -> tuple[Path, Any]:
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_dir():
        raise RaymixError(f"--checkpoint {checkpoint}: no such directory")
    if not (ckpt / "config.json").exists():
        raise RaymixError(f"--checkpoint {checkpoint}: not a Hugging Face checkpoint (no config.json); "
                          "give a run's model/ directory")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RaymixError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(batch_size, str) and batch_size != "auto":
        if not batch_size.isdigit():
            raise RaymixError(f"--batch-size must be 'auto' or a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise RaymixError(f"--batch-size must be 'auto' or a positive integer, got {batch_size!r}")
    return ckpt, batch_size


def evaluate_checkpoint(checkpoint: str, suite: str, output_dir: str, limit: int | None = None,
                        batch_size: Any = "auto", ni_dir: str | None = None, seed: int = 0,
                        mlflow_run_id: str | None = None, tracking_uri: str | None = None,
                        confirm_run_unsafe_code: bool = False, threads: int | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``suite``; write the outputs into ``output_dir``
    and return the eval_summary dict. ``limit``: documents per task (default:
    the suite's ``default_limit``). ``seed`` generates the synthetic documents and
    seeds lm-eval's sampling; greedy decoding makes the rest deterministic.
    ``threads``: torch CPU threads during the evaluation (default on CPU: 1 for
    models under 100M parameters, else torch's setting); restored afterwards."""
    t0 = time.perf_counter()
    spec = load_suite(suite)
    ckpt, batch_size = _check_args(checkpoint, limit, batch_size)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RaymixError(f"--threads must be a positive integer, got {threads!r}")
    limit = spec.get("default_limit") if limit is None else limit
    if limit is None and spec["kind"] != "harness":
        raise RaymixError(f"{spec['path']}: a generated suite needs a default_limit")
    client = _mlflow_client(mlflow_run_id, tracking_uri) if mlflow_run_id else None
    if spec["kind"] == "harness":
        check_harness_suite(spec, confirm_run_unsafe_code)
        if confirm_run_unsafe_code:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"

    out = Path(output_dir)
    work = out / "lm_eval_tasks"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if spec["kind"] == "synthetic_ood":
        primary = _prepare_synthetic(spec, work, int(limit or 0), seed)
    elif spec["kind"] == "natural_instructions":
        primary = _prepare_ni(spec, work, int(limit or 0), ni_dir)
    else:
        primary = _prepare_harness(spec, work)

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        lm = _load_lm(ckpt, batch_size)
        if threads is None and not torch.cuda.is_available() \
                and lm.model.num_parameters() < CPU_SINGLE_THREAD_PARAMS:
            torch.set_num_threads(1)
        manager = TaskManager(include_path=str(work), include_defaults=spec["kind"] == "harness")
        results = simple_evaluate(
            model=lm, tasks=list(primary), task_manager=manager,
            # Generated suites hold exactly `limit` documents; lm-eval's limit only for benchmarks.
            limit=limit if spec["kind"] == "harness" else None,
            log_samples=True, bootstrap_iters=1000, random_seed=seed,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
        )
    finally:
        torch.set_num_threads(prev_threads)  # the caller's process keeps its setting
        shutil.rmtree(work / "hf_cache", ignore_errors=True)
    if results is None:  # not rank 0 of a distributed run
        return {}
    _write_outputs(out, results)
    tasks, aggregate = summarise(results, primary)
    summary = {"tasks": tasks, "aggregate": aggregate, "suite": suite, "limit": limit,
               "seconds": round(time.perf_counter() - t0, 2),
               "primary_metrics": {t: metric_name(k) for t, k in primary.items()}}
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=1))
    if client is not None and mlflow_run_id:
        log_to_mlflow(client, mlflow_run_id, summary, out)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymix.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model + tokenizer directory")
    parser.add_argument("--suite", required=True, help=f"one of {', '.join(list_suites())}")
    parser.add_argument("--output", required=True, help="directory for results.json and eval_summary.json")
    parser.add_argument("--limit", type=int, default=None,
                        help="documents per task (default: the suite's default_limit)")
    parser.add_argument("--batch-size", default="auto", help=f"'auto' ({CPU_AUTO_BATCH_SIZE} on CPU) or N")
    parser.add_argument("--ni-dir", default=None, help="held-out Natural Instructions task files (ni_heldout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated documents and lm-eval")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on CPU: 1 for models under 100M parameters, else torch's)")
    parser.add_argument("--mlflow-run-id", default=None, help="log metrics and JSONs to this MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--confirm-run-unsafe-code", action="store_true",
                        help="allow tasks that execute model-written code (humaneval, mbpp)")
    args = parser.parse_args(argv)
    try:
        summary = evaluate_checkpoint(
            args.checkpoint, args.suite, args.output, limit=args.limit, batch_size=args.batch_size,
            ni_dir=args.ni_dir, seed=args.seed, mlflow_run_id=args.mlflow_run_id,
            tracking_uri=args.tracking_uri, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
            threads=args.threads)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    for task, row in summary["tasks"].items():
        key = summary["primary_metrics"][task]
        print(f"{task:40s} {key:28s} {row[key]:.4f}")
    print(f"[raymix] {summary['suite']}: aggregate {summary['aggregate']:.4f} over {len(summary['tasks'])} "
          f"tasks, limit {summary['limit']}, {summary['seconds']:.1f} s; wrote {Path(args.output) / 'eval_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
