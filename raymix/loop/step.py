"""The training step: sample micro-batches from the mixture, forward and
backward with the loss on completion tokens, all-reduce the per-task
statistics, stop before a non-finite update, clip, and step AdamW.

:class:`TrainStep` also owns what the step draws from: the
:class:`raymix.streams.MixtureSampler` (each task's example stream and the
generator that picks each example's task). Its state, the global data
positions, is the same on every rank and independent of the worker count, so
a checkpoint resumes on any number of workers; only torch's generator is
per rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np

from raymix.config import effective_grad_accum


class TokenCosineSchedule:
    """Learning rate as a function of the budget spent: linear warm-up over
    ``warmup`` of the budget, then cosine decay to ``min_ratio * peak``. Tied
    to tokens, not steps, so it means the same with any batch or worker count."""

    def __init__(self, peak: float, warmup: float, min_ratio: float):
        self.peak, self.warmup, self.min_ratio = peak, warmup, min_ratio

    def __call__(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.warmup > 0 and progress < self.warmup:
            return self.peak * max(progress / self.warmup, 0.01)
        t = (progress - self.warmup) / max(1e-12, 1 - self.warmup)
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class StepOutcome:
    stats: np.ndarray
    """Per task, summed over ranks: [tokens, completion-token NLL sum, completion-token count]."""
    loss: float
    """Mean completion-token NLL of the step (over all ranks)."""
    lr: float
    grad_norm: float = 0.0
    """The gradient's norm before clipping (0: not computed, ``train.grad_clip`` 0)."""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    def why_not_finite(self) -> str:
        if not math.isfinite(self.loss):
            return f"training loss became {self.loss}"
        return f"the gradient's norm became {self.grad_norm} (loss {self.loss:.4g})"


class TrainStep:
    def __init__(self, w):
        import torch

        from raymix.flops import ModelFlops
        from raymix.kernels import StepKernels
        from raymix.packing import StepBatches
        from raymix.streams import MixtureSampler

        cfg = w.cfg
        self.w = w
        decay, no_decay = [], []
        for name, p in w.raw_model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        w.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.train.lr,
            betas=cfg.train.betas,
            # On CUDA torch's fused kernel (one pass over each parameter's
            # weights, gradient and moments; torch's default there is the
            # multi-kernel foreach path), as torchtitan uses with FSDP2's
            # DTensors. On CPU torch's default: what every CPU figure and
            # test was measured with.
            fused=True if w.device.type == "cuda" else None,
        )
        self.schedule = TokenCosineSchedule(cfg.train.lr, cfg.train.warmup_fraction, cfg.train.min_lr_ratio)
        self.use_amp = w.device.type == "cuda"
        # The micro-batches per step follow the worker count the run has
        # now (an elastic run may have fewer or more than it started with).
        self.mbs, self.accum = cfg.train.micro_batch_size, effective_grad_accum(cfg, world=w.world)
        pool = w.loop.pool
        self.T = len(pool.tasks)
        self.sampler = MixtureSampler([pool.shards("train", t) for t in pool.tasks], cfg.seed, w.rank, w.world)
        self.kernels = StepKernels(w.raw_model, cfg.train.attention, cfg.train.compile, w.device.type)
        # Compiled on CUDA: every packed row at the full pack length, one
        # shape for the compiled graphs (no recompilation per row width; the
        # fullest row of a step is within a few tokens of it at GPU sizes).
        full = (cfg.train.pack_length or cfg.data.max_seq_len) if cfg.train.compile and self.use_amp else None
        self.batches = StepBatches(w.raw_model, w.pad_id, cfg.train.packing, cfg.train.pack_length,
                                   cfg.data.max_seq_len, log=print if w.rank == 0 else lambda _: None,
                                   multiple=full, attention=self.kernels.mask_attention)
        # Over all ranks since this worker started: real tokens, computed
        # positions, completion tokens, causal query-key pairs within examples.
        self.counted = np.zeros(4)
        self.batch_seconds = 0.0  # rank 0's host time drawing and laying out examples (in the loop's time)
        self.flops = ModelFlops.of(w.raw_model)

    @property
    def utilisation(self) -> float:
        """Real tokens per computed position (padding and packing slack cost positions)."""
        return float(self.counted[0] / max(1.0, self.counted[1]))

    @property
    def model_flops_per_token(self) -> float:
        """Training FLOPs the model needed per real token so far
        (:mod:`raymix.flops`: the output layer at completion positions,
        attention within examples); 0 before the first step."""
        tokens, _, completion, pairs = self.counted
        return self.flops.required(tokens, completion, pairs) / tokens if tokens else 0.0

    def __call__(self, weights: np.ndarray, progress: float) -> StepOutcome:
        import torch

        from raymix.flops import causal_pairs
        from raymix.loss import token_nll

        w, model, opt = self.w, self.w.model, self.w.optimizer
        lr = self.schedule(progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # Padded, or packed (as many micro-batches, fewer positions).
        t = time.perf_counter()
        micro = self.batches(self.sampler.draw(weights, self.accum, self.mbs))
        self.batch_seconds += time.perf_counter() - t
        n_completion = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in micro)
        # The step's gradient is that of the mean NLL over every rank's
        # completion tokens (what the step reports, whatever the worker
        # count): DDP and FSDP average the ranks' gradients, so a rank
        # scales its NLL sum by the worker count over all ranks' tokens
        # (dividing by its own count weighted a rank with few completion
        # tokens as one with many).
        if w.distributed:
            total = float(w.all_reduce(torch.tensor([float(n_completion)], dtype=torch.float64))[0])
            scale = w.world / max(1.0, total)
        else:
            scale = 1.0 / max(1, n_completion)
        # Per task: tokens, loss sum, loss count; the last column holds the
        # step's positions computed and causal query-key pairs within examples.
        step_stats = np.zeros((3, self.T + 1))
        for k, (idx, batch) in enumerate(micro):
            with self._sync(k), self.kernels(), \
                    torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                nll, cnt = token_nll(model, batch, w.device)
                loss = nll.sum() * scale
                loss.backward()
            np.add.at(step_stats[0], idx, batch["lengths"].numpy())
            step_stats[0, -1] += batch["input_ids"].numel()
            step_stats[1, -1] += causal_pairs(batch["lengths"].numpy())
            np.add.at(step_stats[1], idx, nll.detach().float().cpu().numpy())
            np.add.at(step_stats[2], idx, cnt.cpu().numpy())
        reduced = w.all_reduce(torch.from_numpy(step_stats)).numpy()
        stats = np.ascontiguousarray(reduced[:, :-1])
        self.counted += (stats[0].sum(), reduced[0, -1], stats[2].sum(), reduced[1, -1])
        outcome = StepOutcome(stats, stats[1].sum() / max(1.0, stats[2].sum()), lr)
        if not outcome.finite:
            # Every rank sees the same reduced loss and stops here, before
            # the update: the parameters are still the last good ones, and
            # the data positions go back to before the refused step's draws
            # (the "aborted" checkpoint is the last good state, and a resume
            # from it trains those examples).
            opt.zero_grad(set_to_none=True)
            self.sampler.undo_draw()
            return outcome
        if w.cfg.train.grad_clip > 0:
            # Under FSDP the gradients are DTensor shards: clip_grad_norm_
            # reduces the norm over the workers, so every rank clips alike,
            # and every rank refuses a non-finite norm alike (a finite loss
            # can have one in bf16: the update would write NaN weights into
            # the run and into its "aborted" checkpoint).
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), w.cfg.train.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            outcome = StepOutcome(stats, outcome.loss, lr, float(norm))
            if not outcome.finite:
                opt.zero_grad(set_to_none=True)
                self.sampler.undo_draw()
                return outcome
        opt.step()
        opt.zero_grad(set_to_none=True)
        return outcome

    def _sync(self, k: int):
        """Gradient synchronisation on the last micro-batch of a step only."""
        w, last = self.w, k == self.accum - 1
        if w.fsdp:
            # FSDP2's no_sync: gradients stay unsharded and accumulate
            # locally until the last micro-batch reduce-scatters them.
            w.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return w.model.no_sync() if (w.distributed and not last) else contextlib.nullcontext()

    # -- the positions it draws from (global) and torch's generator (per rank)
    def state_dict(self) -> dict:
        return {"data": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["data"])

    def data_positions(self) -> dict[str, dict]:
        """Per task, the examples drawn so far over all ranks (``epoch``, ``served``)."""
        return dict(zip(self.w.loop.pool.tasks, self.sampler.positions()))

    def rank_state_dict(self) -> dict:
        """torch's generators: the CPU one, and this rank's GPU one on CUDA
        (dropout draws from the device's generator there)."""
        import torch

        state = {"torch_rng": torch.get_rng_state()}
        if self.w.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.w.device)
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        import torch

        torch.set_rng_state(state["torch_rng"])
        if self.w.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.w.device)
