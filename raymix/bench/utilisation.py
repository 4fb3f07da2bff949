"""``utilisation``: the share of computed positions that are real tokens
(not padding or packing slack) under each batch layout, on the embedded
default pool and, where ``$RAYMIX_NI_SAMPLE`` names its folder, on the
Natural Instructions sample (``data.max_seq_len=256``, micro-batches of 4
as in ``tune_spaces/adapt_ni.yaml`` and of 16), and at the GPU check's sizes
(the embedded default's examples, 871 per step packed into rows of 2,048).

The layouts are raymix's own (:class:`raymix.packing.StepBatches`) over the
examples that a uniform mixture draws step by step
(:class:`raymix.streams.MixtureSampler`), the same draws for every layout:
padded (one example per row), packed as on CPU (micro-batches as wide as
their fullest row) and packed as on CUDA (widths rounded up to 8). No
training runs: utilisation depends on the examples' lengths and the layout
alone, so the figures are exact for the steps drawn and need no repeats.
A training run reports its own in ``summary.json``. Goal (issue "Speed"):
>= 0.95 packed on both pools.

Beside it, the host time each layout takes per step (median over the steps,
milliseconds, on this machine's CPU): drawing is common to all and timed
apart. The positions-only layout (flex and flash attention) builds no 4D
mask; the others build it on the CPU here, where a GPU run builds it on the
device (:func:`raymix.packing.packed_batch`)."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from raymix.bench.common import ray_info, ray_settings
from raymix.config import RunConfig

GOAL = 0.95
# The GPU check's step (raymix/bench/gpu.py on its synthetic pool: 871
# examples of about 18 tokens filling 8 rows of 2,048), on the embedded default.
GPU_CHECK = {"micro_batch_size": 871, "pack_length": 2048}


def layout_utilisation(model, pool, pad_id: int, cfg: RunConfig, steps: int) -> dict:
    """Real tokens / computed positions of ``steps`` optimizer steps (one
    worker, ``train.grad_accum`` micro-batches of ``train.micro_batch_size``)
    under each layout, on the same drawn examples."""
    from raymix.packing import StepBatches
    from raymix.streams import MixtureSampler

    quiet = lambda _: None  # noqa: E731 (the layouts' log line is not wanted here)
    layouts = {
        "padded": StepBatches(model, pad_id, False, None, cfg.data.max_seq_len, log=quiet),
        "packed, CPU widths": StepBatches(model, pad_id, True, cfg.train.pack_length, cfg.data.max_seq_len,
                                          log=quiet, multiple=1),
        "packed, CUDA widths (x8)": StepBatches(model, pad_id, True, cfg.train.pack_length, cfg.data.max_seq_len,
                                                log=quiet, multiple=8),
        "packed, positions only (x8)": StepBatches(model, pad_id, True, cfg.train.pack_length,
                                                   cfg.data.max_seq_len, log=quiet, multiple=8,
                                                   attention="flex_attention"),
    }
    sampler = MixtureSampler([pool.shards("train", t) for t in pool.tasks], cfg.seed)
    weights = np.full(len(pool.tasks), 1.0 / len(pool.tasks))
    real, computed = 0, dict.fromkeys(layouts, 0)
    seconds: dict = {name: [] for name in ["draw", *layouts]}
    for _ in range(steps):
        t = time.perf_counter()
        draws = sampler.draw(weights, cfg.train.grad_accum, cfg.train.micro_batch_size)
        seconds["draw"].append(time.perf_counter() - t)
        real += sum(len(ids) for _, examples in draws for ids, _ in examples)
        for name, layout in layouts.items():
            t = time.perf_counter()
            batches = layout(draws)
            seconds[name].append(time.perf_counter() - t)
            computed[name] += sum(int(b["input_ids"].numel()) for _, b in batches)
    return {"real_tokens": real, "computed_positions": computed,
            "utilisation": {name: real / max(1, c) for name, c in computed.items()},
            "host_ms_per_step": {name: 1e3 * statistics.median(x) for name, x in seconds.items()}}


def bench_utilisation(cfg: RunConfig, out: Path, repeats: int = 1, steps: int = 200) -> dict:
    """Each pool's utilisation per layout (``repeats`` is unused: the figures
    are exact counts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raymix.config import SourceConfig
    from raymix.driver.setup import init_ray, prepare_model_and_data

    cfg = ray_settings(cfg)
    init_ray(cfg)
    # (label, config, steps): a fifth of the steps at the GPU check's sizes (54 times the examples per step).
    pools = [("embedded default", cfg, steps),
             ("embedded default, GPU check sizes",
              replace(cfg, train=replace(cfg.train, micro_batch_size=GPU_CHECK["micro_batch_size"],
                                         pack_length=GPU_CHECK["pack_length"], grad_accum=1)), max(1, steps // 5))]
    ni = os.environ.get("RAYMIX_NI_SAMPLE")
    if ni and Path(ni).is_dir():
        ni_cfg = replace(cfg, data=replace(cfg.data, sources=[SourceConfig(kind="natural_instructions", path=ni)],
                                           max_seq_len=256))
        for mbs in (4, 16):
            pools.append((f"Natural Instructions sample, micro-batch {mbs}",
                          replace(ni_cfg, train=replace(ni_cfg.train, micro_batch_size=mbs)), steps))
    rows = {}
    for label, c, steps_here in pools:
        tokenizer, _, pool, init_dir = prepare_model_and_data(c, out / label.split(",")[0].replace(" ", "_"))
        model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
        per = layout_utilisation(model, pool, tokenizer.pad_token_id, c, steps_here)
        per.update(tasks=len(pool.tasks), micro_batch_size=c.train.micro_batch_size, steps=steps_here,
                   max_seq_len=c.data.max_seq_len, pack_length=c.train.pack_length or c.data.max_seq_len,
                   mean_example_tokens=per["real_tokens"] / max(1, steps_here * c.train.grad_accum
                                                                * c.train.micro_batch_size))
        rows[label] = per
    return {"steps": steps, "model": cfg.model.preset, "ray": ray_info(cfg), "goal": GOAL,
            "ni_sample": bool(ni and Path(ni).is_dir()), "pools": rows}


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md (host times where the result has them)."""
    names = list(next(iter(r["pools"].values()))["utilisation"])
    lines = ["\n## utilisation\n",
             f"Real tokens per computed position under each layout, over {r['steps']} steps that a uniform "
             "mixture draws (the same examples for every layout; no training, so the counts are exact; "
             "a fifth of the steps at the GPU check's sizes). "
             f"Goal: >= {r['goal']} packed."
             + ("" if r["ni_sample"] else " The Natural Instructions rows need `$RAYMIX_NI_SAMPLE`.") + "\n",
             "| pool | tasks | micro-batch | mean tokens per example | row length | "
             + " | ".join(names) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for label, x in r["pools"].items():
        lines.append(f"| {label} | {x['tasks']} | {x['micro_batch_size']} | {x['mean_example_tokens']:.1f} | "
                     f"{x['pack_length']} | " + " | ".join(f"{x['utilisation'].get(n, float('nan')):.3f}"
                                                          for n in names) + " |")
    timed = [(label, x) for label, x in r["pools"].items() if "host_ms_per_step" in x]
    if timed:
        cols = list(timed[0][1]["host_ms_per_step"])
        lines += ["", "Host time per step (median milliseconds over the steps, one process): drawing the "
                  "examples, then each layout (the 4D-mask layouts build their mask on the CPU here; a GPU run "
                  "builds it on the device).\n",
                  "| pool | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for label, x in timed:
            lines.append(f"| {label} | " + " | ".join(f"{x['host_ms_per_step'][c]:.2f}" for c in cols) + " |")
    return lines
