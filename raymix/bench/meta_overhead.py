"""``meta_overhead``: ADAPT against uniform, wall time per training token."""

from __future__ import annotations

import statistics
from pathlib import Path

from raymix.config import RunConfig


def bench_meta_overhead(cfg: RunConfig, out: Path, repeats: int) -> dict:
    """Wall time per training token of ADAPT against uniform, same budget,
    model, data and workers, measured back to back in this process. The
    training loop's time includes the meta steps; curve evaluations, start-up
    and the final evaluation are excluded from both."""
    from dataclasses import replace

    from raymix.driver import run
    from raymix.driver.setup import init_ray

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




def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines: list[str] = []
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
    return lines
