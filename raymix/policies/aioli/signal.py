"""Aioli's worker-side signal: the probe schedule and the losses on a fixed
validation set.

A round starts at the first step at or past ``round * round_share *
budget`` train tokens: the signal reads the per-task validation losses and
reports them (``probe_index`` 0); the mixer answers with the first probe
mixture, which the loop applies at once. Every ``probe_steps`` steps after
that the losses are read again and reported (``probe_index`` 1..n); the
answer is the next probe mixture, or after the last one the updated mixture
the rest of the round trains on. Probe segments are real training (train
tokens); the loss readings are ``meta_tokens``.

The validation set is fixed for the whole run (as the reference's
``tokenized_val``): each worker reads its share of
``val_examples_per_task`` examples per task once, so every reading is of
the same examples. Sums and counts are all-reduced: the losses do not
depend on the worker count.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.loss import token_nll
from raymix.metrics_view import per_task
from raymix.policies.aioli.policy import num_probes
from raymix.policies.signal import NoSignal, SignalContext, StepView
from raymix.streams import TaskStream, collate


class AioliSignal(NoSignal):
    def __init__(self, ctx: SignalContext):
        import torch

        self.cfg = ctx.run.policy.aioli
        self.tasks = ctx.pool.tasks
        self.K = len(self.tasks)
        self.model, self.device, self.pad_id = ctx.model, ctx.device, ctx.pad_id
        self.distributed = ctx.distributed
        self.n_probes = num_probes(self.cfg, self.K)
        self.round_tokens = max(1, int(self.cfg.round_share * ctx.budget_tokens))
        n = self.cfg.val_examples_per_task // ctx.world + (1 if ctx.rank < self.cfg.val_examples_per_task
                                                            % ctx.world else 0)
        examples, owner = [], []
        for i, t in enumerate(self.tasks):
            if not n or not ctx.pool.stats["val"][t]["examples"]:
                continue
            stream = TaskStream(ctx.pool.shards("val", t), ctx.run.seed * 7919 + 90001 + i, ctx.rank, ctx.world)
            for _ in range(n):
                examples.append(stream.next())
                owner.append(i)
        self.batch = collate(examples, self.pad_id) if examples else None
        self.owner = torch.tensor(owner, dtype=torch.long)
        # The schedule, the same on every rank (shared state).
        self.round = 0
        self.probe = -1  # -1: between rounds; k >= 0: the next reading is probe_index k
        self.next_step = 0

    def due(self, view: StepView) -> bool:
        if view.train_tokens >= view.budget_tokens:
            return False
        if self.probe >= 0:
            return view.step >= self.next_step
        return view.train_tokens >= self.round * self.round_tokens

    def _losses(self) -> tuple[np.ndarray, np.ndarray]:
        import torch

        sums = torch.zeros(3, self.K, dtype=torch.float64)  # NLL sum, token count, meta tokens
        if self.batch is not None:
            with torch.no_grad():
                nll, cnt = token_nll(self.model, self.batch, self.device)
            sums[0].index_add_(0, self.owner, nll.double().cpu())
            sums[1].index_add_(0, self.owner, cnt.double().cpu())
            sums[2].index_add_(0, self.owner, self.batch["attention_mask"].sum(1).double())
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (sums[0] / sums[1]).numpy(), sums[2].numpy()

    def compute(self, view: StepView) -> Optional[dict]:
        losses, tokens = self._losses()
        k = max(self.probe, 0)
        if k < self.n_probes:
            self.probe, self.next_step = k + 1, view.step + self.cfg.probe_steps
        else:  # the last reading: the round's mixture is fitted, train on it until the next round
            self.probe, self.round = -1, self.round + 1
        return {"probe_index": k, "val_loss": [float(v) for v in losses],
                "meta_tokens": tokens.astype(np.int64).tolist()}

    def metrics(self, signals: Optional[dict], weights: np.ndarray, timing: dict[str, float]) -> dict[str, float]:
        assert signals is not None
        vl = np.asarray(signals["val_loss"], dtype=np.float64)
        m = {"meta/step_seconds": timing["step_seconds"], "meta/time_share": timing["time_share"],
             "meta/tokens": float(np.sum(signals["meta_tokens"])), "aioli/probe_index": float(signals["probe_index"]),
             "aioli/round": float(self.round),
             "aioli/mean_val_loss": float(np.nanmean(vl)) if np.isfinite(vl).any() else float("nan")}
        m["signal/{task}/val_loss"] = per_task(vl, "loss")
        m["mixture/{task}"] = per_task(weights, "weight")
        return m

    def state_dict(self) -> dict:
        return {"aioli_schedule": {"round": self.round, "probe": self.probe, "next_step": self.next_step}}

    def load_state_dict(self, state: dict) -> None:
        st = state.get("aioli_schedule")
        if st:
            self.round, self.probe, self.next_step = int(st["round"]), int(st["probe"]), int(st["next_step"])
