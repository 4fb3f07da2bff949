"""``meta_overhead``: ADAPT against uniform, wall time per training token."""

from __future__ import annotations

import statistics
from pathlib import Path

from raymix.config import RunConfig

META_SHARE = 0.1


def bench_meta_overhead(cfg: RunConfig, out: Path, repeats: int) -> dict:
    """Wall time per training token of ADAPT against uniform, same budget,
    model, data and workers, measured back to back in this process. The
    training loop's time includes the meta steps; curve evaluations, start-up
    and the final evaluation are excluded from both."""
    from dataclasses import replace

    from raymix.driver import run
    from raymix.driver.setup import init_ray

    init_ray(cfg)
    # ADAPT as configured, and with its meta cost capped at a tenth of the
    # training tokens (policy.adapt.meta_share), the setting for the 1.10x goal.
    capped = replace(cfg.policy.adapt, meta_share=META_SHARE)
    variants = {"uniform": replace(cfg.policy, name="uniform"), "adapt": replace(cfg.policy, name="adapt"),
                f"adapt, meta_share={META_SHARE}": replace(cfg.policy, name="adapt", adapt=capped)}
    rows: dict[str, list] = {k: [] for k in variants}
    for r in range(repeats):
        for label, policy in variants.items():
            c = replace(cfg, policy=policy, eval=replace(cfg.eval, max_test_examples=1))
            s = run(c, out / f"{label.replace(', ', '-').replace('=', '')}-{r}")
            rows[label].append({"train_tokens": s["train_tokens"], "loop_seconds": s["train_loop_seconds"],
                                 "meta_seconds": s["meta_seconds"], "meta_steps": s["meta_steps"],
                                 "meta_tokens": s["meta_tokens"],
                                 "seconds_per_ktoken": 1000 * s["train_loop_seconds"] / s["train_tokens"]})
    med = {k: statistics.median(x["seconds_per_ktoken"] for x in v) for k, v in rows.items()}
    return {"model": cfg.model.preset, "budget": cfg.budget.tokens or cfg.budget.fraction,
            "workers": cfg.runtime.num_workers, "repeats": repeats, "runs": rows,
            "median_seconds_per_ktoken": med, "ratio": med["adapt"] / med["uniform"],
            "ratios": {k: v / med["uniform"] for k, v in med.items() if k != "uniform"},
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
    for k, v in r.get("ratios", {"adapt": r["ratio"]}).items():
        lines.append(f"\n{k} / uniform: **{v:.2f}x** wall time per training token.")
    return lines
