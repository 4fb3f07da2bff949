"""``sweeps``: how much of a sweep's wall time its trials spend training.

Runs a tune space (the README's quickstart by default) as a user does,
``python -m raymix.sweep --space ... --output ...`` in a fresh process, once
in-process (``runtime.num_workers=0``: each trial trains in its own Tune
process) and once with 2 Ray Train workers of half a CPU per trial, and reads the sweep's
own ``timing`` from ``sweep_summary.json``: the trials' training-loop seconds
over the sweep's wall time (its *efficiency*), and where each trial's wall
time went (the parts of :func:`raymix.bench.throughput.startup`). A sweep is
one measurement: ``--repeats`` repeats it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from raymix.bench.throughput import STARTUP_PARTS, startup
from raymix.config import RunConfig

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "tune_spaces" / "quickstart.yaml"


def one_sweep(space: Path, out: Path, overrides: Sequence[str]) -> dict:
    """One sweep from an empty output folder (the shard cache stays warm)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "raymix.sweep", "--space", str(space), "--output", str(out), "--no-report"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
    outer = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"sweeps: `{' '.join(cmd)}` exited {rc}; see {out.parent / (out.name + '.log')}")
    body = json.loads((out / "sweep_summary.json").read_text())
    trials = [json.loads(Path(t["summary"]).read_text()) for t in body["trials"] if t["summary"]]
    # A multi-round trial's summary has no single run's parts: counted in the
    # efficiency, left out of the split.
    single = [s for s in trials if "ray_train_seconds" in s and "phase_seconds" in s]
    parts = {p: sum(startup(s)[p] for s in single) for p in STARTUP_PARTS}
    return {**body["timing"], "command_seconds": outer, "trials": len(trials), "trial_parts_seconds": parts}


def bench_sweeps(cfg: RunConfig, out: Path, repeats: int, space: str | None = None,
                 overrides: Sequence[str] = ()) -> dict:
    space_path = Path(space) if space else DEFAULT_SPACE
    if not space_path.is_file():
        raise FileNotFoundError(f"sweeps: --space {space_path} is not a file")
    out.mkdir(parents=True, exist_ok=True)
    # Half a CPU per worker: two workers and the trial that starts them fit
    # on 2 CPUs (whole CPUs would not, and the sweep refuses that).
    modes = {"in-process": ["runtime.num_workers=0"],
             "2 workers": ["runtime.num_workers=2", "runtime.cpus_per_worker=0.5"]}
    runs: dict[str, list[dict]] = {}
    for mode, extra in modes.items():
        runs[mode] = [one_sweep(space_path, out / f"{mode.replace(' ', '_')}-{r}", [*overrides, *extra])
                      for r in range(repeats)]
    median = {mode: {k: statistics.median(r[k] for r in v) for k in
                     ("efficiency", "trial_wall_share", "sweep_wall_seconds", "trial_loop_seconds")}
              for mode, v in runs.items()}
    return {"space": space_path.name, "overrides": list(overrides), "repeats": repeats, "runs": runs,
            "median": median}


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    sets = "".join(f" `--set {o}`" for o in r["overrides"])
    lines = [
        "## sweeps\n",
        f"`python -m raymix.sweep --space tune_spaces/{r['space']}`{sets}, from an empty output folder and a "
        f"warm shard cache, {r['repeats']} repeat(s) per mode. Efficiency: the trials' training-loop seconds over "
        "the sweep's wall time; trial wall share: the trials' own wall seconds over the sweep's (the rest is "
        "the sweep's start, Tune's scheduling and its end).\n",
        "| mode | trials | sweep wall s | Σ trial loop s | efficiency | trial wall share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, m in r["median"].items():
        lines.append(f"| {mode} | {r['runs'][mode][0]['trials']} | {m['sweep_wall_seconds']:.0f} | "
                     f"{m['trial_loop_seconds']:.0f} | {m['efficiency']:.2f} | {m['trial_wall_share']:.2f} |")
    lines += ["", "Where the trials' wall time went (seconds summed over a sweep's trials, first repeat):\n",
              "| mode | " + " | ".join(p.replace("_", " ") for p in STARTUP_PARTS) + " |",
              "|---|" + "---:|" * len(STARTUP_PARTS)]
    for mode, v in r["runs"].items():
        parts = v[0]["trial_parts_seconds"]
        lines.append(f"| {mode} | " + " | ".join(f"{parts[p]:.0f}" for p in STARTUP_PARTS) + " |")
    return lines
