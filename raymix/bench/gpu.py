"""``gpu``: a Qwen3-0.6B-shaped model (built from its config, random
weights) trained through raymix's own path (the driver, one Ray Train
worker, the mixer actor) in bf16 autocast on packed rows of 2,048 tokens,
under DDP and FSDP with the uniform policy and under DDP with ADAPT (which
needs the full model on its worker). Per run: tokens/s over the training loop,
model FLOPs utilisation, peak accelerator memory and the layout's
utilisation; and ADAPT's overhead against uniform. Sized to finish in one
call of under ten minutes on one H200.

Without CUDA it trains a tiny model of the same family on CPU (rows of 256
tokens, a few steps), so the code path stays tested where no GPU is
(``tests/test_gpu_check.py``); its figures say nothing about a GPU. With
``runtime.num_workers=0`` the runs are in-process and FSDP (which shards over
Ray Train workers) is left out.

MFU counts the training FLOPs the model needs (:mod:`raymix.flops`: 6 x the
parameters applied at every position per token, 6 x the output layer per
completion token, 12 x layers x heads x head size per causal query-key pair
within an example), each run's own counts from its ``summary.json``; the
usual estimate (PaLM, appendix B: 6 N + 12 x layers x heads x head size x
row length per token), which also counts the output layer at prompt
positions and attention across the whole row, is reported beside it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

from raymix.config import RunConfig, load_config
from raymix.flops import ModelFlops, mfu, peak_bf16_flops

# Qwen3-0.6B's config.json (hub id Qwen/Qwen3-0.6B), hard-coded: no hub here.
QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
# The CPU stand-in: the same family and shape ratios, small.
QWEN3_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=192, tie_word_embeddings=True, max_position_embeddings=1024)

GPU_SIZES = {"seq": 2048, "rows_per_micro": 8, "steps": 40, "max_seq_len": 128, "adapt_every": 5, "log_every": 5}
CPU_SIZES = {"seq": 256, "rows_per_micro": 2, "steps": 4, "max_seq_len": 128, "adapt_every": 2, "log_every": 1}


def write_model(directory: Path, tokenizer_dir: str, shape: dict, seed: int) -> object:
    """A randomly initialised Qwen3 causal LM of ``shape`` with the pool's
    tokenizer beside it (a directory ``model.pretrained`` can name)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from raymix.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    shape = dict(shape)
    shape.setdefault("vocab_size", len(tok))
    config = Qwen3Config(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    if (directory / "config.json").exists():
        return config
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)  # workers load it as float32 master weights
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(directory)
    return config


PLAIN = {"name": "sdpa", "attention": "sdpa", "compile": False}


def fast_kernels(cuda: bool) -> dict:
    """The training step's fast kernels (:mod:`raymix.kernels`): flex
    attention and compiled decoder layers on CUDA; compiled layers alone on
    CPU (torch has no flex attention backward there)."""
    if cuda:
        return {"name": "flex+compile", "attention": "flex", "compile": True}
    return {"name": "compile", "attention": "sdpa", "compile": True}


def cases(in_process: bool, cuda: bool = False) -> list[tuple[str, str, dict]]:
    """(parallelism, policy, kernels): uniform with the model's own kernels
    (the yardstick, ``ddp-uniform``), then uniform and ADAPT under DDP and
    uniform under FSDP with the fast ones. FSDP shards over Ray Train
    workers, and ADAPT's meta step needs the full model, so it runs under
    DDP only."""
    fast = fast_kernels(cuda)
    return ([("ddp", "uniform", PLAIN), ("ddp", "uniform", fast), ("ddp", "adapt", fast)]
            + ([] if in_process else [("fsdp", "uniform", fast)]))


def case_name(parallelism: str, policy: str, kernels: dict) -> str:
    return f"{parallelism}-{policy}" + ("" if kernels is PLAIN else f" ({kernels['name']})")


def bench_gpu(cfg: RunConfig, out: Path, repeats: int) -> dict:
    import statistics

    import torch

    from raymix.driver import run

    cuda = torch.cuda.is_available()
    sizes, shape = (GPU_SIZES, QWEN3_0_6B) if cuda else (CPU_SIZES, QWEN3_TINY)
    in_process = cfg.runtime.num_workers == 0
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = peak_bf16_flops(device_name) if cuda else None
    tok_dir, pool, mean_len, mbs, budget = check_pool(cfg, out, sizes)
    config = write_model(out / ("qwen3-0.6b" if cuda else "qwen3-tiny"), tok_dir, shape, cfg.seed)
    seq = sizes["seq"]
    flops = ModelFlops.from_config(config)
    palm_token = flops.palm_per_token(seq)
    runs: dict = {}
    fixed = {"device": device_name, "cuda": cuda, "peak_bf16_flops": peak,
             "model": "Qwen3-0.6B shape, random weights" if cuda else "tiny Qwen3 (CPU stand-in)",
             "parameters": flops.parameters, "palm_flops_per_token": palm_token, "row_length": seq,
             "micro_batch_size": mbs, "mean_example_tokens": mean_len, "budget_tokens": budget,
             "repeats": repeats, "workers": 0 if in_process else 1, "runs": runs,
             "cases": [case_name(*c) for c in cases(in_process, cuda)]}
    for parallelism, policy, kernels in cases(in_process, cuda):
        name = case_name(parallelism, policy, kernels)
        overrides = [
            f"train.attention={kernels['attention']}", f"train.compile={str(kernels['compile']).lower()}",
            f"model.pretrained={out / ('qwen3-0.6b' if cuda else 'qwen3-tiny')}", f"train.pack_length={seq}",
            f"train.micro_batch_size={mbs}", "train.grad_accum=1", "train.packing=true",
            f"budget.tokens={budget}", f"policy.name={policy}", f"runtime.parallelism={parallelism}",
            f"runtime.num_workers={0 if in_process else 1}", f"runtime.use_gpu={'true' if cuda else 'false'}",
            "eval.curve_points=0", "eval.max_test_examples=2", "eval.max_new_tokens=2", "eval.suite=null",
            f"data.max_seq_len={sizes['max_seq_len']}", f"train.log_every={sizes['log_every']}",
            "train.checkpoint_fraction=0",  # no periodic checkpoints (7 GB each at this size): not what is timed
        ]
        if policy == "adapt":
            every = sizes["adapt_every"]
            overrides += [f"policy.adapt.every_steps={every}", f"policy.adapt.warmup_steps={every}"]
        c = _with(cfg, overrides)
        rows = []
        folder = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")  # ddp-uniform, ddp-adapt-flex-compile
        try:
            for r in range(repeats):
                rows.append(_measure(run(c, out / f"{folder}-{r}"), palm_token, peak))
        except Exception as e:  # noqa: BLE001 - one case failing (memory, a kernel) keeps the others' figures
            import traceback

            traceback.print_exc()
            runs[name] = {"parallelism": parallelism, "policy": policy, "kernels": kernels["name"],
                          "error": f"{type(e).__name__}: {str(e)[:400]}"}
            _write_partial(out, _with_ratios(fixed, cuda))
            continue
        med = statistics.median(x["tokens_per_second"] for x in rows)
        per_token = statistics.median(x["model_flops_per_token"] for x in rows)
        runs[name] = {"parallelism": parallelism, "policy": policy, "kernels": kernels["name"], "runs": rows,
                      "tokens_per_second": med, "model_flops_per_token": per_token,
                      "mfu": mfu(med, per_token, peak), "mfu_palm": mfu(med, palm_token, peak),
                      "peak_memory_gib": max(x["peak_memory_gib"] for x in rows),
                      "utilisation": statistics.median(x["utilisation"] for x in rows),
                      "meta_time_share": statistics.median(x["meta_time_share"] for x in rows),
                      "batch_time_share": statistics.median(x["batch_time_share"] for x in rows)}
        _write_partial(out, _with_ratios(fixed, cuda))
    result = _with_ratios(fixed, cuda)
    (out / PARTIAL).unlink(missing_ok=True)  # complete: the bench's own bench.json holds it
    return result


# The check's figures so far, rewritten after each case: what a call cut
# short by its time limit (one device call of under ten minutes) leaves.
PARTIAL = "partial.json"


def _with_ratios(fixed: dict, cuda: bool) -> dict:
    """The result with the fast kernels' speed-up and ADAPT's overhead (None
    until both of their cases have run)."""
    fast = fast_kernels(cuda)
    runs = fixed["runs"]
    uniform, adapt = _rate(runs, "ddp", "uniform", fast), _rate(runs, "ddp", "adapt", fast)
    plain = _rate(runs, "ddp", "uniform", PLAIN)
    return dict(fixed, adapt_overhead=uniform / adapt - 1.0 if uniform and adapt else None, fast_kernels=fast["name"],
                fast_kernels_speedup=uniform / plain if uniform and plain else None)


def _write_partial(out: Path, result: dict) -> None:
    """``out/partial.json``, a bench.json that ``--render`` reads (its commit
    from ``RAYMIX_COMMIT``, as a device's copy of the tree names it)."""
    import os

    from raymix.files import write_json

    commit = os.environ.get("RAYMIX_COMMIT", "").strip() or "unknown"
    write_json(out / PARTIAL, {"commit": commit, "commits": {"gpu": commit}, "gpu": result}, indent=1, default=str)


def check_pool(cfg: RunConfig, out: Path, sizes: dict):
    """The check's pool and its locally trained tokenizer, prepared once (a
    preset run's preparation), and the micro-batch (examples that fill about
    ``rows_per_micro`` packed rows) and budget (``steps`` of them) it trains
    with: (tokenizer dir, pool, mean example tokens, micro-batch, budget)."""
    from raymix.driver.setup import init_ray, prepare_model_and_data

    base = replace(cfg, data=replace(cfg.data, max_seq_len=sizes["max_seq_len"]),
                   model=replace(cfg.model, pretrained=None, tokenizer=None, preset="llama-micro"))
    init_ray(base)
    _, tok_dir, pool, _ = prepare_model_and_data(base, out / "prepare")
    mean_len = pool.pool_tokens / max(1, int(pool.train_examples().sum()))
    mbs = max(2, int(sizes["rows_per_micro"] * sizes["seq"] * 0.97 / mean_len))
    return tok_dir, pool, mean_len, mbs, int(sizes["steps"] * mbs * mean_len)


def uniform_draw_counts(pool, seed: int, micro_batch: int, budget: int) -> tuple[int, int, int]:
    """(real tokens, completion tokens, causal query-key pairs within
    examples) of the steps a one-worker uniform run of ``budget`` tokens
    draws (the training step's sampler, seed and stopping rule; no model):
    the counts behind a run's model FLOPs, for results written before runs
    reported them."""
    import numpy as np

    from raymix.flops import causal_pairs
    from raymix.packing import padded_batch
    from raymix.streams import MixtureSampler

    tasks = len(pool.tasks)
    sampler = MixtureSampler([pool.shards("train", t) for t in pool.tasks], seed, 0, 1)
    tokens = completion = pairs = 0
    while tokens < budget:
        ((_, examples),) = sampler.draw(np.full(tasks, 1 / tasks), 1, micro_batch)
        batch = padded_batch(examples, 0)  # its labels: the tokens the loss scores, as in training
        tokens += int(batch["lengths"].sum())
        completion += int((batch["labels"][:, 1:] != -100).sum())
        pairs += causal_pairs(batch["lengths"].numpy())
    return tokens, completion, pairs


def _rate(runs: dict, parallelism: str, policy: str, kernels: dict) -> Optional[float]:
    """A case's tokens/s; None where it failed."""
    return runs.get(case_name(parallelism, policy, kernels), {}).get("tokens_per_second")


def _measure(s: dict, palm_token: float, peak: Optional[float]) -> dict:
    """One run's figures from its summary."""
    steady = steady_tokens_per_second(s)
    tps = steady if steady is not None else s["tokens_per_second"]
    per_token = s["model_flops_per_token"]
    return {"tokens_per_second": tps, "loop_tokens_per_second": s["tokens_per_second"],
            "model_flops_per_token": per_token, "loop_mfu": s["mfu"],
            "train_tokens": s["train_tokens"], "steps": s["steps"],
            "train_loop_seconds": s["train_loop_seconds"], "utilisation": s["utilisation"],
            "batch_layout": s["batch_layout"], "meta_time_share": s["meta_time_share"],
            "batch_time_share": s["batch_time_share"],
            "peak_memory_gib": s["peak_device_memory_bytes"] / 2**30,
            "mfu": mfu(tps, per_token, peak), "mfu_palm": mfu(tps, palm_token, peak)}


def steady_tokens_per_second(summary: dict) -> Optional[float]:
    """Median of the run's logged ``train/tokens_per_second`` intervals after
    the first (which holds the first steps' one-off CUDA and allocator
    start-up); None when fewer than two were logged."""
    import statistics

    from mlflow.tracking import MlflowClient

    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(
        summary["mlflow_run_id"], "train/tokens_per_second")
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return statistics.median(values) if values else None


def _with(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` (the command line's config) with the check's settings on top."""
    import tempfile

    import yaml

    from raymix.config import to_dict

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f)
    try:
        return load_config(f.name, overrides)
    finally:
        Path(f.name).unlink()


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md (also of a bench.json written
    before the model FLOPs were counted per run: its MFU is the usual estimate)."""
    peak = f"{r['peak_bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16" if r["peak_bf16_flops"] else "unknown"
    counted = "palm_flops_per_token" in r
    flops_line = (
        "MFU: the training FLOPs the model needs per second (each run's own counts, raymix/flops.py: 6 x the "
        "parameters applied at every position per token, 6 x the output layer per completion token, "
        "12 x layers x heads x head size per causal query-key pair within an example) over the peak; "
        f"MFU (PaLM): the usual estimate, {r['palm_flops_per_token'] / 1e9:.2f} GFLOP per token (6N + 12 x layers "
        "x heads x head size x row), which also counts the output layer at prompt positions and attention "
        "across the whole row.\n"
        if counted else
        f"Model FLOPs per token {r['model_flops_per_token'] / 1e9:.2f} GFLOP (6N + 12 x layers x hidden x row).\n")
    lines = [
        "## gpu\n",
        f"{r['model']} ({r['parameters'] / 1e6:,.1f}M parameters) on {r['device']} (peak {peak}); "
        f"packed rows of {r['row_length']} tokens, {r['micro_batch_size']} examples per step "
        f"(mean {r['mean_example_tokens']:.0f} tokens), {r['budget_tokens']:,} training tokens per run, "
        f"{max(1, r['workers'])} worker{'' if r['workers'] == 0 else ' (Ray Train)'}, {r['repeats']} repeat(s). "
        + flops_line,
        "tokens/s: median of the logged intervals after the first (the whole loop's figure in bench.json). "
        "Kernels (train.attention, train.compile): sdpa is the model's own attention with a block-diagonal mask, "
        "eager; flex is torch's flex attention, compile torch.compile of each decoder layer "
        "(raymix/kernels.py). batch time share: rank 0's host time drawing and laying out the examples, "
        "of the training loop's.\n",
        "| run | tokens/s | GFLOP per token | MFU | MFU (PaLM) | peak memory (GiB) | utilisation | meta time share "
        "| batch time share |"
        if counted else "| run | tokens/s | MFU | peak memory (GiB) | utilisation | meta time share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" if counted else "|---|---:|---:|---:|---:|---:|",
    ]

    def pct(x: Optional[float]) -> str:
        return f"{x:.1%}" if x is not None else "n/a"

    for name, v in r["runs"].items():
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error'][:200].replace('|', '/')} |" + " |" * (7 if counted else 4))
            continue
        figures = (f"{v['model_flops_per_token'] / 1e9:.2f} | {pct(v['mfu'])} | {pct(v['mfu_palm'])}" if counted
                   else pct(v["mfu"]))
        share = f" {v['batch_time_share']:.3f} |" if counted else ""
        lines.append(f"| {name} | {v['tokens_per_second']:,.0f} | {figures} | {v['peak_memory_gib']:.1f} | "
                     f"{v['utilisation']:.3f} | {v['meta_time_share']:.2f} |{share}")
    lines.append("")
    missing = [c for c in r.get("cases", []) if c not in r["runs"]]
    if missing:
        lines.append(f"Not run (the check ended before them): {', '.join(missing)}.")
    if r.get("fast_kernels_speedup") is not None:
        lines.append(f"{r['fast_kernels']} against sdpa (DDP, uniform, tokens/s): {r['fast_kernels_speedup']:.2f}x.")
    if r.get("adapt_overhead") is not None:
        kernels = f", {r['fast_kernels']}" if r.get("fast_kernels") else ""
        lines.append(f"ADAPT's overhead against uniform (DDP{kernels}, tokens/s): {r['adapt_overhead']:+.1%}.")
    if not r["cuda"]:
        lines.append("\nNo CUDA device: a tiny CPU stand-in ran; these figures say nothing about a GPU.")
    return lines
