"""``task_runs``: whole runs (``raymix.driver.single.run_single``) on pools of
the same examples cut into more and more tasks, against the smallest task
count: wall time and its parts (shard preparation from an empty cache, the
training loop, the loss curve, the final evaluation, the summary's tracking)
and the MLflow volume (distinct metric keys, metric rows, store size)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from raymix.bench.common import ray_info, ray_settings
from raymix.bench.task_scaling import write_synthetic_tasks
from raymix.config import RunConfig


def mlflow_volume(db: Path, run_id: str) -> dict:
    """Distinct metric keys and metric rows of one run in a SQLite MLflow store."""
    with sqlite3.connect(str(db)) as con:
        rows, keys = con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM metrics WHERE run_uuid = ?",
                                 (run_id,)).fetchone()
    return {"metric_rows": int(rows), "metric_keys": int(keys)}


def mixture_kl(db: Path, run_id: str) -> dict:
    """The mixture's KL from uniform over a run (its ``mixture/kl_uniform``
    series in a SQLite MLflow store): the mean over logged steps and the
    last value; NaN for a run that logged none. Whether a policy's mixture
    moved at all, next to what its signal cost."""
    with sqlite3.connect(str(db)) as con:
        rows = con.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'mixture/kl_uniform' "
                           "ORDER BY step", (run_id,)).fetchall()
    values = [float(v) for _, v in rows]
    nan = float("nan")
    return {"kl_uniform_mean": sum(values) / len(values) if values else nan,
            "kl_uniform_last": values[-1] if values else nan}


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def evaluated_examples(cfg: RunConfig, run_dir: Path, curve_evaluations: int) -> dict:
    """How many examples a run's evaluations read, from its pool_stats.json:
    the final one (every validation and test example's loss, and exact match
    on the first ``eval.exact_match_per_task`` test prompts of each task,
    which generate up to ``eval.max_new_tokens``) and the curve's (the first
    ``eval.curve_per_task`` validation and test examples of each task, at each
    curve point). The same examples cut into more tasks are not the same
    evaluation: small tasks fall under the per-task caps, so the counts
    differ and the costs are also compared per example and per prompt."""
    import json

    stats = json.loads((run_dir / "pool_stats.json").read_text())
    val = [v["examples"] for v in stats["val"].values()]
    test = [v["examples"] for v in stats["test"].values()]
    em_each, curve_each = cfg.eval.exact_match_per_task(len(val)), cfg.eval.curve_per_task(len(val))
    prompts = sum(min(em_each, n) for n in test)
    curve = (sum(min(curve_each, n) for n in val) + sum(min(curve_each, n) for n in test)) * curve_evaluations
    return {"val_examples": sum(val), "test_examples": sum(test), "exact_match_prompts": prompts,
            "final_eval_examples": sum(val) + sum(test) + prompts, "curve_examples": curve}


def shared_tokenizer(cfg: RunConfig, out: Path, task_counts: Sequence[int], total_examples: int) -> str:
    """One tokenizer for every task count's runs (trained as a run trains
    its own, on all the counts' pools together), so that every count trains
    the same model. The task index is part of each prompt, so a tokenizer
    trained on one pool alone grows with the task count (666 tokens at 20
    tasks, 1,594 at 1,000, at the default vocabulary cap), and with it the
    embedding and the output layer: the loop then compares models of
    different sizes, not task counts."""
    from raymix.driver.setup import tokenizer_corpus
    from raymix.models import train_tokenizer
    from raymix.tasks.jsonl import load_jsonl

    texts = []
    for n in task_counts:
        src = write_synthetic_tasks(out / "tokenizer-sources" / f"T{n}", n, max(4, total_examples // n), cfg.seed)
        texts.append(list(tokenizer_corpus(load_jsonl(str(src)))))
    _, path = train_tokenizer(lambda: (t for ts in texts for t in ts), cfg.model.vocab_size, out / "tokenizer-cache",
                              f"task_runs:{list(task_counts)}:{total_examples}:{cfg.seed}")
    return path


def one_run(cfg: RunConfig, out: Path, tasks: int, total_examples: int) -> dict:
    """One task count's whole run, from an empty shard cache."""
    import shutil

    from raymix.config import SourceConfig
    from raymix.driver.single import run_single

    shutil.rmtree(out, ignore_errors=True)  # a new run, a cold cache
    src = write_synthetic_tasks(out / "source", tasks, max(4, total_examples // tasks), cfg.seed)
    run_dir = out / "run"
    c = replace(cfg, data=replace(cfg.data, sources=[SourceConfig(kind="jsonl", path=str(src))],
                                  cache_dir=str((out / "cache").resolve())),
                tracking=replace(cfg.tracking, tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"))
    t0 = time.perf_counter()
    s = run_single(c, run_dir)
    outer = time.perf_counter() - t0
    ph = s["phase_seconds"]
    rt = s["ray_train_seconds"]
    counts = evaluated_examples(c, run_dir, len(s.get("curve") or []))
    return {
        **counts,
        "final_eval_ms_per_example": 1e3 * s["eval_seconds"] / max(1, counts["final_eval_examples"]),
        # The final evaluation's two parts: a loss pass over every validation
        # and test example, greedy generation for the exact-match prompts.
        "loss_eval_ms_per_example": 1e3 * (s["eval_seconds"] - s.get("exact_match_seconds", 0.0))
        / max(1, counts["val_examples"] + counts["test_examples"]),
        "generation_ms_per_prompt": 1e3 * s.get("exact_match_seconds", 0.0) / max(1, counts["exact_match_prompts"]),
        "curve_ms_per_example": 1e3 * s["curve_seconds"] / max(1, counts["curve_examples"]),
        "tasks": tasks, "examples_per_task": max(4, total_examples // tasks), "train_tokens": s["train_tokens"],
        "steps": s["steps"], "wall_seconds": outer,
        "prepare_seconds": ph.get("records", 0.0) + ph.get("tokenizer", 0.0) + ph.get("shards", 0.0),
        "shards_seconds": ph.get("shards", 0.0),
        "loop_seconds": s["train_loop_seconds"], "tokens_per_second": s["tokens_per_second"],
        "curve_seconds": s["curve_seconds"], "final_eval_seconds": s["eval_seconds"],
        "worker_start_seconds": rt["worker_start"], "worker_setup_seconds": rt["worker_setup"],
        "log_summary_seconds": ph.get("log_summary", 0.0), "meta_seconds": s["meta_seconds"],
        "meta_steps": s.get("meta_steps", 0), "meta_tokens": s.get("meta_tokens", 0),
        # Per run: the median of the difference, not the difference of two
        # medians (which may come from different runs).
        "loop_without_meta_seconds": s["train_loop_seconds"] - s["meta_seconds"],
        "mean_test_loss": s["mean_test_loss"],
        **mlflow_volume(run_dir / "mlflow.db", s["mlflow_run_id"]),
        **mixture_kl(run_dir / "mlflow.db", s["mlflow_run_id"]),
        "mlflow_bytes": (run_dir / "mlflow.db").stat().st_size + _folder_bytes(run_dir / "mlartifacts"),
    }


DEFAULT_BUDGET_TOKENS = 300_000  # the budget of the runs that opened the issue "thousands of tasks"


def median_row(runs: list[dict]) -> dict:
    """Each numeric figure's median over repeats (the lower middle for an
    even count), other fields from the first run, and every run's wall and
    loop seconds. Medians per figure, not the figures of one median run: the
    loop of the run with the median wall need not be the median loop."""
    import statistics

    row = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = statistics.median_low([r[k] for r in runs])
    row["wall_seconds_all"] = [r["wall_seconds"] for r in runs]
    row["loop_seconds_all"] = [r["loop_seconds"] for r in runs]
    return row


def bench_task_runs(cfg: RunConfig, out: Path, repeats: int = 1,
                    task_counts: Sequence[int] = (20, 100, 1000, 5000), total_examples: int = 60000,
                    adapt_tasks: Sequence[int] = (1000,), warmup: int = 1) -> dict:
    """Whole runs at each task count on ``total_examples`` examples of
    :func:`write_synthetic_tasks` (80/10/10 splits), under the configuration's
    budget (``budget.tokens``, else 300,000 tokens) and runtime (``eval.suite`` off: lm-eval does not depend on the
    pool), with the configured policy (uniform by default). ``repeats`` runs
    per count, each from an empty cache, interleaved across counts (round
    by round, so a slow spell of the machine touches every count alike);
    the figures are medians over repeats. Ratios are against the smallest
    task count; goals (issue "thousands of tasks"): wall <= 1.2x, loop <=
    1.1x, evaluation <= 1.5x, distinct metric keys equal. Every count uses
    one tokenizer (:func:`shared_tokenizer`) unless the configuration names
    one, so every run trains the same model. At each count of
    ``adapt_tasks`` the same runs are repeated with ``policy.name=adapt``:
    its loop against the configured policy's, in all and without the
    seconds of its meta steps (goal: <= 1.10x)."""
    cfg = ray_settings(replace(cfg, eval=replace(cfg.eval, suite=None)))
    if cfg.budget.tokens is None:
        # Equal tokens at every task count, enough for the loop to be timed
        # (the default fraction of these small pools trains a fraction of a second).
        cfg = replace(cfg, budget=replace(cfg.budget, tokens=DEFAULT_BUDGET_TOKENS))
    vocab = None
    if not (cfg.model.pretrained or cfg.model.tokenizer):
        cfg = replace(cfg, model=replace(cfg.model, tokenizer=shared_tokenizer(cfg, out, task_counts, total_examples)))
        from raymix.models import load_tokenizer

        vocab = len(load_tokenizer(cfg.model.tokenizer))
    adapt_cfg = replace(cfg, policy=replace(cfg.policy, name="adapt")) if cfg.policy.name != "adapt" else None
    runs: dict[str, list[dict]] = {str(n): [] for n in task_counts}
    adapt_runs: dict[str, list[dict]] = {str(n): [] for n in adapt_tasks if adapt_cfg is not None}
    for i in range(warmup):
        # Untimed: the first run of a process pays for what later runs find
        # warm (imports, the page cache; 30% more wall in one measurement).
        one_run(cfg, out / "warmup" / f"r{i}", min(task_counts), total_examples)
    jobs = [(runs, cfg, str(n), f"T{n}") for n in task_counts] + [
        (adapt_runs, adapt_cfg, key, f"T{key}-adapt") for key in adapt_runs]
    order = []
    for i in range(repeats):
        # Every other round runs in the reverse order: with 20 tasks always
        # first, 1,000 tasks' loop measured 1.09x-1.14x of 20's; in the
        # reverse order 1.01x (the 20-task loop 10.2 s run second, 9.1 s first).
        for into, c, key, name in (jobs if i % 2 == 0 else jobs[::-1]):
            into[key].append(one_run(c, out / name / f"r{i}", int(key), total_examples))
            order.append(name)
    rows = {n: median_row(rs) for n, rs in runs.items()}
    lo = rows[str(min(task_counts))]
    for r in rows.values():
        r["ratios"] = {k: r[k] / max(1e-9, lo[k]) for k in (
            "wall_seconds", "loop_seconds", "prepare_seconds", "final_eval_seconds", "curve_seconds",
            "final_eval_ms_per_example", "curve_ms_per_example", "loss_eval_ms_per_example",
            "generation_ms_per_prompt", "metric_keys", "metric_rows")}
    adapt = {}
    for n, rs in adapt_runs.items():
        a = median_row(rs)
        base = rows[n]["loop_seconds"]
        a["loop_vs_policy"] = a["loop_seconds"] / max(1e-9, base)
        a["loop_without_meta_vs_policy"] = a["loop_without_meta_seconds"] / max(1e-9, base)
        # Each round's ADAPT run against the same round's run of the
        # configured policy (minutes apart): a slow spell of the machine,
        # which moves one median and not the other, mostly cancels in the pair.
        a["loop_vs_policy_by_round"] = [x["loop_seconds"] / max(1e-9, y["loop_seconds"])
                                        for x, y in zip(rs, runs[n])]
        # Tokens read for ADAPT's signals: its meta tokens net of the
        # configured policy's (both read the same curve evaluations).
        a["signal_tokens"] = a["meta_tokens"] - rows[n]["meta_tokens"]
        adapt[n] = a
    from raymix.config import effective_grad_accum
    from raymix.policies.adapt.signal import meta_interval_examples, tasks_per_meta_step

    world = max(1, cfg.runtime.num_workers)
    batch = cfg.train.micro_batch_size * effective_grad_accum(cfg, world=world) * world
    for n, a in adapt.items():
        # Tasks a meta step reads on this pool (alignments; validation losses),
        # every task having validation data here.
        k, k_val = tasks_per_meta_step(adapt_cfg.policy.adapt, int(n), int(n),
                                       meta_interval_examples(adapt_cfg, world))
        a["tasks_per_meta_step"] = [k, int(n) if k_val is None else k_val]
    return {"model": cfg.model.preset, "policy": cfg.policy.name, "total_examples": total_examples,
            "shared_tokenizer_vocab": vocab,
            "repeats": repeats, "budget_tokens": cfg.budget.tokens, "num_workers": cfg.runtime.num_workers,
            "global_batch_examples": batch,
            "per_task_metrics_max_tasks": cfg.tracking.per_task_metrics_max_tasks, "ray": ray_info(cfg),
            "task_counts": list(task_counts), "runs": rows, "adapt": adapt, "warmup_runs": warmup,
            "run_order": order}


def markdown(r: dict) -> list[str]:
    """This benchmark's section of bench.md."""
    lo = min(r["task_counts"])
    lines = [
        "\n## task_runs\n",
        f"Whole runs (`run_single`, {r['num_workers']} worker(s), "
        + (f"{r['global_batch_examples']:,} examples per step, " if "global_batch_examples" in r else "")
        + f"budget {r['budget_tokens']:,} tokens, model "
        f"`{r['model']}`) on the same {r['total_examples']:,} short examples cut into more tasks; shards prepared "
        f"from an empty cache; one metric per task up to {r['per_task_metrics_max_tasks']} tasks"
        + (f"; one tokenizer of {r['shared_tokenizer_vocab']:,} tokens for every count, trained on all the pools "
           "together, so that every run trains the same model (a tokenizer trained on each pool alone grows with "
           "the task count, which names its task in each prompt)" if r.get("shared_tokenizer_vocab") else "")
        + f". Ratios against {lo} tasks.\n",
        "| tasks | wall s | prepare s | loop s (tokens/s) | curve s (examples, ms/example) | final eval s "
        "(loss pass: examples, ms/example; generation: prompts, ms/prompt) | MLflow keys / rows | store MB | "
        "wall / loop / final eval ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    legacy = False
    for n in r["task_counts"]:
        x = r["runs"][str(n)]
        q = x["ratios"]
        if "loss_eval_ms_per_example" not in x:  # written before the final evaluation was timed in parts
            legacy = True
            lines.append(f"| {n} | {x['wall_seconds']:.1f} | {x['prepare_seconds']:.1f} | {x['loop_seconds']:.1f} "
                         f"({x['tokens_per_second']:,.0f}) | {x['curve_seconds']:.1f} | "
                         f"{x['final_eval_seconds']:.1f} | {x['metric_keys']:,} / {x['metric_rows']:,} | "
                         f"{x['mlflow_bytes'] / 1e6:.1f} | {q['wall_seconds']:.2f} / {q['loop_seconds']:.2f} / "
                         f"{q['final_eval_seconds']:.2f} |")
            continue
        lines.append(f"| {n} | {x['wall_seconds']:.1f} | {x['prepare_seconds']:.1f} | {x['loop_seconds']:.1f} "
                     f"({x['tokens_per_second']:,.0f}) | {x['curve_seconds']:.1f} ({x['curve_examples']:,}, "
                     f"{x['curve_ms_per_example']:.2f}) | {x['final_eval_seconds']:.1f} "
                     f"({x['val_examples'] + x['test_examples']:,}, {x['loss_eval_ms_per_example']:.2f}; "
                     f"{x['exact_match_prompts']:,}, {x['generation_ms_per_prompt']:.2f}) | "
                     f"{x['metric_keys']:,} / {x['metric_rows']:,} | {x['mlflow_bytes'] / 1e6:.1f} | "
                     f"{q['wall_seconds']:.2f} / {q['loop_seconds']:.2f} / {q['final_eval_seconds']:.2f} |")
    lines += ["", "The final evaluation is a loss pass over every validation and test example (test capped at "
              "`data.max_test` per task) and greedy generation for `eval.exact_match_per_task` test prompts of "
              "each task (`eval.max_test_examples`, lowered so that at most `eval.max_exact_match_prompts` are "
              "generated in all); a curve point reads `eval.curve_per_task` validation and test examples of each "
              "task (at most `eval.curve_max_examples` per split in all). Small tasks fall under the per-task "
              "caps, so the counts differ between task counts and the costs are also given per example and per "
              "prompt. Goals (issue \"thousands of tasks\"): at 1,000 tasks, wall <= 1.2x, loop <= 1.1x, "
              "evaluation <= 1.5x, and distinct MLflow keys bounded in T."]
    if legacy:
        lines += ["", "Rows without the parts of the final evaluation were measured before it was timed in parts "
                  "(and before its bounds in all)."]
    if r.get("repeats", 1) > 1:
        order = ("every other round in the reverse order, " if "run_order" in r else "")
        warm = (f"after {r['warmup_runs']} untimed run(s) at {lo} tasks, " if r.get("warmup_runs") else "")
        lines += ["", f"Figures are medians of {r['repeats']} runs per task count (runs interleaved across counts, "
                  f"{order}{warm}".rstrip(", ") + "); loop seconds of every run: " + "; ".join(
                      f"{n}: " + ", ".join(f"{v:.1f}" for v in r["runs"][str(n)].get("loop_seconds_all", []))
                      for n in r["task_counts"]) + "."]
    if r.get("adapt"):
        lines += ["", f"ADAPT against {r.get('policy', 'uniform')} on the same pools (goal: loop <= 1.10x at 1,000 "
                  "tasks):", "", "| tasks | loop s (tokens/s) | meta steps s | meta steps | tasks read per meta "
                  "step (alignments / validation) | signal tokens / train tokens | loop ratio | loop ratio without "
                  "meta steps | KL(p‖uniform): mean / last | wall s | MLflow keys |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, a in sorted(r["adapt"].items(), key=lambda kv: int(kv[0])):
            # Runs recorded before the meta steps and their tokens were kept show a dash.
            steps = f"{a['meta_steps']}" if "meta_steps" in a else "-"
            share = (f"{a['signal_tokens']:,} / {a['train_tokens']:,} ({a['signal_tokens'] / a['train_tokens']:.2f})"
                     if "signal_tokens" in a else "-")
            read = " / ".join(map(str, a["tasks_per_meta_step"])) if "tasks_per_meta_step" in a else "-"
            kl = (f"{a['kl_uniform_mean']:.3f} / {a['kl_uniform_last']:.3f}" if "kl_uniform_mean" in a else "-")
            lines.append(f"| {n} | {a['loop_seconds']:.1f} ({a['tokens_per_second']:,.0f}) | {a['meta_seconds']:.1f} | "
                         f"{steps} | {read} | {share} | {a['loop_vs_policy']:.2f} | "
                         f"{a['loop_without_meta_vs_policy']:.2f} | {kl} | {a['wall_seconds']:.1f} | "
                         f"{a['metric_keys']:,} |")
        for n, a in sorted(r["adapt"].items(), key=lambda kv: int(kv[0])):
            if len(a.get("loop_vs_policy_by_round", [])) > 1:
                pairs = a["loop_vs_policy_by_round"]
                lines += ["", f"At {n} tasks, the loop ratio of each round's pair of runs (ADAPT against the same "
                          f"round's {r.get('policy', 'uniform')} run): "
                          + ", ".join(f"{v:.2f}" for v in pairs)
                          + f"; median {sorted(pairs)[(len(pairs) - 1) // 2]:.2f}."]
    return lines
