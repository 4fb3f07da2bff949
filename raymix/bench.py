"""Benchmarks that measure raymix against its yardstick in the same process run.

    python -m raymix.bench [throughput ...] --output DIR [--set key=value ...]

``throughput``: training tokens/s of the raymix path (Ray Train workers fed
by per-task streams over the Ray Data shards, with the mixer actor) with 1 and
2 workers, against a plain single-process PyTorch loop on the same model,
micro-batch, sequence length, data and thread count. Both numbers are
measured over the training loop alone (start-up is reported separately), and
their ratio is printed. Figures go to DIR/bench.json and DIR/bench.md.
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
    for workers in (1, 2):
        runs = []
        for r in range(repeats):
            c = replace(cfg, runtime=replace(cfg.runtime, num_workers=workers),
                        eval=replace(cfg.eval, max_test_examples=1))
            t0 = time.perf_counter()
            s = run(c, out / f"raymix-{workers}w-{r}")
            runs.append({"tokens": s["train_tokens"], "steps": s["steps"], "seconds": s["train_loop_seconds"],
                         "tokens_per_second": s["tokens_per_second"],
                         "wall_seconds": time.perf_counter() - t0})
        rows[f"raymix_{workers}w"] = runs
    med = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in rows.items()}
    spread = {k: (min(r["tokens_per_second"] for r in v), max(r["tokens_per_second"] for r in v))
              for k, v in rows.items()}
    return {
        "model": cfg.model.preset, "micro_batch_size": cfg.train.micro_batch_size,
        "torch_threads": cfg.runtime.torch_threads, "budget_tokens": budget, "repeats": repeats,
        "runs": rows, "median_tokens_per_second": med, "min_max_tokens_per_second": spread,
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


BENCHMARKS = {"throughput": bench_throughput, "meta_overhead": bench_meta_overhead}


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
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m raymix.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=1)
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
    results = {name: BENCHMARKS[name](cfg, out / name, args.repeats) for name in args.names}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
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
