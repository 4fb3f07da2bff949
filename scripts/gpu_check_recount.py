"""The model FLOPs per token and MFU of a GPU check result written before
runs counted their own (``reports/gpu_check.json`` at bdcde5e): the check's
pool prepared again with the same settings, the steps its uniform runs drew
counted on CPU (no model, no training), and each run's tokens/s from the
JSON turned into MFU the way :mod:`raymix.flops` counts it, and by the PaLM
estimate (6 N + 12 x layers x heads x head size x row).

    python scripts/gpu_check_recount.py reports/gpu_check.json \\
        --set 'data.sources=[{kind: synthetic, scale: 0.1}]'

``--set`` takes the check's own overrides (those of its command). ADAPT's
runs draw from a moving mixture, so their count is the uniform draws' (an
approximation the output names).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raymix.bench.gpu import GPU_SIZES, QWEN3_0_6B, check_pool, uniform_draw_counts  # noqa: E402
from raymix.config import load_config  # noqa: E402
from raymix.flops import ModelFlops, mfu  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench.json holding a gpu section")
    ap.add_argument("--set", action="append", default=[], help="the check's own config overrides")
    ap.add_argument("--work", help="where the pool is prepared (default: a temporary folder)")
    args = ap.parse_args(argv)
    from transformers import Qwen3Config

    r = json.loads(Path(args.result).read_text())["gpu"]
    if not r["cuda"]:
        raise SystemExit(f"{args.result}: a CPU stand-in's result; there is no GPU rate to count")
    cfg = load_config(None, args.set)
    sizes = dict(GPU_SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        _, pool, _, mbs, budget = check_pool(cfg, Path(args.work or tmp), sizes)
    if (mbs, budget) != (r["micro_batch_size"], r["budget_tokens"]):
        raise SystemExit(f"{args.result}: micro-batch {r['micro_batch_size']} and budget {r['budget_tokens']}, "
                         f"but this pool gives {mbs} and {budget}: pass the check's own --set")
    tokens, completion, pairs = uniform_draw_counts(pool, cfg.seed, mbs, budget)
    flops = ModelFlops.from_config(Qwen3Config(**QWEN3_0_6B))
    per_token = flops.required(tokens, completion, pairs) / tokens
    out = {"tokens": tokens, "completion_share": completion / tokens, "attention_pairs_per_token": pairs / tokens,
           "model_flops_per_token": per_token, "palm_flops_per_token": flops.palm_per_token(r["row_length"]),
           "runs": {}}
    for name, v in r["runs"].items():
        if "tokens_per_second" in v:
            out["runs"][name] = {"tokens_per_second": v["tokens_per_second"],
                                 "mfu": mfu(v["tokens_per_second"], per_token, r["peak_bf16_flops"]),
                                 "mfu_palm": mfu(v["tokens_per_second"], out["palm_flops_per_token"],
                                                 r["peak_bf16_flops"]), "counts": "uniform draws" + (
                                     " (an approximation: the run's mixture moved)" if v["policy"] != "uniform"
                                     else "")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
