"""IDEAL's scores of a finished round: the influence of upweighting each
task on the reference (validation) loss, read from the round's checkpoint.

Called by the multi-round driver (``raymix.driver.ideal``) between rounds.
"""

from __future__ import annotations

import time

import numpy as np

from raymix.config import RunConfig
from raymix.errors import RaymixError


def reference_tasks(cfg: RunConfig, tasks: tuple[str, ...]) -> list[str]:
    chosen = cfg.policy.ideal.reference_tasks
    if chosen is None:
        return list(tasks)
    unknown = sorted(set(chosen) - set(tasks))
    if unknown:
        raise RaymixError(f"policy.ideal.reference_tasks: unknown task(s) {unknown}; the pool has {list(tasks)}")
    return list(dict.fromkeys(chosen))


def _batches(examples: list, pad_id: int, size: int) -> list:
    from raymix.streams import collate

    return [collate(examples[s : s + size], pad_id) for s in range(0, len(examples), size)]


def score_tasks(cfg: RunConfig, model_dir: str, pool, pad_id: int, ref_tasks: list[str], r: int) -> dict:
    """Influence scores of every task on the round's final checkpoint.

    Task j's gradient is taken on ``examples_per_task`` examples of its
    training split (a seeded stream, different each round); the curvature is
    fitted on the same examples of all tasks; the reference loss is the
    token-weighted validation NLL of ``ref_tasks``. Tokens are counted once
    per pass the influence code makes over them (the curvature fit makes one,
    EK-FAC two; the gradients one more), per task, as meta tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from raymix.gradients import lm_example_nll
    from raymix.policies.ideal.influence import ideal_influence
    from raymix.streams import TaskStream, read_split

    icfg = cfg.policy.ideal
    t0 = time.perf_counter()
    device = "cuda" if cfg.runtime.use_gpu and torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    bs = cfg.train.micro_batch_size
    tasks = list(pool.tasks)
    read = np.zeros(len(tasks), dtype=np.int64)
    task_batches = []
    for j, task in enumerate(tasks):
        # A seed of its own per run seed and round: not the training streams' order.
        stream = TaskStream(pool.shards("train", task), seed=7919 * (cfg.seed + 1) + r)
        batches = _batches([stream.next() for _ in range(icfg.examples_per_task)], pad_id, bs)
        read[j] += sum(int(b["attention_mask"].sum()) for b in batches)
        task_batches.append(batches)
    ref_batches, ref_read = [], np.zeros(len(tasks), dtype=np.int64)
    for task in ref_tasks:
        rows = read_split(pool.shards("val", task), ["input_ids", "prompt_len"])
        ex = [(np.asarray(i, dtype=np.int64), int(p))
              for i, p in list(zip(rows["input_ids"], rows["prompt_len"]))[: icfg.reference_examples_per_task]]
        for b in _batches(ex, pad_id, bs):
            ref_batches.append(b)
            ref_read[tasks.index(task)] += int(b["attention_mask"].sum())
    if not ref_batches:
        raise RaymixError(f"policy.ideal.reference_tasks: no validation examples in {ref_tasks}")
    curvature_batches = [b for batches in task_batches for b in batches]
    res = ideal_influence(model, icfg.params, ref_batches, task_batches, curvature_batches,
                          lm_example_nll(device), icfg.curvature, icfg.damping)
    passes = {"identity": 1, "diag_fisher": 2, "kfac": 2, "ekfac": 3}[icfg.curvature]
    scores = np.asarray(res.scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise RaymixError(f"round {r}: influence scores are not finite ({scores.tolist()}); "
                          "raise policy.ideal.damping or change policy.ideal.curvature")
    return {
        "round": r,
        "scores": dict(zip(tasks, scores.tolist())),
        "reference_tasks": ref_tasks,
        "curvature": res.curvature.kind,
        "damping_absolute": float(res.curvature.damping),
        "subset_numel": int(res.task_grads.shape[1]),
        "meta_tokens": dict(zip(tasks, (read * passes + ref_read).tolist())),
        "tokens_read": int(read.sum() + ref_read.sum()),
        "seconds": time.perf_counter() - t0,
    }
