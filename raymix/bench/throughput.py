"""``throughput``: training tokens/s of the raymix path (1 and 2 Ray Train
workers, in-process) against a plain single-process PyTorch loop."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from raymix.bench.common import plain_loop
from raymix.config import RunConfig


def bench_throughput(cfg: RunConfig, out: Path, repeats: int) -> dict:
    from dataclasses import replace

    from raymix.driver import run
    from raymix.driver.setup import init_ray, prepare_model_and_data

    init_ray(cfg)
    tokenizer, _, pool, init_dir = prepare_model_and_data(cfg, out)
    budget = int(cfg.budget.tokens or round(cfg.budget.fraction * pool.pool_tokens))
    plain = [plain_loop(cfg, pool, init_dir, tokenizer.pad_token_id, budget) for _ in range(repeats)]  # padded
    rows = {"plain": plain}
    # 0: in-process (no Ray Train worker group); in-process and 1 worker padded
    # too, beside the packed default (the padded rows compare like for like
    # with the plain loop, which pads).
    for workers, packing in ((0, cfg.train.packing), (0, False), (1, cfg.train.packing), (1, False),
                             (2, cfg.train.packing)):
        name = f"raymix_{workers}w" if workers else "raymix_inprocess"
        if packing != cfg.train.packing:
            name += "_padded"
        elif name in rows:
            continue  # train.packing=false: every run is padded, and this one ran above
        runs = []
        for r in range(repeats):
            c = replace(cfg, runtime=replace(cfg.runtime, num_workers=workers),
                        eval=replace(cfg.eval, max_test_examples=1), train=replace(cfg.train, packing=packing))
            t0 = time.perf_counter()
            s = run(c, out / f"{name}-{r}")
            runs.append({"tokens": s["train_tokens"], "steps": s["steps"], "seconds": s["train_loop_seconds"],
                         "tokens_per_second": s["tokens_per_second"], "utilisation": s["utilisation"],
                         "batch_layout": s["batch_layout"], "wall_seconds": time.perf_counter() - t0,
                         "startup": startup(s)})
        rows[name] = runs
    med = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in rows.items()}
    spread = {k: (min(r["tokens_per_second"] for r in v), max(r["tokens_per_second"] for r in v))
              for k, v in rows.items()}
    utilisation = {k: statistics.median(r["utilisation"] for r in v) for k, v in rows.items()}
    startup_median = {k: {part: statistics.median(r["startup"][part] for r in v) for part in STARTUP_PARTS}
                      for k, v in rows.items() if k != "plain"}
    return {
        "startup_median_seconds": startup_median,
        "model": cfg.model.preset, "micro_batch_size": cfg.train.micro_batch_size,
        "torch_threads": cfg.runtime.torch_threads, "budget_tokens": budget, "repeats": repeats,
        "runs": rows, "median_tokens_per_second": med, "median_utilisation": utilisation, "min_max_tokens_per_second": spread,
        "ratio_inprocess": med["raymix_inprocess"] / med["plain"],
        "ratio_1w": med["raymix_1w"] / med["plain"], "ratio_2w": med["raymix_2w"] / med["plain"],
    }



# Where a run's wall time goes besides its training loop, from its summary.json.
STARTUP_PARTS = ("wall", "ray_init", "prepare", "worker_start", "worker_setup", "train_loop", "checkpoints",
                 "final_eval", "report_and_shutdown", "lm_eval", "log_summary")


def startup(s: dict) -> dict:
    """A run's wall seconds split into its parts: Ray start, pool and model
    preparation (cache hits here), the Ray Train worker group's start (its
    controller and worker processes, up to the worker entering the training
    function) and each worker's setup (imports, process group, model, streams),
    the loop with its curve evaluations and checkpoints, the final evaluation,
    the report back and shutdown, lm-eval's scoring, and the summary's logging."""
    ph, rt = s["phase_seconds"], s["ray_train_seconds"]
    prepare = sum(v for k, v in ph.items() if k not in ("tracking_setup", "ray_init", "ray_train", "lm_eval",
                                                         "log_summary"))
    return {"wall": s["wall_seconds"], "ray_init": ph.get("ray_init", 0.0), "prepare": prepare,
            "worker_start": rt["worker_start"], "worker_setup": rt["worker_setup"],
            "train_loop": rt["train_loop"], "checkpoints": rt["checkpoints"], "final_eval": rt["final_eval"],
            "report_and_shutdown": rt["report_and_shutdown"], "lm_eval": ph.get("lm_eval", 0.0),
            "log_summary": ph.get("log_summary", 0.0)}


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines: list[str] = []
    lines += [
        "## throughput\n",
        f"Model `{r['model']}`, micro-batch {r['micro_batch_size']}, {r['torch_threads']} torch thread(s) "
        f"per process, {r['budget_tokens']} training tokens per run, {r['repeats']} repeat(s).\n",
        "| path | median tokens/s | min | max | ratio to plain | utilisation |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    util = r.get("median_utilisation", {})  # absent from results written before it existed
    for k, v in r["median_tokens_per_second"].items():
        lo, hi = r["min_max_tokens_per_second"][k]
        u = f"{util[k]:.3f}" if k in util else "n/a"
        lines.append(f"| {k} | {v:,.0f} | {lo:,.0f} | {hi:,.0f} | "
                     f"{v / r['median_tokens_per_second']['plain']:.2f} | {u} |")
    if "startup_median_seconds" in r:
        su = r["startup_median_seconds"]
        lines += ["", "Where each raymix run's wall time went (median seconds over the repeats, from its "
                  "summary.json; `worker start`: Ray Train's controller and worker processes up to the worker "
                  "entering the training function; `worker setup`: imports, process group, model and streams "
                  "in the worker; `train loop` includes curve evaluations and checkpoints):\n",
                  "| path | " + " | ".join(p.replace("_", " ") for p in STARTUP_PARTS) + " |",
                  "|---|" + "---:|" * len(STARTUP_PARTS)]
        for k, parts in su.items():
            lines.append(f"| {k} | " + " | ".join(f"{parts[p]:.1f}" for p in STARTUP_PARTS) + " |")
    return lines
