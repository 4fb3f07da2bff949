"""Benchmarks that measure raymix against its yardstick in the same process run.

    python -m raymix.bench [NAME ...] --output DIR [--repeats N] [--warmup N]
        [--tasks 20,100,400,1000] [--config FILE] [--set key=value ...] [--report FILE]

Every benchmark repeats its measurement (``--repeats``, default per
benchmark), reports the median and the spread (min, max), and writes its
figures to DIR/bench.json and a table to DIR/bench.md. With no NAME, all run.

``throughput``: training tokens/s of the raymix path (Ray Train workers fed
by per-task streams over the Ray Data shards, with the mixer actor) with 1 and
2 workers and in-process (``runtime.num_workers=0``), against a plain
single-process PyTorch loop on the same model, micro-batch, sequence length,
data and thread count. Both are measured over the training loop alone
(start-up, curve evaluations and checkpoints are reported separately), and
their ratio is printed.

``meta_overhead``: ADAPT against uniform, wall time per training token in
one run each.

``task_scaling``: seconds of one ADAPT meta step (``MetaSignals.compute``)
and of one mixer update (``Mixer.report`` with meta signals) on pools of
20, 100, 400 and 1000 small synthetic tasks prepared by the real data path;
the yardstick is the smallest pool, and cost(1000)/cost(20) is reported
(target for the meta step: at most 3).

``data_plane``: rows/s and tokens/s of ``raymix.data.prepare_shards`` (Ray
Data, from an empty cache) against the same tokenisation in a plain
single-process loop, and the time of a cache hit.

``memory``: peak memory (RSS and PSS, summed over the process tree: driver,
Ray workers, and separately Ray's own GCS/raylet/agents) of a short raymix
run against the plain loop on the same model and tokens.

Ray starts with ``runtime.num_cpus`` CPUs (all cores when unset),
``runtime.object_store_memory`` and ``runtime.data_concurrency`` as set; each
benchmark's JSON records them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from raymix.config import RunConfig, load_config
from raymix.errors import RaymixError


def plain_loop(cfg: RunConfig, pool, init_dir: str, pad_id: int, tokens: int) -> dict:
    """The yardstick: a hand-written loop, uniform mixture, same model and batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from raymix.evaluate import token_nll
    from raymix.streams import collate, read_split

    torch.set_num_threads(cfg.runtime.torch_threads)
    data = []
    for task in pool.tasks:
        rows = read_split(pool.shard_dir("train", task), ["input_ids", "prompt_len"])
        data.append([(np.asarray(i, dtype=np.int64), int(p)) for i, p in zip(rows["input_ids"], rows["prompt_len"])])
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    done, steps = 0, 0
    t0 = time.perf_counter()
    while done < tokens:
        idx = rng.integers(len(data), size=cfg.train.micro_batch_size)
        batch = collate([data[i][rng.integers(len(data[i]))] for i in idx], pad_id)
        nll, cnt = token_nll(model, batch, "cpu")
        (nll.sum() / cnt.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += int(batch["attention_mask"].sum())
        steps += 1
    seconds = time.perf_counter() - t0
    return {"tokens": done, "steps": steps, "seconds": seconds, "tokens_per_second": done / seconds}


def bench_throughput(cfg: RunConfig, out: Path, repeats: int) -> dict:
    from dataclasses import replace

    from raymix.train import init_ray, prepare_model_and_data, run

    init_ray(cfg)
    tokenizer, _, pool, init_dir = prepare_model_and_data(cfg, out)
    budget = int(cfg.budget.tokens or round(cfg.budget.fraction * pool.pool_tokens))
    plain = [plain_loop(cfg, pool, init_dir, tokenizer.pad_token_id, budget) for _ in range(repeats)]
    rows = {"plain": plain}
    for workers in (0, 1, 2):  # 0: in-process (no Ray Train worker group)
        runs = []
        for r in range(repeats):
            c = replace(cfg, runtime=replace(cfg.runtime, num_workers=workers),
                        eval=replace(cfg.eval, max_test_examples=1))
            t0 = time.perf_counter()
            s = run(c, out / f"raymix-{workers}w-{r}")
            runs.append({"tokens": s["train_tokens"], "steps": s["steps"], "seconds": s["train_loop_seconds"],
                         "tokens_per_second": s["tokens_per_second"],
                         "wall_seconds": time.perf_counter() - t0})
        rows[f"raymix_{workers}w" if workers else "raymix_inprocess"] = runs
    med = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in rows.items()}
    spread = {k: (min(r["tokens_per_second"] for r in v), max(r["tokens_per_second"] for r in v))
              for k, v in rows.items()}
    return {
        "model": cfg.model.preset, "micro_batch_size": cfg.train.micro_batch_size,
        "torch_threads": cfg.runtime.torch_threads, "budget_tokens": budget, "repeats": repeats,
        "runs": rows, "median_tokens_per_second": med, "min_max_tokens_per_second": spread,
        "ratio_inprocess": med["raymix_inprocess"] / med["plain"],
        "ratio_1w": med["raymix_1w"] / med["plain"], "ratio_2w": med["raymix_2w"] / med["plain"],
    }


def bench_meta_overhead(cfg: RunConfig, out: Path, repeats: int) -> dict:
    """Wall time per training token of ADAPT against uniform, same budget,
    model, data and workers, measured back to back in this process. The
    training loop's time includes the meta steps; curve evaluations, start-up
    and the final evaluation are excluded from both."""
    from dataclasses import replace

    from raymix.train import init_ray, run

    init_ray(cfg)
    rows: dict[str, list] = {"uniform": [], "adapt": []}
    for r in range(repeats):
        for policy in rows:
            c = replace(cfg, policy=replace(cfg.policy, name=policy), eval=replace(cfg.eval, max_test_examples=1))
            s = run(c, out / f"{policy}-{r}")
            rows[policy].append({"train_tokens": s["train_tokens"], "loop_seconds": s["train_loop_seconds"],
                                 "meta_seconds": s["meta_seconds"], "meta_steps": s["meta_steps"],
                                 "meta_tokens": s["meta_tokens"],
                                 "seconds_per_ktoken": 1000 * s["train_loop_seconds"] / s["train_tokens"]})
    med = {k: statistics.median(x["seconds_per_ktoken"] for x in v) for k, v in rows.items()}
    return {"model": cfg.model.preset, "budget": cfg.budget.tokens or cfg.budget.fraction,
            "workers": cfg.runtime.num_workers, "repeats": repeats, "runs": rows,
            "median_seconds_per_ktoken": med, "ratio": med["adapt"] / med["uniform"],
            "adapt": {k: getattr(cfg.policy.adapt, k) for k in ("every_steps", "tasks_per_step", "examples_per_task",
                                                                "val_examples_per_task", "params", "sketch_dim")}}



# ----------------------------------------------------------------------------
# Shared helpers


def _stats(values: Sequence[float]) -> dict:
    """Median and spread of repeated measurements."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _timed(fn, warmup: int, repeats: int) -> tuple[list[float], object]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones;
    also the last call's result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _ray_settings(cfg: RunConfig) -> RunConfig:
    """The run's config with the local Ray instance's CPUs made explicit (all
    cores when unset), so that the figures say what they ran on."""
    import os
    from dataclasses import replace

    return replace(cfg, runtime=replace(cfg.runtime, num_cpus=cfg.runtime.num_cpus or os.cpu_count() or 1))


def _ray_info(cfg: RunConfig) -> dict:
    return {"num_cpus": cfg.runtime.num_cpus, "object_store_memory": cfg.runtime.object_store_memory,
            "data_concurrency": cfg.runtime.data_concurrency, "torch_threads": cfg.runtime.torch_threads}


# ----------------------------------------------------------------------------
# task_scaling


def write_synthetic_tasks(path: Path, tasks: int, examples: int, seed: int = 0) -> Path:
    """``tasks`` small JSONL tasks of ``examples`` examples each (80% train,
    10% val, 10% test, given in the file), cheap to generate at any count.
    Task k asks for the sum of four numbers and k, or for each number plus
    k, so that tasks differ in what they ask and in their answer lengths."""
    rng = np.random.default_rng([seed, tasks])
    path.mkdir(parents=True, exist_ok=True)
    n_val = max(1, examples // 10)
    lines = []
    for k in range(tasks):
        for i in range(examples):
            xs = rng.integers(0, 100, size=4)
            if k % 2:
                prompt, completion = f"Task {k}: add {k} to each of {' '.join(map(str, xs))}.", " ".join(
                    str(x + k) for x in xs)
            else:
                prompt, completion = f"Task {k}: the sum of {' '.join(map(str, xs))} and {k}?", str(xs.sum() + k)
            split = "val" if i < n_val else "test" if i < 2 * n_val else "train"
            lines.append(json.dumps({"task": f"t{k:04d}", "id": f"{k}-{i}", "split": split,
                                     "prompt": prompt, "completion": completion}))
    f = path / "tasks.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def _meta_and_mixer_costs(cfg: RunConfig, pool, tokenizer, init_dir: str, warmup: int, repeats: int) -> dict:
    """One task count's point of ``task_scaling``."""
    from dataclasses import replace

    import torch
    from transformers import AutoModelForCausalLM

    from raymix.meta import MetaSignals
    from raymix.mixer import Mixer
    from raymix.policies import PoolInfo

    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.train()
    meta = MetaSignals(model, cfg.policy.adapt, pool, 0, 1, cfg.seed, tokenizer.pad_token_id,
                       torch.device("cpu"), False)
    meta_times, signals = _timed(lambda: meta.compute(lookahead_lr=cfg.train.lr), warmup, repeats)

    # A budget of one epoch of the pool, so that one interval's report leaves
    # budget over and the repetition cap is applied (a spent budget skips it).
    info = PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), pool.pool_tokens)
    mixers = iter([Mixer(replace(cfg.policy, name="adapt"), info, max(1.0, cfg.budget.max_epochs))
                   for _ in range(warmup + repeats)])
    # One meta interval's report to a fresh mixer each time: examples drawn
    # from the mixture, their tokens and losses, and the meta step's signals.
    interval = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.policy.adapt.every_steps
    picks = np.random.default_rng(cfg.seed).multinomial(interval, np.full(len(pool.tasks), 1 / len(pool.tasks)))
    per_example = pool.pool_tokens / max(1, int(pool.train_examples().sum()))
    delta = np.minimum(np.round(picks * per_example), pool.train_tokens()).astype(np.int64).tolist()
    loss_sum, loss_count = (picks * 40.0).tolist(), (picks * 20.0).tolist()
    mixer_times, _ = _timed(lambda: next(mixers).report(delta, loss_sum, loss_count, signals["meta_tokens"],
                                                        signals), warmup, repeats)
    return {"meta_step_seconds": meta_times, "meta_step": _stats(meta_times),
            "meta_tokens_per_step": int(np.sum(signals["meta_tokens"])),
            "val_tasks_read": signals.get("val_tasks_read"),
            "mixer_report_seconds": mixer_times, "mixer_report": _stats(mixer_times)}


def bench_task_scaling(cfg: RunConfig, out: Path, repeats: int, warmup: int = 1,
                       task_counts: Sequence[int] = (20, 100, 400, 1000), examples_per_task: int = 40) -> dict:
    """Seconds of one ADAPT meta step (``MetaSignals.compute``: one process,
    world 1, CPU, ``runtime.torch_threads`` threads, the run's model preset
    and ``policy.adapt`` settings) and of one mixer update (``Mixer.report``
    with a meta interval's ledger delta and that step's signals, each to a
    fresh mixer whose budget, one epoch of the pool, is not yet spent, so the
    repetition cap is applied; in process: the actor call's transport is not
    included) at each task count.

    Each pool is that many small JSONL tasks (:func:`write_synthetic_tasks`,
    ``examples_per_task`` examples each) prepared by the real data path
    (``prepare_model_and_data``: a tokenizer trained on the pool, Ray Data
    shards, the initial model), cached under DIR/cache; Ray is started only
    for that. The yardstick is the smallest task count: ``*_ratio`` is
    cost(largest) / cost(smallest), of medians over ``repeats`` timed calls
    after ``warmup`` untimed ones. Target: meta step ratio <= 3."""
    from dataclasses import replace

    import torch

    from raymix.config import SourceConfig
    from raymix.train import init_ray, prepare_model_and_data

    cfg = _ray_settings(cfg)
    init_ray(cfg)
    torch.set_num_threads(cfg.runtime.torch_threads)
    rows: dict[str, dict] = {}
    for n in task_counts:
        src = write_synthetic_tasks(out / "sources" / f"T{n}", n, examples_per_task, cfg.seed)
        c = replace(cfg, data=replace(cfg.data, sources=[SourceConfig(kind="jsonl", path=str(src))],
                                      cache_dir=str((out / "cache").resolve())))
        t0 = time.perf_counter()
        tokenizer, _, pool, init_dir = prepare_model_and_data(c, out / f"T{n}")
        rows[str(n)] = {"tasks": n, "pool_tokens": pool.pool_tokens, "prepare_seconds": time.perf_counter() - t0,
                        "cache_hit": pool.cache_hit,
                        **_meta_and_mixer_costs(cfg, pool, tokenizer, init_dir, warmup, repeats)}
    lo, hi = str(min(task_counts)), str(max(task_counts))
    meta_ratio = rows[hi]["meta_step"]["median"] / rows[lo]["meta_step"]["median"]
    mixer_ratio = rows[hi]["mixer_report"]["median"] / rows[lo]["mixer_report"]["median"]
    return {
        "model": cfg.model.preset, "examples_per_task": examples_per_task, "repeats": repeats, "warmup": warmup,
        "ray": _ray_info(cfg),
        "adapt": {k: getattr(cfg.policy.adapt, k) for k in ("tasks_per_step", "examples_per_task",
                                                            "val_examples_per_task", "params", "sketch_dim")},
        "task_counts": list(task_counts), "runs": rows,
        "meta_step_ratio": meta_ratio, "mixer_report_ratio": mixer_ratio,
        "target_meta_step_ratio": 3.0, "target_met": meta_ratio <= 3.0,
    }


# ----------------------------------------------------------------------------
# data_plane


def _tokenizer_for(cfg: RunConfig, records: list, out: Path) -> tuple[str, str]:
    """The run's tokenizer, as ``prepare_model_and_data`` gets it (trained on
    the pool and cached, or the model's): its directory and fingerprint."""
    from raymix.data import cache_root, pool_fingerprint
    from raymix.models import load_tokenizer, train_tokenizer
    from raymix.train import TOKENIZER_SAMPLE, tokenizer_corpus

    if cfg.model.pretrained or cfg.model.tokenizer:
        name = cfg.model.tokenizer or cfg.model.pretrained
        tok = load_tokenizer(name)
        tok.save_pretrained(str(out / "tokenizer"))
        return str(out / "tokenizer"), f"{name}:{len(tok)}"
    _, path = train_tokenizer(lambda: tokenizer_corpus(records), cfg.model.vocab_size, cache_root(cfg.data),
                              f"{pool_fingerprint(cfg.data)}:sample{TOKENIZER_SAMPLE}")
    return path, f"trained:{path}"


def plain_tokenise(records: list, tokenizer_dir: str, data_cfg, dest: Path, batch_size: int = 1024) -> dict:
    """The yardstick of ``data_plane``: the records tokenised in this one
    process by the same callable the Ray Data actors run (``raymix.data.
    Tokenize``: same tokenizer, template, truncation; batches of the same
    size), then written as Parquet partitioned by split and task like the
    shards."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from raymix.data import Tokenize

    t0 = time.perf_counter()
    tasks = tuple(dict.fromkeys(r.task for r in records))
    index = {t: i for i, t in enumerate(tasks)}
    refs = np.empty(len(records), dtype=object)
    refs[:] = [list(r.references) for r in records]
    cols = {"task_idx": np.array([index[r.task] for r in records]), "split": np.array([r.split for r in records]),
            "id": np.array([r.id for r in records]), "prompt": np.array([r.prompt for r in records], dtype=object),
            "completion": np.array([r.completion for r in records], dtype=object), "references": refs}
    tokenize = Tokenize(tokenizer_dir, data_cfg.template, data_cfg.max_seq_len)
    t1 = time.perf_counter()
    tables = [tokenize({k: v[i:i + batch_size] for k, v in cols.items()}) for i in range(0, len(records), batch_size)]
    table = pa.concat_tables(tables)
    t2 = time.perf_counter()
    pads.write_dataset(table, str(dest), format="parquet", partitioning=["split", "task_idx"],
                       partitioning_flavor="hive", existing_data_behavior="delete_matching")
    t3 = time.perf_counter()
    kept = table.filter(pc.not_equal(table["status"], "dropped"))
    return {"rows": len(records), "tokens": int(pc.sum(kept["n_tokens"]).as_py()), "seconds": t3 - t0,
            "tokenise_seconds": t2 - t1, "write_seconds": t3 - t2}


def bench_data_plane(cfg: RunConfig, out: Path, repeats: int, warmup: int = 1) -> dict:
    """Throughput of the pool preparation: ``raymix.data.prepare_shards``
    (Ray Data ``map_batches`` over tokenizer actors, Parquet shards per split
    and task, token statistics) on the run's pool, from a fresh empty cache
    directory at each repeat (the cold path), against :func:`plain_tokenise`
    on the same records in this process; and the cache hit (a second
    ``prepare_shards`` call on the same cache: checks every file's size and
    SHA-256 against the cache's manifest, then reads ``stats.json``).

    Both are timed from records in memory to Parquet on disk: loading the
    records (``records_seconds``) and training the tokenizer are done once,
    before, and timed by neither. Rows are all examples of all splits; tokens
    are those of the examples kept (not dropped for length). Warm-up: each
    path once on a 1-in-20 sample of the records (starts Ray Data's
    executor and loads the tokenizer code). Hugging Face fast tokenizers
    encode a batch on several threads in both paths."""
    import os
    import shutil
    from dataclasses import replace

    import ray

    from raymix.data import load_pool, pool_fingerprint, prepare_shards
    from raymix.train import init_ray

    cfg = _ray_settings(cfg)
    init_ray(cfg)
    t0 = time.perf_counter()
    records = load_pool(cfg.data)
    records_seconds = time.perf_counter() - t0
    tok_dir, tok_fp = _tokenizer_for(cfg, records, out)
    fingerprint = pool_fingerprint(cfg.data)
    free = ray.available_resources().get("CPU", 1)
    actors = max(1, min(cfg.runtime.data_concurrency, int((free - 0.1) // 0.9)))
    scratch = out / "scratch"

    def ray_path(recs: list, fp: str, tag: str) -> tuple[dict, dict]:
        data = replace(cfg.data, cache_dir=str((scratch / tag).resolve()))
        shutil.rmtree(data.cache_dir, ignore_errors=True)
        cold = prepare_shards(lambda: recs, fp, tok_dir, tok_fp, data, cfg.runtime.data_concurrency)
        hit = prepare_shards(lambda: recs, fp, tok_dir, tok_fp, data, cfg.runtime.data_concurrency)
        if cold.cache_hit or not hit.cache_hit:
            raise RuntimeError("data_plane: the cold run must miss the cache and the second call hit it")
        tokens = sum(cold.stats[s][t]["tokens"] for s in ("train", "val", "test") for t in cold.tasks)
        shutil.rmtree(data.cache_dir, ignore_errors=True)
        return {"rows": len(recs), "tokens": tokens, "seconds": cold.seconds}, {"seconds": hit.seconds}

    def plain_path(recs: list, tag: str) -> dict:
        dest = scratch / f"plain-{tag}"
        shutil.rmtree(dest, ignore_errors=True)
        r = plain_tokenise(recs, tok_dir, cfg.data, dest)
        shutil.rmtree(dest, ignore_errors=True)
        return r

    sample = records[::20]
    for w in range(warmup):
        ray_path(sample, f"{fingerprint}:warmup{w}", f"warmup{w}")
        plain_path(sample, f"warmup{w}")
    rows: dict[str, list] = {"ray_data": [], "plain": [], "cache_hit": []}
    for r in range(repeats):
        cold, hit = ray_path(records, fingerprint, f"cold{r}")
        rows["ray_data"].append(cold)
        rows["cache_hit"].append(hit)
        rows["plain"].append(plain_path(records, str(r)))
    for k in ("ray_data", "plain"):
        for x in rows[k]:
            x["rows_per_second"] = x["rows"] / x["seconds"]
            x["tokens_per_second"] = x["tokens"] / x["seconds"]
    shutil.rmtree(scratch, ignore_errors=True)
    summary = {k: {m: _stats([x[m] for x in rows[k]]) for m in ("seconds", "rows_per_second", "tokens_per_second")}
               for k in ("ray_data", "plain")}
    summary["cache_hit"] = {"seconds": _stats([x["seconds"] for x in rows["cache_hit"]])}
    return {
        "sources": [s.kind for s in cfg.data.sources], "rows": len(records), "tasks": len({r.task for r in records}),
        "tokens": rows["ray_data"][0]["tokens"], "tokens_match": rows["ray_data"][0]["tokens"] == rows["plain"][0]["tokens"],
        "records_seconds": records_seconds, "template": cfg.data.template, "max_seq_len": cfg.data.max_seq_len,
        "ray": {**_ray_info(cfg), "tokenizer_actors": actors},
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default"),
        "repeats": repeats, "warmup": warmup, "runs": rows, "summary": summary,
        "ratio_tokens_per_second": summary["ray_data"]["tokens_per_second"]["median"]
        / summary["plain"]["tokens_per_second"]["median"],
    }


# ----------------------------------------------------------------------------
# memory

RAY_SYSTEM_EXES = ("gcs_server", "raylet")
RAY_SYSTEM_SCRIPTS = ("dashboard/agent.py", "dashboard/dashboard.py", "runtime_env/agent", "log_monitor.py",
                      "autoscaler/_private/monitor.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


class TreeSampler:
    """Peak memory of a process and all its descendants, sampled in a thread.

    Every ``interval`` seconds it lists the root and its descendants (psutil,
    recursive children: a local Ray instance's GCS, raylet and agents are
    children of the driver that started it, and Ray's worker processes are
    children of the raylet) and reads each one's RSS and PSS. Processes are
    grouped at each sample by their executable and script (not their
    arguments: the raylet's name the worker script): ``driver`` (the root),
    ``ray_system`` (GCS server, raylet, dashboard and runtime-env agents, log
    monitor), ``workers`` (Ray worker processes, ``default_worker.py`` or a
    ``ray::`` title: Ray Train's workers and its own controller actors, the
    mixer actor, Ray Data tokenizer actors, idle pooled workers) and
    ``other``. Each group's figure is the peak over
    samples of its sum at one instant; ``total`` likewise over all groups.
    RSS counts shared pages (the Python interpreter, torch's libraries, the
    object store's shared memory) once per process that maps them, so a sum
    over processes overstates physical memory; PSS divides shared pages
    between the processes that map them and sums to what the tree occupies.
    A spike shorter than the interval can be missed; the kernel's exact peak
    of the root process alone (``VmHWM``) is reported beside it."""

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.kinds: dict[int, str] = {}
        self.procs: dict[int, object] = {}
        self.each: dict[int, dict] = {}  # per process: title, group, peak RSS and PSS
        self.peak: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _argv(proc) -> list[str]:
        try:
            return proc.cmdline()
        except Exception:  # gone, or not readable
            return []

    def _title(self, proc) -> str:
        return " ".join(self._argv(proc))

    def _kind(self, proc) -> Optional[str]:
        """The process's group; None when its command line cannot be read
        (exiting, or between fork and exec)."""
        if proc.pid == self.root.pid:
            return "driver"
        argv = self._argv(proc)
        if not argv:
            return None
        # The program and its script: "python [-u] script.py", or a title set by Ray.
        head = [argv[0]] + [a for a in argv[1:3] if not a.startswith("-")][:1]
        if Path(argv[0].split(" ")[0]).name in RAY_SYSTEM_EXES or any(
                s in h for s in RAY_SYSTEM_SCRIPTS for h in head):
            return "ray_system"
        if argv[0].startswith("ray::") or any(h.endswith("default_worker.py") for h in head):
            return "workers"
        return "other"

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        sums: dict[str, dict[str, float]] = {}
        for proc in procs:
            # Keep one Process object per pid: psutil checks it is still the same process.
            proc = self.procs.setdefault(proc.pid, proc)
            try:
                mem = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            # At every sample: a process caught between fork and exec shows its
            # parent's command line, or none, and Ray renames its workers.
            kind = self.kinds[proc.pid] = self._kind(proc) or self.kinds.get(proc.pid, "other")
            one = self.each.setdefault(proc.pid, {"group": kind, "title": "", "rss": 0.0, "pss": 0.0})
            one["group"] = kind
            if mem.rss > one["rss"] or not one["title"]:
                # Ray renames a worker when it takes a task: keep the title at its peak.
                one["title"] = self._title(proc)[:300] or one["title"]
            one["rss"], one["pss"] = max(one["rss"], mem.rss), max(one["pss"], mem.pss)
            for group in (kind, "total") + (("driver_and_workers",) if kind in ("driver", "workers") else ()):
                s = sums.setdefault(group, {"rss": 0.0, "pss": 0.0, "processes": 0})
                s["rss"] += mem.rss
                s["pss"] += mem.pss
                s["processes"] += 1
        self.samples += 1
        self.max_processes = max(self.max_processes, len(procs))
        for group, s in sums.items():
            p = self.peak.setdefault(group, {"rss": 0.0, "pss": 0.0, "processes": 0})
            for k in ("rss", "pss", "processes"):
                p[k] = max(p[k], s[k])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mib = 1024**2
        return {"samples": self.samples, "interval_seconds": self.interval, "max_processes": self.max_processes,
                "peak_mib": {g: {"rss": p["rss"] / mib, "pss": p["pss"] / mib, "processes": p["processes"]}
                             for g, p in sorted(self.peak.items())},
                "processes_seen": {k: sum(1 for v in self.kinds.values() if v == k)
                                   for k in sorted(set(self.kinds.values()))},
                "processes": [{"pid": pid, "group": e["group"], "title": e["title"],
                               "peak_rss_mib": e["rss"] / mib, "peak_pss_mib": e["pss"] / mib}
                              for pid, e in sorted(self.each.items(), key=lambda kv: -kv[1]["rss"])]}


def _self_peak_mib() -> Optional[float]:
    """This process's exact peak RSS (VmHWM, Linux). Not ``ru_maxrss``: that
    one keeps the high-water mark across exec, so a spawned child would
    report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _memory_prepare(cfg: RunConfig, out: str, result: str) -> None:
    """Child process: the pool, tokenizer and initial model (not measured)."""
    import ray

    from raymix.train import budget_tokens, init_ray, prepare_model_and_data

    init_ray(cfg)
    tokenizer, _, pool, init_dir = prepare_model_and_data(cfg, Path(out))
    ray.shutdown()
    Path(result).write_text(json.dumps({
        "pool": {"root": pool.root, "tasks": list(pool.tasks), "stats": pool.stats, "cache_hit": pool.cache_hit,
                 "seconds": pool.seconds},
        "init_dir": init_dir, "pad_id": tokenizer.pad_token_id, "budget": budget_tokens(cfg, pool.pool_tokens)}))


def _memory_plain(cfg: RunConfig, prepared: dict, result: str) -> None:
    """Child process: the plain loop alone (no Ray imported)."""
    from raymix.data import PreparedPool

    pool = PreparedPool(**{**prepared["pool"], "tasks": tuple(prepared["pool"]["tasks"])})
    r = plain_loop(cfg, pool, prepared["init_dir"], prepared["pad_id"], prepared["budget"])
    Path(result).write_text(json.dumps({**r, "self_peak_mib": _self_peak_mib()}))


def _memory_raymix(cfg: RunConfig, out: str, result: str) -> None:
    """Child process: one raymix run (``raymix.train.run``), its own local Ray instance."""
    import ray

    from raymix.train import run

    s = run(cfg, out)
    ray.shutdown()
    Path(result).write_text(json.dumps({
        "tokens": s["train_tokens"], "steps": s["steps"], "seconds": s["train_loop_seconds"],
        "wall_seconds": s["wall_seconds"], "self_peak_mib": _self_peak_mib()}))


def _in_child(target, *args, interval: float = 0.1, sample: bool = True) -> dict:
    """Run ``target(*args, result_path)`` in a fresh (spawned) process,
    sampling its process tree; its result JSON plus the memory figures."""
    import multiprocessing as mp
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "result.json")
        proc = mp.get_context("spawn").Process(target=target, args=(*args, result))
        t0 = time.perf_counter()
        proc.start()
        sampler = TreeSampler(proc.pid, interval).start() if sample else None
        proc.join()
        memory = sampler.stop() if sampler else None
        if proc.exitcode != 0:
            raise RuntimeError(f"memory: {target.__name__} failed (exit code {proc.exitcode})")
        out = json.loads(Path(result).read_text())
    out["process_seconds"] = time.perf_counter() - t0
    if memory is not None:
        out["memory"] = memory
    return out


def bench_memory(cfg: RunConfig, out: Path, repeats: int) -> dict:
    """Peak memory of a short raymix run against the plain loop on the same
    model, data and number of training tokens (the budget).

    Each measured thing runs in a fresh child process whose whole process
    tree is sampled by :class:`TreeSampler` (every 0.1 s, RSS and PSS): the
    plain loop (:func:`plain_loop`, one process, Ray never imported), and
    ``raymix.train.run`` (its own local Ray instance: the driver, Ray Train's
    ``runtime.num_workers`` workers, the mixer actor, pooled idle workers,
    and Ray's GCS server, raylet and agents). The headline compares the plain
    loop with raymix's driver plus Ray worker processes (``driver_and_workers``):
    the processes that run raymix's code. Ray's own system processes
    (``ray_system``) are reported separately and included only in ``total``.
    The object store's shared memory is counted where processes map it.
    Pool, tokenizer and initial model are prepared first in another child
    (not measured); the run has ``eval.suite`` off and one test example per
    task, like ``throughput``. Any Ray instance of this process is shut down
    first, so that only the measured tree runs."""
    import tempfile
    from dataclasses import replace

    import ray

    if ray.is_initialized():
        ray.shutdown()
    cfg = _ray_settings(cfg)
    cfg = replace(cfg, eval=replace(cfg.eval, suite=None, max_test_examples=1))
    out.mkdir(parents=True, exist_ok=True)
    prepared = _in_child(_memory_prepare, cfg, str((out / "prepare").resolve()), sample=False)
    rows: dict[str, list] = {"plain": [], "raymix": []}
    for r in range(repeats):
        rows["plain"].append(_in_child(_memory_plain, cfg, prepared))
        run_dir = tempfile.mkdtemp(prefix=f"raymix-{r}-", dir=out)  # run() refuses a finished run's folder
        rows["raymix"].append(_in_child(_memory_raymix, cfg, str(Path(run_dir).resolve())))

    def peak(row: dict, group: str, kind: str = "rss") -> float:
        return row["memory"]["peak_mib"].get(group, {}).get(kind, 0.0)

    figures = {
        "plain_rss_mib": [peak(x, "driver") for x in rows["plain"]],
        "plain_pss_mib": [peak(x, "driver", "pss") for x in rows["plain"]],
        "raymix_rss_mib": [peak(x, "driver_and_workers") for x in rows["raymix"]],
        "raymix_pss_mib": [peak(x, "driver_and_workers", "pss") for x in rows["raymix"]],
        "raymix_driver_rss_mib": [peak(x, "driver") for x in rows["raymix"]],
        "raymix_workers_rss_mib": [peak(x, "workers") for x in rows["raymix"]],
        "raymix_ray_system_rss_mib": [peak(x, "ray_system") for x in rows["raymix"]],
        "raymix_total_rss_mib": [peak(x, "total") for x in rows["raymix"]],
        "raymix_total_pss_mib": [peak(x, "total", "pss") for x in rows["raymix"]],
    }
    summary = {k: _stats(v) for k, v in figures.items()}
    med = {k: v["median"] for k, v in summary.items()}
    return {
        "model": cfg.model.preset, "budget_tokens": prepared["budget"], "workers": cfg.runtime.num_workers,
        "ray": _ray_info(cfg), "repeats": repeats, "runs": rows, "summary": summary,
        "ratio_rss": med["raymix_rss_mib"] / med["plain_rss_mib"],
        "ratio_pss": med["raymix_pss_mib"] / med["plain_pss_mib"],
        "ratio_total_rss": med["raymix_total_rss_mib"] / med["plain_rss_mib"],
        "ratio_total_pss": med["raymix_total_pss_mib"] / med["plain_pss_mib"],
    }


BENCHMARKS = {"throughput": bench_throughput, "meta_overhead": bench_meta_overhead,
              "task_scaling": bench_task_scaling, "data_plane": bench_data_plane,
              "memory": bench_memory}
DEFAULT_REPEATS = {"throughput": 1, "meta_overhead": 1, "task_scaling": 7, "data_plane": 3, "memory": 3}


def _short_title(title: str) -> str:
    """``ray::Name``, a program's name, or a Python script's name."""
    parts = title.split(" ")
    if parts[0].startswith("ray::"):
        return parts[0]
    if "python" in parts[0].rsplit("/", 1)[-1]:
        script = next((a for a in parts[1:] if a and not a.startswith("-")), parts[0])
        return script.rsplit("/", 1)[-1]
    return parts[0].rsplit("/", 1)[-1]


def _markdown(results: dict, commit: str) -> str:
    lines = [f"# raymix benchmarks\n\nMeasured on commit `{commit}` by `python -m raymix.bench`.\n"]
    if "throughput" in results:
        r = results["throughput"]
        lines += [
            "## throughput\n",
            f"Model `{r['model']}`, micro-batch {r['micro_batch_size']}, {r['torch_threads']} torch thread(s) "
            f"per process, {r['budget_tokens']} training tokens per run, {r['repeats']} repeat(s).\n",
            "| path | median tokens/s | min | max | ratio to plain |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, v in r["median_tokens_per_second"].items():
            lo, hi = r["min_max_tokens_per_second"][k]
            lines.append(f"| {k} | {v:,.0f} | {lo:,.0f} | {hi:,.0f} | {v / r['median_tokens_per_second']['plain']:.2f} |")
    if "meta_overhead" in results:
        r = results["meta_overhead"]
        lines += [
            "\n## meta_overhead\n",
            f"Model `{r['model']}`, budget {r['budget']}, {r['workers']} worker(s), {r['repeats']} repeat(s); "
            f"ADAPT settings {r['adapt']}.\n",
            "| policy | median loop s per 1k train tokens | meta steps | meta s |",
            "|---|---:|---:|---:|",
        ]
        for k, v in r["median_seconds_per_ktoken"].items():
            lines.append(f"| {k} | {v:.3f} | {r['runs'][k][0]['meta_steps']} | {r['runs'][k][0]['meta_seconds']:.1f} |")
        lines.append(f"\nADAPT / uniform: **{r['ratio']:.2f}x** wall time per training token.")
    if "task_scaling" in results:
        r = results["task_scaling"]
        lo, hi = min(r["task_counts"]), max(r["task_counts"])
        lines += [
            "\n## task_scaling\n",
            f"One ADAPT meta step (`MetaSignals.compute`, one process, world 1, {r['ray']['torch_threads']} torch "
            f"thread(s)) and one mixer update (`Mixer.report` with its signals) per task count; model "
            f"`{r['model']}`, {r['examples_per_task']} examples per task, ADAPT settings {r['adapt']}; "
            f"{r['warmup']} warm-up and {r['repeats']} timed call(s) each.\n",
            "| tasks | meta step median s | min | max | val tasks read | meta tokens | mixer update median ms | min | max |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in r["task_counts"]:
            x = r["runs"][str(n)]
            m, u = x["meta_step"], x["mixer_report"]
            lines.append(f"| {n} | {m['median']:.3f} | {m['min']:.3f} | {m['max']:.3f} | {x['val_tasks_read']} | "
                         f"{x['meta_tokens_per_step']:,} | {1000 * u['median']:.3f} | {1000 * u['min']:.3f} | "
                         f"{1000 * u['max']:.3f} |")
        lines.append(f"\ncost({hi}) / cost({lo}): meta step **{r['meta_step_ratio']:.2f}x** (target <= "
                     f"{r['target_meta_step_ratio']:g}: {'met' if r['target_met'] else 'missed'}), mixer update "
                     f"**{r['mixer_report_ratio']:.2f}x**.")
    if "data_plane" in results:
        r = results["data_plane"]
        s = r["summary"]
        lines += [
            "\n## data_plane\n",
            f"Pool of {r['rows']:,} rows ({r['tasks']} tasks, {r['tokens']:,} tokens kept; sources "
            f"{r['sources']}), template `{r['template']}`, max_seq_len {r['max_seq_len']}; Ray with "
            f"{r['ray']['num_cpus']} CPU(s), {r['ray']['tokenizer_actors']} tokenizer actor(s); "
            f"{r['warmup']} warm-up on a 1-in-20 sample, {r['repeats']} repeat(s), each from an empty cache. "
            f"Records to Parquet on disk; loading the records ({r['records_seconds']:.1f} s) is outside both.\n",
            "| path | median s | min s | max s | rows/s | tokens/s | ratio to plain |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for k, label in (("ray_data", "prepare_shards (Ray Data, cold)"), ("plain", "plain loop (one process)")):
            x = s[k]
            lines.append(f"| {label} | {x['seconds']['median']:.2f} | {x['seconds']['min']:.2f} | "
                         f"{x['seconds']['max']:.2f} | {x['rows_per_second']['median']:,.0f} | "
                         f"{x['tokens_per_second']['median']:,.0f} | "
                         f"{x['tokens_per_second']['median'] / s['plain']['tokens_per_second']['median']:.2f} |")
        h = s["cache_hit"]["seconds"]
        lines.append(f"| prepare_shards, cache hit | {h['median']:.4f} | {h['min']:.4f} | {h['max']:.4f} | | | |")
        lines.append(f"\nRay Data / plain: **{r['ratio_tokens_per_second']:.2f}x** tokens/s"
                     f"{'' if r['tokens_match'] else ' (token counts differ between the paths!)'}.")
    if "memory" in results:
        r = results["memory"]
        s = r["summary"]
        procs = r["runs"]["raymix"][0]["memory"]["processes_seen"]
        lines += [
            "\n## memory\n",
            f"Peak memory (MiB) of the process tree, sampled every "
            f"{r['runs']['plain'][0]['memory']['interval_seconds']} s; model `{r['model']}`, "
            f"{r['budget_tokens']:,} training tokens, {r['workers']} Ray Train worker(s), Ray with "
            f"{r['ray']['num_cpus']} CPU(s) and {r['ray']['object_store_memory'] / 1024**2:.0f} MiB object store; "
            f"{r['repeats']} repeat(s). RSS sums count shared pages once per process; PSS shares them out.\n",
            "| what | median RSS | min | max | median PSS |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, pss, label in (
            ("plain_rss_mib", "plain_pss_mib", "plain loop (1 process)"),
            ("raymix_driver_rss_mib", None, "raymix driver"),
            ("raymix_workers_rss_mib", None, f"raymix Ray worker processes ({procs.get('workers', 0)} seen)"),
            ("raymix_rss_mib", "raymix_pss_mib", "raymix driver + workers"),
            ("raymix_ray_system_rss_mib", None, f"Ray system processes ({procs.get('ray_system', 0)} seen)"),
            ("raymix_total_rss_mib", "raymix_total_pss_mib", "raymix total"),
        ):
            x = s[key]
            lines.append(f"| {label} | {x['median']:,.0f} | {x['min']:,.0f} | {x['max']:,.0f} | "
                         f"{s[pss]['median']:,.0f} |" if pss else
                         f"| {label} | {x['median']:,.0f} | {x['min']:,.0f} | {x['max']:,.0f} | |")
        lines.append(f"\nraymix (driver + workers) / plain: **{r['ratio_rss']:.2f}x** RSS, {r['ratio_pss']:.2f}x PSS; "
                     f"with Ray's system processes: {r['ratio_total_rss']:.2f}x RSS, {r['ratio_total_pss']:.2f}x PSS.")
        first = r["runs"]["raymix"][0]
        lines += [f"\nThe raymix run's processes (first repeat; each at its own peak; the plain loop's "
                  f"exact peak, VmHWM: {r['runs']['plain'][0].get('self_peak_mib') or 0:,.0f} MiB, the raymix "
                  f"driver's: {first.get('self_peak_mib') or 0:,.0f} MiB):\n",
                  "| process | group | peak RSS | peak PSS |", "|---|---|---:|---:|"]
        for x in first["memory"]["processes"]:
            title = "driver (raymix.train.run)" if x["group"] == "driver" else _short_title(x["title"])
            lines.append(f"| `{title}` | {x['group']} | {x['peak_rss_mib']:,.0f} | {x['peak_pss_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m raymix.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default per benchmark: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (task_scaling, data_plane)")
    parser.add_argument("--tasks", default="20,100,400,1000",
                        help="task_scaling: comma-separated task counts (the smallest is the yardstick)")
    parser.add_argument("--report", default=None, help="also write the Markdown table here (e.g. reports/bench.md)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"raymix: error: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        task_counts = sorted({int(x) for x in args.tasks.split(",") if x.strip()})
    except ValueError:
        task_counts = []
    if len(task_counts) < 2 or task_counts[0] < 1:
        print(f"raymix: error: --tasks needs two or more positive task counts, got {args.tasks!r}", file=sys.stderr)
        return 2
    if (args.repeats is not None and args.repeats < 1) or args.warmup < 0:
        print("raymix: error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    extra = {"task_scaling": {"warmup": args.warmup, "task_counts": task_counts},
             "data_plane": {"warmup": args.warmup}}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    results: dict = {}
    md = ""
    for name in args.names:
        repeats = args.repeats or DEFAULT_REPEATS[name]
        results[name] = BENCHMARKS[name](cfg, out / name, repeats, **extra.get(name, {}))
        # Written after every benchmark: a later one failing keeps these figures.
        (out / "bench.json").write_text(json.dumps({"commit": commit, **results}, indent=1))
        md = _markdown(results, commit)
        (out / "bench.md").write_text(md)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
