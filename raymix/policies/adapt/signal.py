"""ADAPT's worker-side signal: the meta step.

At a meta step every worker computes, on its share of the step's examples
(the counts in ``policy.adapt`` are totals over the workers, so the signals
do not depend on the worker count), on a restricted parameter subset:
per-task validation losses (all-reduced; an exponential moving average of
them sets the soft-max weights q), the gradient g_val of the smooth
worst-case validation loss J, and the alignments <g_val, g_i> with the
training gradient of every task (a random subset on pools of more than
``tasks_per_step`` tasks).

Inner products are exact where that is cheap: g_val is all-reduced once (d
numbers), each worker takes the derivative of each of its training
examples' loss along it by forward-mode AD (one batched pass for all tasks:
<g_val, g_i> without forming g_i), and only the T scalars are all-reduced
(sum_r <g_val, g_i^r> = <g_val, g_i>). Above ``sketch_above`` parameters
g_val is CountSketched to ``sketch_dim`` dimensions before its all-reduce
and the derivative is taken along S^T S g_val (so the alignment is the
sketch's <S g_val, S g_i>), with a hash redrawn at every meta step (the same
on every rank), so that sketch errors do not repeat from step to
step. Tokens read here go to the ledger's ``meta_tokens``, never ``train_tokens``.

What a meta step costs does not grow with the number of tasks T beyond
small O(T) vectors on large pools: alignments are taken for
``tasks_per_step`` sampled tasks, and when the pool has more than
``VAL_TASKS_PER_STEP`` tasks with validation data, validation losses are
read for that many tasks per step only (see :meth:`MetaSignals._val_sample`);
the other tasks keep their last observed loss. On such pools both samples
are further cut to ``signal_share`` of the examples trained on between meta
steps (see :func:`signal_cut`), so that the signal's cost is a bounded share
of the training's at any batch size. Streams are only read for the tasks a
step touches.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import numpy as np

from raymix.config import AdaptConfig, effective_grad_accum
from raymix.gradients import gradients_only_on, outermost_modules, select_params, zero_tangents_into
from raymix.loss import token_nll
from raymix.metrics_view import per_task
from raymix.policies.adapt.policy import entropy, kl_uniform, smooth_max, standardise
from raymix.policies.signal import NoSignal, SignalContext, StepView
from raymix.streams import TaskStream, collate, preload_small


class CountSketch:
    """Unbiased inner-product sketch: coordinate j goes to bucket h(j) with sign s(j).
    E<Sa, Sb> = <a, b>; its variance is at most (|a|^2 |b|^2 + <a,b>^2)/k."""

    def __init__(self, dim: int, k: int, seed: int, device=None):
        import torch

        g = torch.Generator().manual_seed(int(seed))
        self.k = k
        self.bucket = torch.randint(0, k, (dim,), generator=g).to(device)
        self.sign = (torch.randint(0, 2, (dim,), generator=g).to(torch.float32) * 2 - 1).to(device)

    def __call__(self, vec):
        import torch

        out = torch.zeros(self.k, dtype=torch.float32, device=vec.device)
        out.index_add_(0, self.bucket.to(vec.device), vec.float() * self.sign.to(vec.device))
        return out


META_BATCH = 64
"""Examples per pass of the meta step (the validation losses and the
forward-mode alignments), sorted by length so that a batch pads little.
Why not one batch: one pass over a meta step's 512 validation examples per
rank (64 tasks x 8) cost 51 us per token against 20 us in passes of 64 on
this machine's CPU (its activations outgrow the caches), so the meta step
reads its examples in passes of about a training batch's size; it also
bounds the passes' activation memory."""

VAL_TASKS_PER_STEP = 64
"""Validation tasks read per meta step on pools with more tasks than this
(when ``policy.adapt.tasks_per_step`` is set; with it null every task is read
at every step). Pools of at most this many tasks, such as the 23-task
embedded default, read every task at every step."""


MIN_TASKS_PER_STEP = 4
"""The fewest tasks a meta step reads on a large pool when
``policy.adapt.signal_share`` cuts the sample: at least two of the highest
validation losses and two others, and four alignments to standardise."""


def signal_cut(cfg: AdaptConfig, interval_examples: Optional[int]) -> Optional[int]:
    """The most tasks a meta step on a large pool reads (for alignments, and
    for validation losses) so that its examples, ``examples_per_task +
    val_examples_per_task`` per task, are about ``signal_share`` of the
    ``interval_examples`` trained on between meta steps; at least
    ``MIN_TASKS_PER_STEP``. None: no cut (``signal_share`` null, or the
    interval unknown)."""
    if cfg.signal_share is None or not interval_examples:
        return None
    per_task = cfg.examples_per_task + cfg.val_examples_per_task
    return max(MIN_TASKS_PER_STEP, int(cfg.signal_share * interval_examples // per_task))


def meta_interval_examples(run, world: int) -> int:
    """Examples trained on between two meta steps of a run (``RunConfig``)
    on ``world`` workers: ``every_steps`` global batches."""
    world = max(1, world)
    return run.train.micro_batch_size * effective_grad_accum(run, world) * world * run.policy.adapt.every_steps


def tasks_per_meta_step(cfg: AdaptConfig, tasks: int, val_tasks: int, interval_examples: Optional[int],
                        val_bound: Optional[int] = VAL_TASKS_PER_STEP) -> tuple[int, Optional[int]]:
    """The tasks a meta step reads on a pool of ``tasks`` tasks, ``val_tasks``
    of them with validation data: (tasks whose alignment it refreshes, tasks
    whose validation loss it reads; None: every one with validation data).
    Every task on a pool of at most ``tasks_per_step`` (``val_bound`` for
    the validation losses); else samples of those sizes, cut to
    :func:`signal_cut` of the interval."""
    train = tasks if cfg.tasks_per_step is None else min(tasks, cfg.tasks_per_step)
    val = (None if cfg.tasks_per_step is None or val_bound is None or val_tasks <= val_bound
           else int(val_bound))
    cut = signal_cut(cfg, interval_examples)
    if cut is not None:
        train = min(train, cut) if train < tasks else train
        val = min(val, cut) if val is not None else None
    return train, val


def val_sample(val_ids: np.ndarray, estimate: np.ndarray, k: int, seed: int, step: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` tasks (of ``val_ids``) whose validation losses a meta step
    reads on a large pool, and each task's weight in the estimate of
    g_val = sum_j q_j grad L_j.

    The ``k // 2`` tasks with the highest last observed loss ``estimate``
    carry most of q = softmax(L/tau): they are read at every step, with
    weight 1, so g_val is exact on them and their estimates stay fresh. The
    other ``k - k // 2`` are a uniform sample without replacement of the
    remaining tasks, weighted by the inverse of their inclusion probability,
    so that the estimate of g_val is unbiased given q. Tasks never observed
    (NaN) enter through the uniform sample. The sample depends on the seed
    and the step only: the same on every rank, and again after a resume.
    """
    est = estimate[val_ids]
    seen = np.isfinite(est)
    k_top = min(k // 2, int(seen.sum()))
    top = val_ids[seen][np.argsort(-est[seen], kind="stable")[:k_top]]
    rest = np.setdiff1d(val_ids, top)
    rng = np.random.default_rng([seed, 98, step])
    rand = rng.choice(rest, size=min(len(rest), k - k_top), replace=False)
    weight = np.ones(len(estimate))
    if len(rand):
        weight[rand] = len(rest) / len(rand)
    return np.sort(np.concatenate([top, rand])), weight


class MetaSignals:
    def __init__(self, raw_model, cfg: AdaptConfig, pool, rank: int, world: int, seed: int, pad_id: int,
                 device, distributed: bool, val_tasks: Optional[int] = VAL_TASKS_PER_STEP,
                 interval_examples: Optional[int] = None):
        self.model, self.cfg, self.pool = raw_model, cfg, pool
        self.tasks = pool.tasks
        self.T = len(self.tasks)
        self.seed = seed
        self.rank, self.world, self.pad_id, self.device = rank, world, pad_id, device
        self.distributed = distributed
        self.params = select_params(raw_model, cfg.params)
        by_id = {id(p): n for n, p in raw_model.named_parameters()}
        self.param_names = [by_id[id(p)] for p in self.params]
        self.subset_modules = outermost_modules(raw_model, self.params)  # given zero tangents (_along_forward)
        self.forward_mode = True  # False once a model's forward turned out to have no forward-mode derivative
        # torch imports its forward-mode decompositions at the first dual
        # tensor (0.57 s here): done now, in the worker's setup, rather than
        # inside the first meta step.
        import torch._decomp.decompositions_for_jvp  # noqa: F401
        self.dim = sum(p.numel() for p in self.params)
        self.sketched = cfg.sketch_above is not None and self.dim > cfg.sketch_above
        self.sketch: Optional[CountSketch] = None  # redrawn at every meta step when sketched
        # Separate stream seeds: meta batches are not the training batches.
        self.val = [TaskStream(pool.shards("val", t), seed * 7919 + 1 + i, rank, world) if
                    pool.stats["val"][t]["examples"] else None for i, t in enumerate(self.tasks)]
        self.train = [TaskStream(pool.shards("train", t), seed * 7919 + 50021 + i, rank, world)
                      for i, t in enumerate(self.tasks)]
        # Small tasks' files read together now, not one file open per task
        # at its first meta step (at 1,000 tasks, about a sixth of the first
        # meta steps' time; see raymix.streams.preload_small).
        preload_small(self.train)
        preload_small([s for s in self.val if s is not None])
        self.rng = np.random.default_rng([seed, 99])  # same on every rank: same sampled tasks
        self.steps = 0
        self.val_ids = np.array([i for i, s in enumerate(self.val) if s is not None], dtype=np.int64)
        # Tasks whose alignment a step refreshes, and whose validation loss
        # it reads (None: every task with validation data at every step:
        # exact J and g_val). On a large pool both are samples, cut to the
        # interval's size (policy.adapt.signal_share): the signal then costs
        # a bounded share of the training however small the batch and
        # however many the tasks.
        self.train_tasks, self.val_tasks = tasks_per_meta_step(cfg, self.T, len(self.val_ids), interval_examples,
                                                               val_tasks)
        self.val_estimate = np.full(self.T, np.nan)  # last observed validation loss per task
        self.val_smoothed = np.full(self.T, np.nan)  # its moving average (policy.adapt.val_ema)
        # l_i: completion tokens per training example, for the token-share Jacobian.
        self.completion_per_example = pool.completion_per_example(default=1.0).tolist()

    def _all_reduce(self, tensor):
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def _flat_grad(self, loss, retain: bool):
        """The gradient on the parameter subset, flat, on the model's device
        (float32 at least; float64 for a float64 model), sketched when the
        subset is above ``sketch_above``."""
        import torch

        grads = torch.autograd.grad(loss, self.params, retain_graph=retain, allow_unused=True)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                          for g, p in zip(grads, self.params)])
        return self.sketch(flat) if self.sketch is not None else flat

    def _direction(self, g_val) -> list:
        """g_val as one tensor per parameter of the subset, in its dtype. When
        sketched, the direction is S^T S g_val: the derivative along it is
        <S g_val, S g_i>, the sketch's estimate of the alignment."""
        if self.sketch is not None:
            g_val = g_val[self.sketch.bucket.to(g_val.device)] * self.sketch.sign.to(g_val.device)
        out, at = [], 0
        for p in self.params:
            out.append(g_val[at:at + p.numel()].view_as(p).to(p.dtype))
            at += p.numel()
        return out

    def _along(self, groups: list, g_val):
        """Per group of examples (a task's), the derivative of their summed
        completion-token NLL along g_val on the parameter subset:
        <g_val, grad sum_e nll_e>, by forward-mode AD (torch's dual tensors)
        over all groups' examples at once, in batches of similar lengths.

        Why forward mode: the alignments need g_val's inner product with each
        task's gradient, not the gradients themselves. One forward pass with
        a tangent gives it for every example of every task, where reverse
        mode needs a backward (and a d-sized gradient) per task; layers
        before the subset carry no tangent and cost a plain forward.
        Attention runs on SDPA's math kernel here, which has forward-mode
        derivatives. A model whose forward has none (a custom attention
        kernel) falls back to one backward per group, with a warning."""
        import torch

        owner = torch.tensor([j for j, g in enumerate(groups) for _ in g], dtype=torch.long)
        examples = [e for g in groups for e in g]
        out = torch.zeros(len(groups), dtype=torch.float64)
        if not examples:
            return out
        if self.forward_mode:
            try:
                return out.index_add_(0, owner, self._along_forward(examples, g_val))
            except (NotImplementedError, RuntimeError) as e:
                if "forward" not in str(e).lower() and "jvp" not in str(e).lower():
                    raise
                warnings.warn(f"ADAPT: {type(self.model).__name__}'s forward has no forward-mode derivative "
                              f"({str(e).splitlines()[0]}); the alignments take one backward per task instead",
                              stacklevel=2)
                self.forward_mode = False
        direction = self._direction(g_val)
        for j, g in enumerate(groups):
            if g:
                nll, _ = token_nll(self.model, collate(g, self.pad_id), self.device)
                grads = torch.autograd.grad(nll.sum(), self.params, allow_unused=True)
                out[j] = sum(float(torch.sum(gr.double() * d.double())) for gr, d in zip(grads, direction)
                             if gr is not None)
        return out

    def _along_forward(self, examples: list, g_val):
        """Per example, <g_val, grad nll_e> by forward-mode AD (see :meth:`_along`).

        With torch's core forward AD (the subset's parameters made dual
        tensors), not ``torch.func.jvp``, under which every operation of the
        forward, the layers before the subset included, goes through
        functorch's interpreter. The same derivatives (to 1e-6 relative); on
        a 1,000-task pool's meta step (llama-micro, one thread, a rank's
        share of 2) the pass took 9.8-10.8 ms against 12.1-13.7 ms, the step
        22.5-24.3 ms against 25.4-27.5 ms (three runs each)."""
        import torch
        import torch.autograd.forward_ad as fwAD
        from torch.func import functional_call
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model = self.model

        class Substituted:  # the model with the subset's tensors given, called as token_nll calls a model
            def __init__(self, tensors: dict):
                self.tensors = tensors

            def get_output_embeddings(self):
                return model.get_output_embeddings()

            def __call__(self, **kwargs):
                return functional_call(model, self.tensors, (), kwargs)

        out = torch.zeros(len(examples), dtype=torch.float64)
        with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level(), torch.no_grad(), \
                zero_tangents_into(self.subset_modules):
            duals = Substituted({name: fwAD.make_dual(p.detach(), t) for name, p, t in
                                 zip(self.param_names, self.params, self._direction(g_val))})
            for idx, batch in self._passes(examples):
                nll, _ = token_nll(duals, batch, self.device)
                tangent = fwAD.unpack_dual(nll).tangent
                if tangent is None:  # no path from the subset to the loss: the derivative is 0
                    tangent = torch.zeros_like(nll)
                out[torch.from_numpy(idx)] = tangent.detach().double().cpu()
        return out

    def _passes(self, examples: list):
        """The examples in passes of ``META_BATCH`` of similar lengths (so a
        batch pads little): per pass, the examples' indices and their batch."""
        order = np.argsort([len(ids) for ids, _ in examples], kind="stable")
        for start in range(0, len(order), META_BATCH):
            idx = order[start:start + META_BATCH]
            yield idx, collate([examples[i] for i in idx], self.pad_id)

    def _share(self, n: int) -> int:
        """This rank's share of ``n`` examples per task (the shares sum to ``n``)."""
        return n // self.world + (1 if self.rank < n % self.world else 0)

    def _zero_grad(self):
        """What a rank with no example of a task contributes to the all-reduce."""
        import torch

        if self.sketch is not None:
            return torch.zeros(self.sketch.k, dtype=torch.float32, device=self.params[0].device)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        return torch.zeros(self.dim, dtype=dtype, device=self.params[0].device)

    def _val_sample(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """This step's validation tasks and weights (see :func:`val_sample`)."""
        if self.val_tasks is None:
            return self.val_ids, None
        return val_sample(self.val_ids, self.val_estimate, self.val_tasks, self.seed, self.steps)

    def compute(self, lookahead_lr: float) -> dict:
        """One meta step's signals, identical on every rank."""
        import torch

        cfg, T = self.cfg, self.T
        meta_tokens = np.zeros(T)
        if self.sketched:
            # A fresh hash at every step (the same on every rank): a sketch's
            # error is then independent from step to step, not a fixed bias
            # per task that the policy's averaging would keep.
            self.sketch = CountSketch(self.dim, cfg.sketch_dim,
                                      int(np.random.SeedSequence([self.seed, 17, self.steps]).generate_state(1)[0]),
                                      self.params[0].device)
        with gradients_only_on(self.model, self.params), contextlib.ExitStack() as cleanup:
            cleanup.callback(self.model.zero_grad, set_to_none=True)
            # 1. validation losses and the worst-case-weighted validation gradient
            val_tasks, weight = self._val_sample()
            examples, owner = [], []
            for i in val_tasks:
                stream = self.val[i]
                for _ in range(self._share(cfg.val_examples_per_task)):
                    examples.append(stream.next())
                    owner.append(int(i))
            # The tasks whose alignment this step refreshes, and their
            # training examples, drawn now (their own generator and streams:
            # the same draws as after the validation pass) so that their
            # completion-token counts share the validation sums' all-reduce.
            sampled = np.sort(self.rng.choice(T, size=self.train_tasks, replace=False))
            n_mine = self._share(cfg.examples_per_task)
            groups = [[self.train[i].next() for _ in range(n_mine)] for i in sampled]
            # In passes (see _passes); each pass's graph (on the parameter
            # subset only) is kept for the one backward below, once q is
            # known. nll, cnt and owner follow the passes' order.
            sums = torch.zeros(2, T, dtype=torch.float64)
            if examples:
                parts, order = [], []
                for idx, batch in self._passes(examples):
                    parts.append(token_nll(self.model, batch, self.device))
                    order.extend(idx.tolist())
                    np.add.at(meta_tokens, [owner[i] for i in idx], batch["attention_mask"].sum(1).numpy())
                owner = [owner[i] for i in order]
                nll = torch.cat([n for n, _ in parts])
                cnt = torch.cat([c for _, c in parts])
                owner_t = torch.tensor(owner, dtype=torch.long)
                sums[0].index_add_(0, owner_t, nll.detach().double().cpu())
                sums[1].index_add_(0, owner_t, cnt.double().cpu())
            # Completion tokens per sampled task as collate labels them (its
            # rule, not a copy of it), all-reduced with the sums: one
            # collective, not two.
            counts = torch.tensor([float((collate(g, self.pad_id)["labels"][:, 1:] != -100).sum()) if g else 0.0
                                   for g in groups], dtype=torch.float64)
            both = self._all_reduce(torch.cat([sums.reshape(-1), counts]))
            sums, counts = both[:2 * T].reshape(2, T), both[2 * T:]
            with np.errstate(invalid="ignore", divide="ignore"):
                val_loss = (sums[0] / sums[1]).numpy()
            observed = np.isfinite(val_loss)
            self.val_estimate[observed] = val_loss[observed]
            first = observed & ~np.isfinite(self.val_smoothed)
            again = observed & ~first
            self.val_smoothed[first] = val_loss[first]
            self.val_smoothed[again] = cfg.val_ema * self.val_smoothed[again] + (1 - cfg.val_ema) * val_loss[again]
            if weight is not None:
                val_loss = self.val_estimate.copy()  # unread tasks: their last observed loss
            # q from the smoothed losses: 16 examples per task read a loss
            # with a few per cent of noise, which softmax(L/tau) would amplify.
            has_val = np.isfinite(self.val_smoothed)
            _, q_obs = smooth_max(self.val_smoothed[has_val], cfg.tau)
            q = np.zeros(T)
            q[has_val] = q_obs
            w = q[owner] / sums[1].numpy()[owner]
            if weight is not None:
                w = w * weight[owner]
            if examples:
                per_example_w = torch.tensor(w, dtype=nll.dtype)
                g_val = self._flat_grad((nll * per_example_w.to(nll.device)).sum(), False)
            else:
                g_val = self._zero_grad()
            g_val = self._all_reduce(g_val)  # once: d numbers (sketch_dim when sketched)

            # 2. the alignments <g_val, g_i>, all tasks at once: each is the
            # derivative of task i's mean training loss along g_val, which
            # forward-mode AD gives per example in one batched pass (see
            # :meth:`_along`), instead of a backward and a d-sized gradient
            # per task. Each rank reads its share of a task's examples; the
            # loss is the mean over all ranks' completion tokens (counts
            # all-reduced first), so it is the same statistic on any number
            # of workers, and only T scalars leave the rank.
            alignment = np.full(T, np.nan)
            for i, g in zip(sampled, groups):
                meta_tokens[i] += sum(len(ids) for ids, _ in g)
            dots = self._along(groups, g_val) / counts.clamp(min=1.0)
            # The alignments and the step's tokens in one all-reduce.
            both = self._all_reduce(torch.cat([dots, torch.from_numpy(meta_tokens)]))
            alignment[sampled] = both[:len(sampled)].numpy()
            tokens = both[len(sampled):]
        self.steps += 1
        return {"val_loss": val_loss.tolist(), "val_smoothed": self.val_smoothed.tolist(),
                "alignment": alignment.tolist(),
                "meta_tokens": tokens.numpy().astype(np.int64).tolist(), "lookahead_lr": lookahead_lr,
                "completion_per_example": list(self.completion_per_example),
                "q": q.tolist(), "val_tasks_read": int(observed.sum()), "sketched": bool(self.sketched)}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same signals."""
        return {"rng": self.rng.bit_generator.state, "steps": self.steps,
                "val": [s.state_dict() if s is not None else None for s in self.val],
                "train": [s.state_dict() for s in self.train],
                "val_estimate": [None if not np.isfinite(v) else float(v) for v in self.val_estimate],
                "val_smoothed": [None if not np.isfinite(v) else float(v) for v in self.val_smoothed]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.steps = int(state["steps"])
        for s, st in zip(self.val, state["val"]):
            if s is not None and st is not None:
                s.load_state_dict(st)
        for s, st in zip(self.train, state["train"]):
            s.load_state_dict(st)
        if "val_estimate" in state:
            self.val_estimate = np.array([np.nan if v is None else v for v in state["val_estimate"]])
        if "val_smoothed" in state:
            self.val_smoothed = np.array([np.nan if v is None else v for v in state["val_smoothed"]])


class AdaptSignal(NoSignal):
    """The meta step as the training loop's worker-side signal: due every
    ``policy.adapt.every_steps`` steps after ``warmup_steps``, while budget
    remains; its signals go to :class:`raymix.policies.adapt.AdaptPolicy`."""

    def __init__(self, ctx: SignalContext):
        self.cfg = ctx.run.policy.adapt
        self.tasks = ctx.pool.tasks
        self.meta = MetaSignals(ctx.model, self.cfg, ctx.pool, ctx.rank, ctx.world, ctx.run.seed, ctx.pad_id,
                                ctx.device, ctx.distributed,
                                interval_examples=meta_interval_examples(ctx.run, ctx.world))

        self.meta_spent = 0  # tokens read for signals, over all ranks (the same on every rank)

    def due(self, view: StepView) -> bool:
        share = self.cfg.meta_share
        return (view.step >= self.cfg.warmup_steps and view.step % self.cfg.every_steps == 0
                and view.train_tokens < view.budget_tokens
                and (share is None or self.meta_spent <= share * view.train_tokens))

    def compute(self, view: StepView) -> Optional[dict]:
        # The look-ahead step length: the learning rate of the step just taken.
        signals = self.meta.compute(lookahead_lr=view.lr)
        self.meta_spent += int(np.sum(signals["meta_tokens"]))  # all-reduced: every rank adds the same
        return signals

    def state_dict(self) -> dict:
        return {"adapt_meta_spent": self.meta_spent}

    def load_state_dict(self, state: dict) -> None:
        self.meta_spent = int(state.get("adapt_meta_spent", 0))

    def metrics(self, signals: Optional[dict], weights: np.ndarray, timing: dict[str, float]) -> dict[str, float]:
        assert signals is not None
        vl = np.asarray(signals["val_loss"])
        m = {"meta/J": smooth_max(vl[np.isfinite(vl)], self.cfg.tau)[0], "meta/entropy": entropy(weights),
             "meta/step_seconds": timing["step_seconds"], "meta/time_share": timing["time_share"],
             "meta/tokens": float(np.sum(signals["meta_tokens"])), "mixture/kl_uniform": kl_uniform(weights)}
        z = standardise(np.asarray(signals["alignment"], dtype=np.float64))
        m["signal/{task}/val_loss"] = per_task(vl, "loss")
        m["signal/{task}/alignment"] = per_task(signals["alignment"], "score")
        m["signal/{task}/z"] = per_task(z, "score")  # the normalised alignment the policy reads (when refreshed)
        m["mixture/{task}"] = per_task(weights, "weight")
        return m

    def rank_state_dict(self) -> dict:
        return {"meta": self.meta.state_dict()}

    def load_rank_state_dict(self, state: dict) -> None:
        if "meta" in state:
            self.meta.load_state_dict(state["meta"])
