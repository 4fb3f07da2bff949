"""``task_scaling``: one ADAPT meta step and one mixer update on pools of
many small tasks, against the smallest pool."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from raymix.bench.common import ray_info, ray_settings, stats, timed
from raymix.config import RunConfig

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

    from raymix.mixer import Mixer
    from raymix.policies import PoolInfo
    from raymix.policies.adapt.signal import MetaSignals, meta_interval_examples

    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.train()
    # The interval of a run with the configured batch and workers, so that a
    # large pool's sample is cut as in that run (policy.adapt.signal_share).
    meta = MetaSignals(model, cfg.policy.adapt, pool, 0, 1, cfg.seed, tokenizer.pad_token_id,
                       torch.device("cpu"), False,
                       interval_examples=meta_interval_examples(cfg, cfg.runtime.num_workers))
    meta_times, signals = timed(lambda: meta.compute(lookahead_lr=cfg.train.lr), warmup, repeats)

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
    mixer_times, _ = timed(lambda: next(mixers).report(delta, loss_sum, loss_count, signals["meta_tokens"],
                                                        signals), warmup, repeats)
    return {"meta_step_seconds": meta_times, "meta_step": stats(meta_times),
            "meta_tokens_per_step": int(np.sum(signals["meta_tokens"])),
            "val_tasks_read": signals.get("val_tasks_read"),
            "mixer_report_seconds": mixer_times, "mixer_report": stats(mixer_times)}


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
    from raymix.driver.setup import init_ray, prepare_model_and_data

    cfg = ray_settings(cfg)
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
        "ray": ray_info(cfg),
        "adapt": {k: getattr(cfg.policy.adapt, k) for k in ("tasks_per_step", "signal_share", "examples_per_task",
                                                            "val_examples_per_task", "params", "sketch_dim")},
        "task_counts": list(task_counts), "runs": rows,
        "meta_step_ratio": meta_ratio, "mixer_report_ratio": mixer_ratio,
        "target_meta_step_ratio": 3.0, "target_met": meta_ratio <= 3.0,
    }



def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines: list[str] = []
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
    return lines
