"""DoReMi's worker-side signal: the per-task excess loss of the trained
model over a frozen reference model.

The reference (doremi/trainer.py:297-340) scores the tokens of the training
step's own batch. raymix's signal protocol does not hand a step's batch to
a signal, so at each due step every worker reads its share of
``policy.doremi.examples_per_task`` training examples per task from streams
of its own (seeded apart from the training streams), scores every
completion token with both models, clips l_model - l_ref at zero per token
(trainer.py:252) and sums per task; the sums and counts are all-reduced,
so the per-task mean does not depend on the worker count. Every task is
read at every update. The tokens both models read are ``meta_tokens``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.errors import RaymixError
from raymix.loss import completion_token_nll
from raymix.metrics_view import per_task
from raymix.policies.signal import NoSignal, SignalContext, StepView
from raymix.streams import TaskStream, collate


def load_reference(path: Optional[str], model, device):
    """The frozen reference model: a prior raymix run's saved model directory."""
    import os

    from transformers import AutoModelForCausalLM

    if not path:
        raise RaymixError("policy.doremi.reference_model is not set: run DoReMi through raymix.driver.run "
                          "(which trains the reference first) or give a prior run's model directory")
    if not os.path.isdir(path):
        raise RaymixError(f"policy.doremi.reference_model: no model directory at {path}")
    dtype = next(model.parameters()).dtype
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    ours, theirs = model.get_input_embeddings().weight.shape[0], ref.get_input_embeddings().weight.shape[0]
    if ours != theirs:
        raise RaymixError(f"policy.doremi.reference_model has a vocabulary of {theirs}, the trained model "
                          f"{ours}: the reference must come from a run with the same tokenizer")
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def per_task_excess(nll, ref_nll, task_of_token, K: int):
    """Per task: [sum over its completion tokens of max(0, l - l_ref), token
    count] (doremi/trainer.py:252 clips per token, then averages per domain)."""
    import torch

    out = torch.zeros(2, K, dtype=torch.float64)
    excess = torch.clamp(nll.double() - ref_nll.double(), min=0.0).cpu()
    out[0].index_add_(0, task_of_token, excess)
    out[1].index_add_(0, task_of_token, torch.ones_like(excess))
    return out


class DoremiSignal(NoSignal):
    """Due every ``policy.doremi.every_steps`` steps after ``warmup_steps``
    while budget remains; reports ``excess`` (per task, NaN where no token
    was read) to :class:`raymix.policies.doremi.DoremiPolicy`."""

    def __init__(self, ctx: SignalContext, reference=None):
        self.cfg = ctx.run.policy.doremi
        self.tasks = ctx.pool.tasks
        self.K = len(self.tasks)
        self.model, self.device, self.pad_id = ctx.model, ctx.device, ctx.pad_id
        self.rank, self.world, self.distributed = ctx.rank, ctx.world, ctx.distributed
        self.reference = reference if reference is not None else load_reference(self.cfg.reference_model,
                                                                                 ctx.model, ctx.device)
        seed = ctx.run.seed
        self.streams = [TaskStream(ctx.pool.shards("train", t), seed * 7919 + 70001 + i, ctx.rank, ctx.world)
                        for i, t in enumerate(self.tasks)]
        self.last: dict = {}

    def _share(self, n: int) -> int:
        return n // self.world + (1 if self.rank < n % self.world else 0)

    def due(self, view: StepView) -> bool:
        return (view.step >= self.cfg.warmup_steps and view.step % self.cfg.every_steps == 0
                and view.train_tokens < view.budget_tokens)

    def compute(self, view: StepView) -> Optional[dict]:
        import torch

        K = self.K
        sums = torch.zeros(3, K, dtype=torch.float64)  # excess sum, token count, meta tokens
        n = self._share(self.cfg.examples_per_task)
        if n:
            examples, owner = [], []
            for i, stream in enumerate(self.streams):
                for _ in range(n):
                    examples.append(stream.next())
                    owner.append(i)
            batch = collate(examples, self.pad_id)
            owner_t = torch.tensor(owner, dtype=torch.long)
            with torch.no_grad():
                rows, nll, _ = completion_token_nll(self.model, batch, self.device)
                _, ref_nll, _ = completion_token_nll(self.reference, batch, self.device)
            sums[:2] = per_task_excess(nll, ref_nll, owner_t[rows.cpu()], K)
            sums[2].index_add_(0, owner_t, 2.0 * batch["attention_mask"].sum(1).double())
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (sums[0] / sums[1]).numpy()
        self.last = {"excess": mean}
        return {"excess": [float(v) if np.isfinite(v) else float("nan") for v in mean],
                "meta_tokens": sums[2].numpy().astype(np.int64).tolist()}

    def metrics(self, signals: Optional[dict], weights: np.ndarray, timing: dict[str, float]) -> dict[str, float]:
        assert signals is not None
        ex = np.asarray(signals["excess"], dtype=np.float64)
        m = {"meta/step_seconds": timing["step_seconds"], "meta/time_share": timing["time_share"],
             "meta/tokens": float(np.sum(signals["meta_tokens"])),
             "doremi/zero_excess_tasks": float((ex[np.isfinite(ex)] <= 0).sum()),
             "doremi/mean_excess": float(np.nanmean(ex)) if np.isfinite(ex).any() else float("nan")}
        m["signal/{task}/excess_loss"] = per_task(ex, "loss")
        m["mixture/{task}"] = per_task(weights, "weight")
        return m

    def rank_state_dict(self) -> dict:
        return {"doremi_streams": [s.state_dict() for s in self.streams]}

    def load_rank_state_dict(self, state: dict) -> None:
        for s, st in zip(self.streams, state.get("doremi_streams", [])):
            s.load_state_dict(st)
