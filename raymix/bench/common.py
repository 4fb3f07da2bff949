"""What the benchmarks share: the plain-loop yardstick, repeated timing
with median and spread, and the Ray settings each result records."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np

from raymix.config import RunConfig


def plain_loop(cfg: RunConfig, pool, init_dir: str, pad_id: int, tokens: int) -> dict:
    """The yardstick: a hand-written loop, uniform mixture, same model and batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from raymix.loss import token_nll
    from raymix.streams import collate, read_split

    torch.set_num_threads(cfg.runtime.torch_threads)
    data = []
    for task in pool.tasks:
        rows = read_split(pool.shards("train", task), ["input_ids", "prompt_len"])
        data.append([(np.asarray(i, dtype=np.int64), int(p)) for i, p in zip(rows["input_ids"], rows["prompt_len"])])
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    done, steps, positions = 0, 0, 0
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
        positions += batch["input_ids"].numel()
        steps += 1
    seconds = time.perf_counter() - t0
    return {"tokens": done, "steps": steps, "seconds": seconds, "tokens_per_second": done / seconds,
            "utilisation": done / max(1, positions)}




# ----------------------------------------------------------------------------
# Shared helpers


def stats(values: Sequence[float]) -> dict:
    """Median and spread of repeated measurements."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(fn, warmup: int, repeats: int) -> tuple[list[float], object]:
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


def ray_settings(cfg: RunConfig) -> RunConfig:
    """The run's config with the local Ray instance's CPUs made explicit (all
    cores when unset), so that the figures say what they ran on."""
    import os
    from dataclasses import replace

    return replace(cfg, runtime=replace(cfg.runtime, num_cpus=cfg.runtime.num_cpus or os.cpu_count() or 1))


def ray_info(cfg: RunConfig) -> dict:
    return {"num_cpus": cfg.runtime.num_cpus, "object_store_memory": cfg.runtime.object_store_memory,
            "data_concurrency": cfg.runtime.data_concurrency, "torch_threads": cfg.runtime.torch_threads}
