"""The model's own training speed on one GPU, outside raymix: the yardstick
for the GPU check's MFU (``python -m raymix.bench gpu``, reports/gpu_check.md).

A Qwen3-0.6B-shaped model (random weights, SDPA, bf16 autocast, fused AdamW)
trains on 8 rows of 2,048 random tokens per step; variants: raymix's packed
layout (a 4D boolean block-diagonal mask over 18-token examples, the GPU
check's mean example; or, under flex attention, the restarting positions
alone) or plain causal rows; bf16 or float32 (raymix's) master weights; the
output layer and loss at every position or at a third of them (raymix
applies them at completion positions only); eager or compiled decoder layers
(raymix's ``train.compile``). It prints the measured
bf16 matrix-product rate, tokens/s and MFU per variant (the model FLOPs each
variant's step needs, counted as the GPU check counts them: raymix/flops.py;
and the usual estimate, 6 N + 12 x layers x heads x head size x row, as
``mfu_palm``; both against the GPU's dense bf16 peak, on CPU against an
H200's 989 TFLOP/s as a placeholder), and a ``torch.profiler`` table of the first
variant's GPU time by operator; JSON goes to the path given.

    python scripts/gpu_model_ceiling.py ceiling.json

Without CUDA it runs a tiny Qwen3 on CPU in seconds, in float32, flex
variants skipped (``tests/test_gpu_check.py`` runs it so it cannot rot);
those figures say nothing about a GPU.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from raymix.bench.gpu import QWEN3_0_6B, QWEN3_TINY  # noqa: E402
from raymix.flops import ModelFlops, causal_pairs, mfu, peak_bf16_flops  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SHAPE = QWEN3_0_6B if CUDA else dict(QWEN3_TINY, vocab_size=500)
ROWS, SEQ, WARM, STEPS = (8, 2048, 3, 6) if CUDA else (2, 256, 1, 2)
EXAMPLE = 18  # tokens: the GPU check's mean example on its synthetic pool
# The GPU's own peak (an H100 SXM's equals an H200's; a PCIe H100's is lower);
# a GPU raymix has no figure for, and the CPU stand-in, use an H200's.
PEAK = (CUDA and peak_bf16_flops(torch.cuda.get_device_name(0))) or peak_bf16_flops("H200")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def matmul_rate(n: int) -> float:
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def variant(cfg, ids, flops: ModelFlops, weights=torch.bfloat16, inputs=None, loss_share=1.0, profile=False,
            attention="sdpa", compile=False):
    torch.manual_seed(0)
    # On CPU float32 throughout: bf16 matrix products there need AVX-512
    # kernels that ATEN_CPU_CAPABILITY=default or =avx2 turns off, and the
    # CPU run only keeps the script from rotting.
    weights = weights if CUDA else torch.float32
    model = Qwen3ForCausalLM._from_config(cfg, attn_implementation=attention, dtype=weights).to(DEV)
    if compile:  # as raymix's train.compile: each decoder layer's forward (raymix/kernels.py)
        for layer in model.model.layers:
            layer.forward = torch.compile(layer.forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=CUDA)
    scored = torch.arange(0, ROWS * SEQ, int(round(1 / loss_share)), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=CUDA):
            hidden = model.model(input_ids=ids, use_cache=False, **(inputs or {})).last_hidden_state
            logits = model.lm_head(hidden.reshape(ROWS * SEQ, -1)[scored])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids.view(-1)[scored])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARM):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync()
    seconds = (time.perf_counter() - t) / STEPS
    tps = ROWS * SEQ / seconds
    # The step's model FLOPs: every token, the output layer at the scored
    # positions, attention within the 18-token examples (packed) or across the row (causal).
    example = EXAMPLE if inputs else SEQ
    pairs = ROWS * causal_pairs([example] * (SEQ // example) + ([SEQ % example] if SEQ % example else []))
    needed = flops.required(ROWS * SEQ, len(scored), pairs)
    out = {"step_seconds": seconds, "tokens_per_second": tps, "model_flops_per_token": needed / (ROWS * SEQ),
           "mfu": mfu(tps, needed / (ROWS * SEQ), PEAK), "mfu_palm": mfu(tps, flops.palm_per_token(SEQ), PEAK),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as p:
            for _ in range(2):
                step()
            sync()
        key = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60), flush=True)
    model = opt = None  # freed before the next variant builds its own
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(path: str) -> dict:
    cfg = Qwen3Config(**SHAPE)
    flops = ModelFlops.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), device=DEV)
    pos = torch.arange(SEQ, device=DEV)
    segment = pos // EXAMPLE
    mask = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
    packed = {"attention_mask": mask[None, None].expand(ROWS, 1, SEQ, SEQ),
              "position_ids": (pos % EXAMPLE)[None].expand(ROWS, SEQ)}
    result = {"device": torch.cuda.get_device_name(0) if CUDA else "CPU", "torch": torch.__version__,
              "rows": ROWS, "row_length": SEQ, "example_tokens": EXAMPLE, "palm_flops_per_token": flops.palm_per_token(SEQ),
              "peak_bf16_flops": PEAK, "matmul_bf16_flops": matmul_rate(8192 if CUDA else 256), "variants": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}), flush=True)
    # flex attention: positions alone; Hugging Face builds the block mask from them.
    positions = {"position_ids": packed["position_ids"]}
    third = 1 / 3
    plan = [("packed, bf16 weights, loss everywhere", dict(inputs=packed, profile=True)),
            ("packed, float32 weights, loss everywhere", dict(inputs=packed, weights=torch.float32)),
            ("packed, bf16 weights, loss at a third", dict(inputs=packed, loss_share=third)),
            ("causal, bf16 weights, loss at a third", dict(loss_share=third)),
            ("packed, compiled layers, bf16 weights, loss at a third",
             dict(inputs=packed, loss_share=third, compile=True)),
            ("packed flex, bf16 weights, loss at a third",
             dict(inputs=positions, loss_share=third, attention="flex_attention")),
            ("packed flex, compiled layers, bf16 weights, loss at a third",
             dict(inputs=positions, loss_share=third, attention="flex_attention", compile=True, profile=True)),
            ("packed flex, compiled layers, float32 weights, loss at a third",
             dict(inputs=positions, loss_share=third, attention="flex_attention", compile=True,
                  weights=torch.float32))]
    for name, kw in plan:
        if kw.get("attention") == "flex_attention" and not CUDA:
            result["variants"][name] = {"skipped": "torch's flex attention has no backward on CPU"}
        else:
            try:
                result["variants"][name] = variant(cfg, ids, flops, **kw)
            except Exception:  # one variant failing (memory, a kernel) keeps the others' figures
                result["variants"][name] = {"error": traceback.format_exc()[-800:]}
        print(json.dumps({name: result["variants"][name]}), flush=True)
        Path(path).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ceiling.json")
