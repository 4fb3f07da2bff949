"""``memory``: peak RSS and PSS of a short raymix run's process tree against
the plain loop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from raymix.bench.common import plain_loop, ray_info, ray_settings, stats
from raymix.config import RunConfig

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

    from raymix.driver.setup import budget_tokens, init_ray, prepare_model_and_data

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
    """Child process: one raymix run (``raymix.driver.run``), its own local Ray instance."""
    import ray

    from raymix.driver import run

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
    ``raymix.driver.run`` (its own local Ray instance: the driver, Ray Train's
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
    cfg = ray_settings(cfg)
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
    summary = {k: stats(v) for k, v in figures.items()}
    med = {k: v["median"] for k, v in summary.items()}
    return {
        "model": cfg.model.preset, "budget_tokens": prepared["budget"], "workers": cfg.runtime.num_workers,
        "ray": ray_info(cfg), "repeats": repeats, "runs": rows, "summary": summary,
        "ratio_rss": med["raymix_rss_mib"] / med["plain_rss_mib"],
        "ratio_pss": med["raymix_pss_mib"] / med["plain_pss_mib"],
        "ratio_total_rss": med["raymix_total_rss_mib"] / med["plain_rss_mib"],
        "ratio_total_pss": med["raymix_total_pss_mib"] / med["plain_pss_mib"],
    }




def _short_title(title: str) -> str:
    """``ray::Name``, a program's name, or a Python script's name."""
    parts = title.split(" ")
    if parts[0].startswith("ray::"):
        return parts[0]
    if "python" in parts[0].rsplit("/", 1)[-1]:
        script = next((a for a in parts[1:] if a and not a.startswith("-")), parts[0])
        return script.rsplit("/", 1)[-1]
    return parts[0].rsplit("/", 1)[-1]



def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines: list[str] = []
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
        title = "driver (raymix.driver.run)" if x["group"] == "driver" else _short_title(x["title"])
        lines.append(f"| `{title}` | {x['group']} | {x['peak_rss_mib']:,.0f} | {x['peak_pss_mib']:,.0f} |")
    return lines
