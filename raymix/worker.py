"""The training worker: budgeted SFT inside a Ray Train ``TorchTrainer``.

Every worker samples each example's task from the current mixture, trains
with the loss on completion tokens only, and all-reduces per-task token and
loss counts after each optimizer step, so all ranks agree on ``train_tokens``
and stop at the same step. Rank 0 alone talks to the mixer actor (every
``train.sync_every`` steps, without waiting on the reply until the next
interval) and to MLflow, and evaluates the final model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

import numpy as np

from raymix.config import RunConfig, effective_grad_accum, from_dict


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


CHECKPOINT_FORMAT = 1
STATE_FILE = "raymix_state.pt"
MANIFEST_FILE = "raymix_manifest.json"


def write_state(directory: str, state: dict) -> None:
    """Write the training state and, last, a manifest with its size and
    SHA-256: a checkpoint without a matching manifest is refused on load."""
    import hashlib

    import torch

    path = os.path.join(directory, STATE_FILE)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    manifest = {"format": CHECKPOINT_FORMAT, "file": STATE_FILE, "bytes": os.path.getsize(path),
                "sha256": digest, "train_tokens": state["train_tokens"], "step": state["step"],
                "reason": state["reason"]}
    with open(os.path.join(directory, MANIFEST_FILE + ".tmp"), "w") as f:
        json.dump(manifest, f)
    os.replace(os.path.join(directory, MANIFEST_FILE + ".tmp"), os.path.join(directory, MANIFEST_FILE))


def read_state(directory: str) -> dict:
    import hashlib

    import torch

    mpath, path = os.path.join(directory, MANIFEST_FILE), os.path.join(directory, STATE_FILE)
    if not os.path.exists(mpath) or not os.path.exists(path):
        raise RuntimeError(f"checkpoint {directory} is incomplete (no {MANIFEST_FILE} or {STATE_FILE})")
    manifest = json.loads(open(mpath).read())
    data = open(path, "rb").read()
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise RuntimeError(f"checkpoint {directory}: {STATE_FILE} does not match its manifest (corrupt)")
    if manifest["format"] != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {directory} has format {manifest['format']}, expected {CHECKPOINT_FORMAT}")
    # Written by this code (model, optimizer and RNG states): not untrusted input.
    return torch.load(path, weights_only=False)


def report_checkpoint(session, metrics: dict, write, local_dir: str | None, name: str,
                      keep: int | None) -> None:
    """Write a checkpoint with ``write(folder)`` and report it.

    Normally into a temporary folder that Ray Train copies into its storage.
    In-process runs (no workers) keep the folder where it is, so it goes to
    ``local_dir/<name>``: written as ``<name>.tmp`` and renamed once complete
    (never picked up half-written); periodic ones beyond ``keep`` are pruned."""
    import shutil

    if not local_dir:
        with tempfile.TemporaryDirectory() as tmp:
            write(tmp)
            session.report(metrics, tmp)
        return
    os.makedirs(local_dir, exist_ok=True)
    final = os.path.join(local_dir, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    session.report(metrics, final)
    if keep is not None:
        periodic = sorted(d for d in os.listdir(local_dir) if d.endswith("-periodic"))
        for d in periodic[:-keep]:
            shutil.rmtree(os.path.join(local_dir, d), ignore_errors=True)


class RayTrainSession:
    """The training function's view of Ray Train inside a ``TorchTrainer`` worker."""

    def context(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model, parallelism: str = "ddp"):
        import ray.train.torch

        if parallelism == "fsdp":
            from raymix.fsdp import shard_model

            return shard_model(model, self.device())
        return ray.train.torch.prepare_model(model)

    def checkpoint_dir(self) -> str | None:
        """A local folder holding the checkpoint to restore, or None."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else ckpt.to_directory()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)


class InProcessSession:
    """The same view for a run in the calling process (``runtime.num_workers=0``).

    Ray Train's own local mode cannot serve here: its ``ray.train`` calls
    raise inside a Ray Tune trial, where sweeps run. One rank, no process
    group; checkpoints live in the run's ``checkpoints/`` folder."""

    def __init__(self, use_gpu: bool, local_dir: str):
        self.use_gpu, self.local_dir = use_gpu, local_dir
        self.reports: list[tuple[dict, str | None]] = []

    def context(self) -> tuple[int, int]:
        return 0, 1

    def device(self):
        import torch

        return torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model, parallelism: str = "ddp"):
        # One rank: nothing to shard (config refuses fsdp with num_workers=0).
        return model.to(self.device())

    def checkpoint_dir(self) -> str | None:
        return latest_local_checkpoint(self.local_dir)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append((dict(metrics), checkpoint_dir))


def latest_local_checkpoint(local_dir: str) -> str | None:
    """The newest complete checkpoint under ``local_dir`` (local mode)."""
    if not os.path.isdir(local_dir):
        return None
    done = [d for d in os.listdir(local_dir) if not d.endswith(".tmp") and (
        os.path.exists(os.path.join(local_dir, d, MANIFEST_FILE))
        or os.path.exists(os.path.join(local_dir, d, "raymix_eval.json")))]
    if "final" in done:
        return os.path.join(local_dir, "final")
    return os.path.join(local_dir, max(done)) if done else None


class ProgressFile:
    """``OUTPUT/progress/rank<R>.json``: pid, step and tokens of each worker,
    rewritten atomically every ``train.log_every`` steps, for operators (and
    tests) that need to find a worker process or follow a run without MLflow."""

    def __init__(self, output_dir: str | None, rank: int):
        self.path = None
        if output_dir:
            os.makedirs(os.path.join(output_dir, "progress"), exist_ok=True)
            self.path = os.path.join(output_dir, "progress", f"rank{rank}.json")
        self.rank = rank

    def write(self, **fields) -> None:
        if self.path is None:
            return
        with open(self.path + ".tmp", "w") as f:
            json.dump({"rank": self.rank, "pid": os.getpid(), "updated_at": time.time(), **fields}, f)
        os.replace(self.path + ".tmp", self.path)


def gradex_metrics(report: dict | None) -> dict:
    """``gradex/*`` MLflow metrics of a GradEx report (``raymix.gradex_step``)."""
    if not report:
        return {}
    m = {"gradex/train_tokens_at_estimation": report["train_tokens_at_estimation"],
         "gradex/num_selected": len(report["selected"]), "gradex/base_loss": report["base_loss"],
         "gradex/gradient_seconds": report["gradient_seconds"],
         "gradex/estimate_seconds": report["estimate_seconds"], "gradex/seconds": report["seconds"],
         "gradex/meta_tokens": report["meta_tokens"]}
    for key in ("relative_error", "max_relative_error", "change_relative_error", "spearman", "speedup",
                "speedup_with_gradients", "finetune_seconds_per_subset", "estimate_seconds_per_subset"):
        if report.get("verification") and report["verification"].get(key) is not None:
            m[f"gradex/{key}"] = report["verification"][key]
    for t, s in report["scores"].items():
        if s is not None:
            m[f"gradex/score/{t}"] = s
    return m


def train_loop(loop_cfg: dict, session=None) -> None:
    """The training function: a Ray Train worker's (``session`` None) or, with
    an :class:`InProcessSession`, the calling process's."""
    import ray
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from raymix.data import PreparedPool
    from raymix.evaluate import exact_match, token_nll, validation_losses
    from raymix.mixer import MIXER_NAMESPACE
    from raymix.models import load_tokenizer
    from raymix.policies import policy_needs_meta
    from raymix.streams import TaskStream, collate
    from raymix.tracking import MetricLogger

    t_enter = time.time()  # wall clock: compared with the driver's, to time worker start-up
    cfg: RunConfig = from_dict(RunConfig, loop_cfg["run"])
    pool = PreparedPool(**loop_cfg["pool"])
    budget = int(loop_cfg["budget_tokens"])
    session = session or RayTrainSession()
    rank, world = session.context()
    torch.set_num_threads(cfg.runtime.torch_threads)
    device = session.device()
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    tokenizer = load_tokenizer(loop_cfg["tokenizer_dir"])
    pad_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(loop_cfg["init_model_dir"], dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = session.prepare_model(model, cfg.runtime.parallelism)
    # FSDP2 shards in place (no wrapper): the model is its own raw model.
    raw_model = model.module if hasattr(model, "module") else model
    fsdp = cfg.runtime.parallelism == "fsdp"  # config refuses it without workers (a process group)
    decay, no_decay = [], []
    for name, p in raw_model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr,
        betas=cfg.train.betas,
    )
    schedule = TokenCosineSchedule(cfg.train.lr, cfg.train.warmup_fraction, cfg.train.min_lr_ratio)
    use_amp = device.type == "cuda"

    tasks = pool.tasks
    T = len(tasks)
    streams = [
        TaskStream(pool.shard_dir("train", t), seed=cfg.seed * 100003 + i, rank=rank, world=world)
        for i, t in enumerate(tasks)
    ]
    rng = np.random.default_rng([cfg.seed, rank, 7])

    mixer = None
    if rank == 0:
        from raymix.mixer import MixerClient

        mixer = MixerClient(ray.get_actor(loop_cfg["mixer_name"], namespace=MIXER_NAMESPACE), T)
    metrics_log = None
    if rank == 0 and loop_cfg.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        metrics_log = MetricLogger(MlflowClient(loop_cfg["mlflow_tracking_uri"]), loop_cfg["mlflow_run_id"])

    def broadcast_mixture(mix: dict | None) -> tuple[int, np.ndarray]:
        buf = torch.zeros(T + 1, dtype=torch.float64)
        if rank == 0:
            buf[0] = mix["version"]
            buf[1:] = torch.tensor(mix["weights"], dtype=torch.float64)
        if distributed:
            dist.broadcast(buf, src=0)
        w = buf[1:].numpy().clip(0)
        return int(buf[0]), w / w.sum()

    # In-process runs (no workers) keep their checkpoints in OUTPUT/checkpoints,
    # written atomically (a renamed folder).
    local_dir = loop_cfg.get("local_checkpoint_dir")
    keep = cfg.train.checkpoints_to_keep
    mbs, accum = cfg.train.micro_batch_size, effective_grad_accum(cfg)
    train_tokens = 0
    step = 0
    ckpt_every = cfg.train.checkpoint_tokens or int(cfg.train.checkpoint_fraction * budget)
    next_ckpt = ckpt_every if ckpt_every > 0 else None
    restores = 0
    sync_tokens = np.zeros(T)
    sync_loss = np.zeros((2, T))
    log_loss = np.zeros((2, T))
    log_tokens_start, log_time_start = 0, time.perf_counter()
    pending = None
    meta = None
    meta_seconds, meta_steps = 0.0, 0
    if policy_needs_meta(cfg.policy.name):
        from raymix.meta import MetaSignals

        meta = MetaSignals(raw_model, cfg.policy.adapt, pool, rank, world, cfg.seed, pad_id, device, distributed)
    # GradEx: rank 0 estimates, scores and selects once, when the meta
    # initialisation's share of the budget is spent (raymix.gradex_step).
    gradex = None
    gradex_at = None
    gradex_done, gradex_report = False, None
    if cfg.policy.name == "gradex":
        gradex_at = int(math.ceil(cfg.policy.gradex.meta_share * budget))
        if rank == 0:
            from raymix.gradex_step import GradexStep

            gradex = GradexStep(raw_model, cfg.policy.gradex, pool, pad_id, device, cfg.seed)
    curve = None
    if cfg.eval.curve_points > 0:
        from raymix.evaluate import CurveEvaluator

        curve = CurveEvaluator(pool, cfg.eval.curve_examples_per_task, rank, world, pad_id,
                               cfg.eval.batch_size, device, lockstep=fsdp)
    next_curve = 1
    curve_seconds = 0.0
    curve_log: list = []

    # -- checkpoints ------------------------------------------------------------
    def capture(reason: str) -> dict:
        """Everything needed to continue exactly: per-rank parts gathered on
        every rank (the collective runs on all of them), the rest from rank 0."""
        mine = {"rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "streams": [s.state_dict() for s in streams]}
        if meta is not None:
            mine["meta"] = meta.state_dict()
        ranks = [None] * world
        if distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {"format": CHECKPOINT_FORMAT, "reason": reason, "world": world, "budget": budget,
                "step": step, "train_tokens": train_tokens, "next_curve": next_curve,
                "next_ckpt": next_ckpt, "curve_log": list(curve_log), "version": version,
                "weights": weights.tolist(), "meta_seconds": meta_seconds, "meta_steps": meta_steps,
                "restores": restores, "ranks": ranks, "gradex_done": gradex_done, "gradex_report": gradex_report}

    checkpoint_seconds = 0.0

    def save_checkpoint(reason: str, metrics: dict) -> None:
        nonlocal checkpoint_seconds
        t_ck = time.perf_counter()
        try:
            _save_checkpoint(reason, metrics)
        finally:
            checkpoint_seconds += time.perf_counter() - t_ck

    def _save_checkpoint(reason: str, metrics: dict) -> None:
        nonlocal pending, sync_tokens, sync_loss
        state = capture(reason)
        if fsdp:
            from raymix.fsdp import full_model_state, full_optimizer_state

            # Collectives (every rank gathers its shards to rank 0): before
            # the other ranks leave below. The same format as under DDP.
            model_state, optimizer_state = full_model_state(model), full_optimizer_state(model, opt, rank)
        elif rank == 0:
            model_state, optimizer_state = raw_model.state_dict(), opt.state_dict()
        if metrics_log is not None:
            metrics_log.flush()  # the metrics up to a checkpoint are stored before it is
        if rank != 0:
            session.report(metrics, None)
            return
        # Flush every counted token to the ledger first: the mixer state in
        # the checkpoint then matches the workers' state exactly.
        if pending is not None:
            mixer.get(pending)
            pending = None
        mixer.get(mixer.report(sync_tokens.astype(np.int64).tolist(), sync_loss[0].tolist(),
                               sync_loss[1].tolist()))
        sync_tokens[:] = 0
        sync_loss[:] = 0
        state["mixer"] = mixer.snapshot()
        state["model"] = model_state
        state["optimizer"] = optimizer_state
        report_checkpoint(session, {**metrics, "checkpoint_reason": reason}, lambda d: write_state(d, state),
                          local_dir, f"{step:08d}-{reason}", keep)
        print(f"[raymix] checkpoint ({reason}) at {train_tokens} train tokens, step {step}", flush=True)

    def all_reduce(t):
        if distributed:
            dist.all_reduce(t)
        return t

    def curve_point() -> None:
        nonlocal curve_seconds
        t_c = time.perf_counter()
        vl, toks = curve(raw_model, all_reduce)
        curve_seconds += time.perf_counter() - t_c
        finite = vl[np.isfinite(vl)]
        point = {"train_tokens": train_tokens, "worst_val_loss": float(finite.max()),
                 "mean_val_loss": float(finite.mean())}
        curve_log.append(point)
        if rank == 0:
            # Evaluation tokens are meta tokens: spent, but not on updates.
            mixer.report([0] * T, None, None, toks.astype(np.int64).tolist())
            if metrics_log is not None:
                m = {"curve/worst_val_loss": point["worst_val_loss"], "curve/mean_val_loss": point["mean_val_loss"],
                     "curve/train_tokens": train_tokens}
                m.update({f"curve/{t}/val_loss": float(vl[i]) for i, t in enumerate(tasks)})
                metrics_log.log(m, step)

    restored = None
    d = session.checkpoint_dir()
    if d is not None:
        if os.path.exists(os.path.join(d, "raymix_eval.json")):
            # The run had finished when it failed: its final checkpoint stands.
            final = json.loads(open(os.path.join(d, "raymix_eval.json")).read())
            keys = ("train_tokens", "steps", "loop_seconds", "tokens_per_second")
            session.report({k: final[k] for k in keys}, d if rank == 0 else None)
            return
        restored = read_state(d)
    if restored is not None:
        if restored["world"] != world:
            raise RuntimeError(f"the checkpoint was written by {restored['world']} workers, this run has "
                               f"{world}: resume with runtime.num_workers={restored['world']}")
        if fsdp:
            from raymix.fsdp import load_full_state

            # Every rank read the whole checkpoint and keeps its own shard.
            load_full_state(model, opt, restored["model"], restored["optimizer"])
        else:
            raw_model.load_state_dict(restored["model"])
            opt.load_state_dict(restored["optimizer"])
        mine = restored["ranks"][rank]
        rng.bit_generator.state = mine["rng"]
        torch.set_rng_state(mine["torch_rng"])
        for s_, st in zip(streams, mine["streams"]):
            s_.load_state_dict(st)
        if meta is not None and "meta" in mine:
            meta.load_state_dict(mine["meta"])
        step, train_tokens = restored["step"], restored["train_tokens"]
        next_curve, next_ckpt = restored["next_curve"], restored["next_ckpt"]
        curve_log = list(restored["curve_log"])
        meta_seconds, meta_steps = restored["meta_seconds"], restored["meta_steps"]
        restores = restored["restores"] + 1
        gradex_done, gradex_report = restored.get("gradex_done", False), restored.get("gradex_report")
        if rank == 0:
            mixer.restore(restored["mixer"])
        version, weights = broadcast_mixture({"version": restored["version"], "weights": restored["weights"]})
        if rank == 0:
            print(f"[raymix] restored from checkpoint at {train_tokens} train tokens, step {step} "
                  f"(restore {restores})", flush=True)
        del restored
    else:
        # No checkpoint: training starts from the first token, and so must the
        # mixer (a restart after a failure before the first registered
        # checkpoint would otherwise count the lost attempt's tokens twice).
        version, weights = broadcast_mixture(mixer.reset() if rank == 0 else None)
    if rank == 0:
        mixer.applied(version, train_tokens, weights.tolist())
    progress = ProgressFile(loop_cfg.get("output_dir"), rank)

    t_loop = time.perf_counter()
    t_enter_perf = t_loop - (time.time() - t_enter)
    model.train()
    if curve is not None and step == 0:
        curve_point()  # the starting point of the curve
    aborted = None
    scores_only_stop = False
    while train_tokens < budget:
        lr = schedule(train_tokens / budget)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = []
        for _ in range(accum):
            idx = rng.choice(T, size=mbs, p=weights)
            micro.append((idx, collate([streams[i].next() for i in idx], pad_id)))
        n_completion = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in micro)
        step_stats = np.zeros((3, T))  # tokens, loss sum, loss count per task
        for k, (idx, batch) in enumerate(micro):
            if fsdp:
                # FSDP2's no_sync: gradients stay unsharded and accumulate
                # locally until the last micro-batch reduce-scatters them.
                model.set_requires_gradient_sync(k == accum - 1)
                sync_ctx = contextlib.nullcontext()
            else:
                sync_ctx = model.no_sync() if (distributed and k < accum - 1) else contextlib.nullcontext()
            with sync_ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                nll, cnt = token_nll(model, batch, device)
                loss = nll.sum() / max(1, n_completion)
                loss.backward()
            lengths = batch["attention_mask"].sum(dim=1).numpy()
            np.add.at(step_stats[0], idx, lengths)
            np.add.at(step_stats[1], idx, nll.detach().float().cpu().numpy())
            np.add.at(step_stats[2], idx, cnt.cpu().numpy())
        stats = torch.from_numpy(step_stats)
        if distributed:
            dist.all_reduce(stats)
        stats_np = stats.numpy()
        step_loss = stats_np[1].sum() / max(1.0, stats_np[2].sum())
        if not math.isfinite(step_loss):
            # Every rank sees the same reduced loss and stops here, before
            # the update: the parameters are still the last good ones.
            opt.zero_grad(set_to_none=True)
            aborted = (f"training loss became {step_loss} at step {step + 1} ({train_tokens} train tokens "
                       f"of {budget}); lower train.lr or check the data")
            break
        if cfg.train.grad_clip > 0:
            # Under FSDP the gradients are DTensor shards: clip_grad_norm_
            # reduces the norm over the workers, so every rank clips alike.
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_tokens += int(stats_np[0].sum())
        sync_tokens += stats_np[0]
        sync_loss += stats_np[1:]
        log_loss += stats_np[1:]

        is_meta = (meta is not None and step >= cfg.policy.adapt.warmup_steps
                   and step % cfg.policy.adapt.every_steps == 0 and train_tokens < budget)
        # Every rank sees the same all-reduced train_tokens: all agree on the switch.
        is_gradex = gradex_at is not None and not gradex_done and train_tokens >= gradex_at
        if is_meta or is_gradex or (step % cfg.train.sync_every == 0 and train_tokens < budget):
            current = {"version": version, "weights": weights.tolist()}
            signals = None
            if is_meta:
                t_meta = time.perf_counter()
                signals = meta.compute(lookahead_lr=lr)
                meta_seconds += time.perf_counter() - t_meta
                meta_steps += 1
            if is_gradex:
                # Rank 0 alone computes; the others wait at the mixture broadcast below.
                gradex_done = True
                t_meta = time.perf_counter()
                if rank == 0:
                    signals = gradex.run(train_tokens)
                    gradex_report = signals.pop("report")
                    print(f"[raymix] gradex: estimated {gradex_report['num_subsets']} subsets at {train_tokens} "
                          f"train tokens; selected {len(gradex_report['selected'])} of {T} tasks", flush=True)
                meta_seconds += time.perf_counter() - t_meta
                meta_steps += 1
            if rank == 0:
                # The reply to the previous report was sent one interval ago
                # and is ready; this interval's report is collected at the next
                # sync, except after a meta step, whose new mixture applies now.
                current = mixer.get(pending) if pending is not None else current
                pending = mixer.report(
                    sync_tokens.astype(np.int64).tolist(), sync_loss[0].tolist(), sync_loss[1].tolist(),
                    signals["meta_tokens"] if signals else None, signals,
                )
                if signals is not None:
                    current, pending = mixer.get(pending), None
            sync_tokens[:] = 0
            sync_loss[:] = 0
            new_version, new_weights = broadcast_mixture(current)
            if new_version != version:
                version, weights = new_version, new_weights
                if rank == 0:
                    mixer.applied(version, train_tokens, weights.tolist())
            if rank == 0 and metrics_log is not None and is_gradex:
                metrics_log.log(gradex_metrics(gradex_report), step)
            if rank == 0 and metrics_log is not None and is_meta:
                from raymix.policies.adapt import entropy, smooth_max

                vl = np.asarray(signals["val_loss"])
                m = {"meta/J": smooth_max(vl[np.isfinite(vl)], cfg.policy.adapt.tau)[0],
                     "meta/entropy": entropy(weights), "meta/step_seconds": time.perf_counter() - t_meta,
                     "meta/time_share": meta_seconds / max(1e-9, time.perf_counter() - t_loop),
                     "meta/tokens": float(np.sum(signals["meta_tokens"]))}
                for i, t in enumerate(tasks):
                    m[f"signal/{t}/val_loss"] = float(vl[i])
                    m[f"signal/{t}/alignment"] = float(signals["alignment"][i])
                    m[f"mixture/{t}"] = float(weights[i])
                metrics_log.log(m, step)

        if is_gradex and cfg.policy.gradex.scores_only:
            scores_only_stop = True  # the scores were all that was asked for
            break

        if curve is not None and train_tokens >= next_curve * budget / cfg.eval.curve_points:
            while train_tokens >= next_curve * budget / cfg.eval.curve_points:
                next_curve += 1
            curve_point()

        if rank == 0 and metrics_log is not None and (step % cfg.train.log_every == 0 or train_tokens >= budget):
            now = time.perf_counter()
            metrics = {
                "train/loss": step_loss,
                "train/lr": lr,
                "train/tokens": train_tokens,
                "train/tokens_per_second": (train_tokens - log_tokens_start) / max(1e-9, now - log_time_start),
                "train/budget_progress": train_tokens / budget,
            }
            for i, t in enumerate(tasks):
                metrics[f"mixture/{t}"] = float(weights[i])
                if log_loss[1, i] > 0:
                    metrics[f"loss/{t}"] = log_loss[0, i] / log_loss[1, i]
            metrics_log.log(metrics, step)
            log_loss[:] = 0
            log_tokens_start, log_time_start = train_tokens, now
        if step % cfg.train.log_every == 0:
            progress.write(step=step, train_tokens=train_tokens, budget=budget, restores=restores,
                           mixer_pid=mixer.pid if mixer is not None else None,
                           mixer_restarts=mixer.restarts if mixer is not None else None)
        if next_ckpt is not None and train_tokens >= next_ckpt and train_tokens < budget:
            while next_ckpt <= train_tokens:
                next_ckpt += ckpt_every
            save_checkpoint("periodic", {"train_tokens": train_tokens, "steps": step})
    if aborted is not None:
        # Non-finite loss: keep the last good state as the run's checkpoint
        # and stop cleanly (an exception would make Ray Train retry the
        # same divergence ``max_failures`` times).
        save_checkpoint("aborted", {"train_tokens": train_tokens, "steps": step, "aborted": aborted})
        return
    # Curve evaluations and checkpoints are not training: their time is reported apart.
    loop_seconds = time.perf_counter() - t_loop - curve_seconds - checkpoint_seconds

    # Final flush: every token counted by the workers reaches the ledger,
    # every logged metric the store.
    mixer_summary = None
    if metrics_log is not None:
        metrics_log.flush()
    if rank == 0:
        if pending is not None:
            mixer.get(pending)
        mixer.get(mixer.report(sync_tokens.astype(np.int64).tolist(), sync_loss[0].tolist(), sync_loss[1].tolist()))
        mixer_summary = mixer.call("summary")

    metrics = {"train_tokens": train_tokens, "steps": step, "loop_seconds": loop_seconds,
               "worker_entered_at": t_enter, "worker_setup_seconds": t_loop - t_enter_perf,
               "tokens_per_second": train_tokens / max(1e-9, loop_seconds),
               "meta_seconds": meta_seconds, "meta_steps": meta_steps, "curve_seconds": curve_seconds,
               "restores": restores, "checkpoint_seconds": checkpoint_seconds}
    if gradex_at is not None:
        metrics["gradex"] = gradex_report
        metrics["gradex_scores_only"] = scores_only_stop
    final_model = raw_model
    if fsdp:
        from raymix.fsdp import full_model_state

        # Rank 0 alone evaluates and saves: with sharded parameters each of
        # its forwards would wait on the other ranks, so it rebuilds the
        # unsharded model from the gathered state (a collective) instead.
        full = full_model_state(model)
        if rank == 0:
            final_model = AutoModelForCausalLM.from_pretrained(loop_cfg["init_model_dir"], dtype=torch.float32)
            final_model.load_state_dict(full)
            final_model.to(device)
        del full
    if rank == 0:
        t_eval = time.perf_counter()
        val = validation_losses(final_model, pool, pad_id, cfg.eval.batch_size, device)
        em = exact_match(final_model, tokenizer, pool, cfg.eval.max_test_examples, cfg.eval.max_new_tokens,
                         cfg.eval.batch_size, device)
        metrics["eval_seconds"] = time.perf_counter() - t_eval
        def write_final(d: str) -> None:
            final_model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            metrics["reported_at"] = time.time()  # after saving the model, before persisting
            with open(os.path.join(d, "raymix_eval.json"), "w") as f:
                json.dump({"val_loss": val, "test_exact_match": em, "curve": curve_log, "mixer": mixer_summary,
                           "mixer_restarts": mixer.restarts, **metrics}, f)

        report_checkpoint(session, metrics, write_final, local_dir, "final", None)
    else:
        session.report(metrics, None)
