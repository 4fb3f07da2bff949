"""Benchmarks that measure raymix against its yardstick in the same process run.

    python -m raymix.bench [NAME ...] --output DIR [--repeats N] [--warmup N]
        [--tasks 20,100,400,1000] [--policies adapt,odm] [--config FILE] [--set key=value ...]
        [--space FILE] [--report FILE] [--merge bench.json]
    python -m raymix.bench --render bench.json --output DIR [--report FILE]

Every benchmark repeats its measurement (``--repeats``, default per
benchmark), reports the median and the spread (min, max), and writes its
figures to DIR/bench.json and a table to DIR/bench.md. With no NAME, all
but ``gpu`` run. ``--merge`` keeps an earlier run's other benchmarks in both,
each section naming the commit it was measured on. ``--report FILE.md``
also writes the table there and the figures beside it as ``FILE.json``
(``reports/bench.json`` for ``reports/bench.md``), which a later run can
``--merge``. Every bench.json names files by their names alone: the
directories of absolute paths (a process's command line, say) are left out,
so that a published one carries nothing of the machine it ran on.

``throughput``: training tokens/s of the raymix path (Ray Train workers fed
by per-task streams over the Ray Data shards, with the mixer actor) with 1 and
2 workers and in-process (``runtime.num_workers=0``), against a plain
single-process PyTorch loop on the same model, micro-batch, sequence length,
data and thread count. Both are measured over the training loop alone
(start-up, curve evaluations and checkpoints are reported separately), and
their ratio is printed.

``utilisation``: real tokens per computed position of raymix's batch
layouts (padded, packed with CPU widths, packed with CUDA widths) over the
steps a uniform mixture draws, on the embedded default and, with
``$RAYMIX_NI_SAMPLE``, the Natural Instructions sample; exact counts, no
training.

``meta_overhead``: ADAPT against uniform, wall time per training token in
one run each.

``task_scaling``: seconds of one ADAPT meta step (``MetaSignals.compute``)
and of one mixer update (``Mixer.report`` with meta signals) on pools of
20, 100, 400 and 1000 small synthetic tasks prepared by the real data path;
the yardstick is the smallest pool, and cost(1000)/cost(20) is reported
(target for the meta step: at most 3).

``task_runs``: whole runs on the same examples (``--examples``, default
60,000; 300,000 training tokens unless ``budget.tokens`` is set) cut into
20, 100, 1,000 and 5,000 tasks (``--run-tasks``): wall, preparation, loop,
curve and final evaluation seconds, and the MLflow volume (distinct metric
keys and rows); the yardstick is the smallest task count. At the counts of
``--adapt-tasks`` (default 1,000 where it is run) ADAPT runs too, its loop against the
configured policy's.

``data_plane``: rows/s and tokens/s of ``raymix.data.prepare_shards`` (Ray
Data, from an empty cache) against the same tokenisation in a plain
single-process loop, and the time of a cache hit.

``policy_cost``: per learned policy, its updates, the tokens and seconds
each update costs (signal, mixer, extra training-loop time over uniform),
and the tokens and wall time of all rounds of the multi-round ones.

``gpu``: a Qwen3-0.6B-shaped model trained through raymix's path on one GPU
(packed rows of 2,048 tokens, bf16; DDP and FSDP, uniform and ADAPT):
tokens/s, model FLOPs utilisation, peak memory, ADAPT's overhead (see
:mod:`raymix.bench.gpu`; without CUDA a tiny CPU stand-in runs).

``sweeps``: a tune space (``--space``, default the README's quickstart) run
by ``python -m raymix.sweep`` in-process and with 2 Ray Train workers per
trial: the sweep's efficiency (the trials' training-loop seconds over its
wall time) and where the trials' wall time went. ``--set`` options reach its
trials too.

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
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from raymix.bench import (
    data_plane,
    gpu,
    memory,
    meta_overhead,
    policy_cost,
    sweeps,
    task_runs,
    task_scaling,
    throughput,
    utilisation,
)
from raymix.config import load_config
from raymix.errors import RaymixError

MODULES = {"throughput": throughput, "utilisation": utilisation, "meta_overhead": meta_overhead, "task_scaling": task_scaling,
           "task_runs": task_runs, "data_plane": data_plane, "memory": memory, "policy_cost": policy_cost, "sweeps": sweeps, "gpu": gpu}
BENCHMARKS = {"throughput": throughput.bench_throughput, "utilisation": utilisation.bench_utilisation,
              "meta_overhead": meta_overhead.bench_meta_overhead,
              "task_scaling": task_scaling.bench_task_scaling, "task_runs": task_runs.bench_task_runs,
              "data_plane": data_plane.bench_data_plane, "memory": memory.bench_memory,
              "policy_cost": policy_cost.bench_policy_cost, "sweeps": sweeps.bench_sweeps, "gpu": gpu.bench_gpu}
# Times are medians of 3 where a repeat costs seconds to minutes (task_runs
# too: one repeat of its loop ratio was within run-to-run noise); a
# whole-sweep benchmark runs once unless --repeats says otherwise.
DEFAULT_REPEATS = {"throughput": 3, "utilisation": 1, "meta_overhead": 3, "task_scaling": 7, "task_runs": 3, "data_plane": 3,
                   "memory": 3, "policy_cost": 1, "sweeps": 1, "gpu": 1}
ON_REQUEST = ("gpu",)  # run when named only


def _markdown(results: dict, commit: str, carried: Optional[dict] = None) -> str:
    lines = [f"# raymix benchmarks\n\nMeasured on commit `{commit}` by `python -m raymix.bench`."]
    for name, at in sorted((carried or {}).items()):
        lines.append(f"The `{name}` section was measured on commit `{at}` and carried over (`--merge`).")
    lines.append("")
    for name, module in MODULES.items():
        if name in results:
            lines += module.markdown(results[name])
    return "\n".join(lines) + "\n"


_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~-])/(?:[^\s/\"',;:=()]+/)+")


def public(obj):
    """``obj`` (a bench.json's content) with the directories of every
    absolute path in its strings left out: ``/a/b/python x.py`` becomes
    ``python x.py``, ``--temp-dir=/tmp/ray`` ``--temp-dir=ray``; relative
    paths are kept."""
    if isinstance(obj, str):
        return _ABSOLUTE_DIRS.sub("", obj)
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


def _write(out: Path, bench: dict, md: str, report: Optional[str]) -> None:
    """DIR/bench.json and DIR/bench.md; with ``report``, the table there
    and the figures beside it (same name, ``.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(public(bench), indent=1)
    (out / "bench.json").write_text(text)
    (out / "bench.md").write_text(md)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(md)
        if Path(report).suffix != ".json":
            Path(report).with_suffix(".json").write_text(text)


def _read_bench_json(path: str, flag: str) -> Optional[dict]:
    """An earlier run's bench.json (for ``--merge`` or ``--render``), or None
    after saying on stderr why it cannot be one."""
    try:
        prior = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"raymix: error: {flag} {path}: not a readable bench.json ({e})", file=sys.stderr)
        return None
    if not isinstance(prior, dict) or "commit" not in prior:
        print(f"raymix: error: {flag} {path}: no 'commit' field; not written by python -m raymix.bench",
              file=sys.stderr)
        return None
    return prior


def _render(path: str, out: Path, report: Optional[str]) -> int:
    """``--render``: the Markdown of an earlier run's bench.json, each section
    under the commit it names."""
    prior = _read_bench_json(path, "--render")
    if prior is None:
        return 2
    results = {n: prior[n] for n in BENCHMARKS if n in prior}
    if not results:
        print(f"raymix: error: --render {path}: holds no benchmark", file=sys.stderr)
        return 2
    commits = prior.get("commits", {})
    carried = {n: commits[n] for n in results if commits.get(n, prior["commit"]) != prior["commit"]}
    md = _markdown(results, prior["commit"], carried)
    _write(out, prior, md, report)
    print(md)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m raymix.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=[n for n in BENCHMARKS if n not in ON_REQUEST],
                        help=f"benchmarks: {', '.join(BENCHMARKS)} (default: all but {', '.join(ON_REQUEST)})")
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default per benchmark: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up calls (task_scaling, data_plane; task_runs: whole runs "
                             "at the smallest task count)")
    parser.add_argument("--tasks", default="20,100,400,1000",
                        help="task_scaling: comma-separated task counts (the smallest is the yardstick)")
    parser.add_argument("--policies", default=None,
                        help="policy_cost: comma-separated policies (default: every learned one)")
    parser.add_argument("--run-tasks", default="20,100,1000,5000",
                        help="task_runs: comma-separated task counts of the whole runs (the smallest is the yardstick)")
    parser.add_argument("--adapt-tasks", default=None,
                        help="task_runs: task counts (of --run-tasks) at which ADAPT also runs, against the "
                             "configured policy ('' for none; default 1000 where --run-tasks has it)")
    parser.add_argument("--examples", type=int, default=60000,
                        help="task_runs: examples in every pool, cut into that many tasks")
    parser.add_argument("--space", default=None,
                        help="sweeps: the tune space to run (default: tune_spaces/quickstart.yaml)")
    parser.add_argument("--report", default=None, help="also write the Markdown table here (e.g. reports/bench.md), "
                        "and the figures beside it (reports/bench.json)")
    parser.add_argument("--merge", default=None,
                        help="a bench.json of an earlier run whose benchmarks not run now are kept, each with "
                             "the commit it was measured on")
    parser.add_argument("--render", default=None, metavar="BENCH_JSON",
                        help="run nothing: write the Markdown of this bench.json (a GPU machine's, say) to "
                             "--report and DIR/bench.md")
    args = parser.parse_args(argv)
    if args.render:
        return _render(args.render, Path(args.output), args.report)
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
    try:
        run_tasks = sorted({int(x) for x in args.run_tasks.split(",") if x.strip()})
    except ValueError:
        run_tasks = []
    try:
        adapt_tasks = ([1000] if 1000 in run_tasks else []) if args.adapt_tasks is None else sorted(
            {int(x) for x in args.adapt_tasks.split(",") if x.strip()})
    except ValueError:
        adapt_tasks = [-1]
    # One task count is enough where ADAPT runs at it: the run is then ADAPT
    # against the configured policy at that count (a larger batch, say).
    if (len(run_tasks) < (1 if adapt_tasks else 2) or run_tasks[0] < 1
            or args.examples < 4 * run_tasks[-1]):
        print(f"raymix: error: --run-tasks needs two or more positive task counts (one with --adapt-tasks at "
              f"it), and --examples at least 4 per task, got {args.run_tasks!r} and {args.examples}",
              file=sys.stderr)
        return 2
    if any(n not in run_tasks for n in adapt_tasks):
        print(f"raymix: error: --adapt-tasks {args.adapt_tasks!r} must name task counts of --run-tasks "
              f"{args.run_tasks!r} (or be empty)", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else None
    if policies:
        from raymix.bench.policy_cost import learned_policies

        unknown = [p for p in policies if p not in learned_policies()]
        if unknown:
            print(f"raymix: error: --policies: {unknown} are not learned policies; choose from "
                  f"{learned_policies()}", file=sys.stderr)
            return 2
    if "sweeps" in args.names and args.space and not Path(args.space).is_file():
        print(f"raymix: error: --space {args.space} is not a file", file=sys.stderr)
        return 2
    carried: dict = {}
    prior: dict = {}
    if args.merge:
        prior = _read_bench_json(args.merge, "--merge")
        if prior is None:
            return 2
    extra = {"task_scaling": {"warmup": args.warmup, "task_counts": task_counts},
             "task_runs": {"task_counts": run_tasks, "total_examples": args.examples,
                           "adapt_tasks": adapt_tasks, "warmup": args.warmup},
             "data_plane": {"warmup": args.warmup}, "policy_cost": {"policies": policies},
             "sweeps": {"space": args.space, "overrides": args.overrides}}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    # A copy of the tree whose git history is missing or stale (a rented GPU
    # machine, say) names its commit through RAYMIX_COMMIT, which wins.
    commit = os.environ.get("RAYMIX_COMMIT", "").strip() or commit or "unknown"
    results: dict = {}
    for name in BENCHMARKS:
        if name in prior and name not in args.names:
            results[name] = prior[name]
            carried[name] = prior.get("commits", {}).get(name, prior["commit"])
    md = ""
    for name in args.names:
        repeats = args.repeats or DEFAULT_REPEATS[name]
        results[name] = BENCHMARKS[name](cfg, out / name, repeats, **extra.get(name, {}))
        # Written after every benchmark: a later one failing keeps these
        # figures (the report, once all have run).
        md = _markdown(results, commit, carried)
        bench = {"commit": commit, "commits": {**carried, **{n: commit for n in results if n not in carried}},
                 **results}
        _write(out, bench, md, args.report if name == args.names[-1] else None)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
