"""``data_plane``: ``prepare_shards`` (Ray Data, cold cache) against the same
tokenisation in one process, and a cache hit."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from raymix.bench.common import ray_info, ray_settings, stats
from raymix.config import RunConfig

# ----------------------------------------------------------------------------
# data_plane


def _tokenizer_for(cfg: RunConfig, records: list, out: Path) -> tuple[str, str]:
    """The run's tokenizer, as ``prepare_model_and_data`` gets it (trained on
    the pool and cached, or the model's): its directory and fingerprint."""
    from raymix.data import cache_root, pool_fingerprint
    from raymix.driver.setup import TOKENIZER_SAMPLE, tokenizer_corpus
    from raymix.models import load_tokenizer, train_tokenizer

    if cfg.model.pretrained or cfg.model.tokenizer:
        name = cfg.model.tokenizer or cfg.model.pretrained
        tok = load_tokenizer(name)
        tok.save_pretrained(str(out / "tokenizer"))
        return str(out / "tokenizer"), f"{name}:{len(tok)}"
    _, path = train_tokenizer(lambda: tokenizer_corpus(records), cfg.model.vocab_size, cache_root(cfg.data),
                              f"{pool_fingerprint(cfg.data)}:sample{TOKENIZER_SAMPLE}")
    return path, f"trained:{path}"


def plain_tokenise(records: list, tokenizer_dir: str, data_cfg, dest: Path, batch_size: int = 1024) -> dict:
    """The yardstick of ``data_plane``: the records tokenised in this one
    process by the same callable the Ray Data actors run (``raymix.tokenizing.
    Tokenize`` with the same arguments: tokenizer, template, truncation;
    batches of the same size), then written as Parquet partitioned by split and shard group like
    the shards."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from raymix.data import assign_shards
    from raymix.tokenizing import Tokenize, tokenize_args

    t0 = time.perf_counter()
    tasks = tuple(dict.fromkeys(r.task for r in records))
    index = {t: i for i, t in enumerate(tasks)}
    refs = np.empty(len(records), dtype=object)
    refs[:] = [list(r.references) for r in records]
    cols = {"task_idx": np.array([index[r.task] for r in records]), "shard": np.array(assign_shards(records, index)[1]),
            "split": np.array([r.split for r in records]),
            "id": np.array([r.id for r in records]), "prompt": np.array([r.prompt for r in records], dtype=object),
            "completion": np.array([r.completion for r in records], dtype=object), "references": refs}
    tokenize = Tokenize(**tokenize_args(tokenizer_dir, data_cfg.template, data_cfg.max_seq_len))
    t1 = time.perf_counter()
    tables = [tokenize({k: v[i:i + batch_size] for k, v in cols.items()}) for i in range(0, len(records), batch_size)]
    table = pa.concat_tables(tables)
    t2 = time.perf_counter()
    pads.write_dataset(table, str(dest), format="parquet", partitioning=["split", "shard"],
                       partitioning_flavor="hive", existing_data_behavior="delete_matching")
    t3 = time.perf_counter()
    kept = table.filter(pc.not_equal(table["status"], "dropped"))
    return {"rows": len(records), "tokens": int(pc.sum(kept["n_tokens"]).as_py()), "seconds": t3 - t0,
            "tokenise_seconds": t2 - t1, "write_seconds": t3 - t2}


def bench_data_plane(cfg: RunConfig, out: Path, repeats: int, warmup: int = 1) -> dict:
    """Throughput of the pool preparation: ``raymix.data.prepare_shards``
    (Ray Data ``map_batches`` over tokenizer actors, Parquet shards per split
    and shard group, token statistics) on the run's pool, from a fresh empty cache
    directory at each repeat (the cold path), against :func:`plain_tokenise`
    on the same records in this process; and the cache hit (a second
    ``prepare_shards`` call on the same cache: checks every file's size and
    SHA-256 against the cache's manifest, then reads ``stats.json``).

    Both are timed from records in memory to Parquet on disk: loading the
    records (``records_seconds``) and training the tokenizer are done once,
    before, and timed by neither. Rows are all examples of all splits; tokens
    are those of the examples kept (not dropped for length). Warm-up: each
    path once on a 1-in-20 sample of the records (starts Ray Data's
    executor and loads the tokenizer code). Hugging Face fast tokenizers
    encode a batch on several threads in both paths."""
    import os
    import shutil
    from dataclasses import replace

    import ray

    from raymix.data import load_pool, pool_fingerprint, prepare_shards
    from raymix.driver.setup import init_ray
    from raymix.tokenizing import tokenizer_actors

    cfg = ray_settings(cfg)
    init_ray(cfg)
    t0 = time.perf_counter()
    records = load_pool(cfg.data)
    records_seconds = time.perf_counter() - t0
    tok_dir, tok_fp = _tokenizer_for(cfg, records, out)
    fingerprint = pool_fingerprint(cfg.data)
    free = ray.available_resources().get("CPU", 1)
    actors, _ = tokenizer_actors(free, cfg.runtime.data_concurrency)
    scratch = out / "scratch"

    def ray_path(recs: list, fp: str, tag: str) -> tuple[dict, dict]:
        data = replace(cfg.data, cache_dir=str((scratch / tag).resolve()))
        shutil.rmtree(data.cache_dir, ignore_errors=True)
        cold = prepare_shards(lambda: recs, fp, tok_dir, tok_fp, data, cfg.runtime.data_concurrency)
        hit = prepare_shards(lambda: recs, fp, tok_dir, tok_fp, data, cfg.runtime.data_concurrency)
        if cold.cache_hit or not hit.cache_hit:
            raise RuntimeError("data_plane: the cold run must miss the cache and the second call hit it")
        tokens = sum(cold.stats[s][t]["tokens"] for s in ("train", "val", "test") for t in cold.tasks)
        shutil.rmtree(data.cache_dir, ignore_errors=True)
        return {"rows": len(recs), "tokens": tokens, "seconds": cold.seconds}, {"seconds": hit.seconds}

    def plain_path(recs: list, tag: str) -> dict:
        dest = scratch / f"plain-{tag}"
        shutil.rmtree(dest, ignore_errors=True)
        r = plain_tokenise(recs, tok_dir, cfg.data, dest)
        shutil.rmtree(dest, ignore_errors=True)
        return r

    sample = records[::20]
    for w in range(warmup):
        ray_path(sample, f"{fingerprint}:warmup{w}", f"warmup{w}")
        plain_path(sample, f"warmup{w}")
    rows: dict[str, list] = {"ray_data": [], "plain": [], "cache_hit": []}
    for r in range(repeats):
        cold, hit = ray_path(records, fingerprint, f"cold{r}")
        rows["ray_data"].append(cold)
        rows["cache_hit"].append(hit)
        rows["plain"].append(plain_path(records, str(r)))
    for k in ("ray_data", "plain"):
        for x in rows[k]:
            x["rows_per_second"] = x["rows"] / x["seconds"]
            x["tokens_per_second"] = x["tokens"] / x["seconds"]
    shutil.rmtree(scratch, ignore_errors=True)
    summary = {k: {m: stats([x[m] for x in rows[k]]) for m in ("seconds", "rows_per_second", "tokens_per_second")}
               for k in ("ray_data", "plain")}
    summary["cache_hit"] = {"seconds": stats([x["seconds"] for x in rows["cache_hit"]])}
    return {
        "sources": [s.kind for s in cfg.data.sources], "rows": len(records), "tasks": len({r.task for r in records}),
        "tokens": rows["ray_data"][0]["tokens"], "tokens_match": rows["ray_data"][0]["tokens"] == rows["plain"][0]["tokens"],
        "records_seconds": records_seconds, "template": cfg.data.template, "max_seq_len": cfg.data.max_seq_len,
        "ray": {**ray_info(cfg), "tokenizer_actors": actors},
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default"),
        "repeats": repeats, "warmup": warmup, "runs": rows, "summary": summary,
        "ratio_tokens_per_second": summary["ray_data"]["tokens_per_second"]["median"]
        / summary["plain"]["tokens_per_second"]["median"],
    }



def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lines: list[str] = []
    s = r["summary"]
    lines += [
        "\n## data_plane\n",
        f"Pool of {r['rows']:,} rows ({r['tasks']} tasks, {r['tokens']:,} tokens kept; sources "
        f"{r['sources']}), template `{r['template']}`, max_seq_len {r['max_seq_len']}; Ray with "
        f"{r['ray']['num_cpus']} CPU(s), {r['ray']['tokenizer_actors']} tokenizer actor(s); "
        f"{r['warmup']} warm-up on a 1-in-20 sample, {r['repeats']} repeat(s), each from an empty cache. "
        f"Records to Parquet on disk; loading the records ({r['records_seconds']:.1f} s) is outside both.\n",
        "| path | median s | min s | max s | rows/s | tokens/s | ratio to plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, label in (("ray_data", "prepare_shards (Ray Data, cold)"), ("plain", "plain loop (one process)")):
        x = s[k]
        lines.append(f"| {label} | {x['seconds']['median']:.2f} | {x['seconds']['min']:.2f} | "
                     f"{x['seconds']['max']:.2f} | {x['rows_per_second']['median']:,.0f} | "
                     f"{x['tokens_per_second']['median']:,.0f} | "
                     f"{x['tokens_per_second']['median'] / s['plain']['tokens_per_second']['median']:.2f} |")
    h = s["cache_hit"]["seconds"]
    lines.append(f"| prepare_shards, cache hit | {h['median']:.4f} | {h['min']:.4f} | {h['max']:.4f} | | | |")
    lines.append(f"\nRay Data / plain: **{r['ratio_tokens_per_second']:.2f}x** tokens/s"
                 f"{'' if r['tokens_match'] else ' (token counts differ between the paths!)'}.")
    return lines
