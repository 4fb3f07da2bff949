"""Checkpoints: the state file and its manifest, where they are written, and
the :class:`Checkpointer` that saves and restores a run over its parts.

Format 2: one ``torch.save``d dict. Its top-level keys are the parts' shared
state (the progress counters, the global data positions, the mixture and the
mixer actor's state, the curve, the signal's state, the model and optimizer);
``ranks`` holds each rank's own state (torch's generator, a signal's own
example streams). A part owns its keys: adding a part cannot forget to save
it, and two parts cannot write one key.

A checkpoint resumes on another worker count: everything that decides which
examples are trained on is shared, and the per-rank entries (which only
decide which examples a signal reads, and dropout) start afresh, with a
message. Format 1 kept the training data positions per rank.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Optional

from raymix.loop.contract import RESULT_FILE, LoopResult

CHECKPOINT_FORMAT = 2
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
        raise RuntimeError(f"checkpoint {directory} has format {manifest['format']}, this raymix reads "
                           f"{CHECKPOINT_FORMAT} (format 1 kept data positions per worker): finish that run "
                           "with the raymix that wrote it, or start it again without --resume")
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

    session.stop_if_orphaned()  # nothing is written by a worker whose raylet is gone
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


def latest_local_checkpoint(local_dir: str) -> str | None:
    """The newest complete checkpoint under ``local_dir`` (local mode)."""
    if not os.path.isdir(local_dir):
        return None
    done = [d for d in os.listdir(local_dir) if not d.endswith(".tmp") and (
        os.path.exists(os.path.join(local_dir, d, MANIFEST_FILE))
        or os.path.exists(os.path.join(local_dir, d, RESULT_FILE)))]
    if "final" in done:
        return os.path.join(local_dir, "final")
    return os.path.join(local_dir, max(done)) if done else None


class Checkpointer:
    """Saves every ``train.checkpoint_tokens`` train tokens and on demand,
    restores at start-up. ``parts`` are objects with ``state_dict()`` and
    ``load_state_dict(state)`` over top-level keys of the checkpoint, and
    optionally ``rank_state_dict()`` and ``load_rank_state_dict(state)`` over
    their rank's own entry in ``ranks``."""

    def __init__(self, w, session, exchange, metrics_log, parts: list[Any]):
        cfg = w.cfg
        self.w, self.session, self.exchange, self.metrics_log = w, session, exchange, metrics_log
        self.parts = [self, *parts]
        self.every = cfg.train.checkpoint_tokens or int(cfg.train.checkpoint_fraction * w.budget)
        self.next_ckpt: Optional[int] = self.every if self.every > 0 else None
        self.keep = cfg.train.checkpoints_to_keep
        self.seconds = 0.0

    # -- its own part -------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_ckpt": self.next_ckpt}

    def load_state_dict(self, state: dict) -> None:
        self.next_ckpt = state["next_ckpt"]

    def due(self, train_tokens: int) -> bool:
        """A periodic checkpoint is due (never at the end: the final one is the model)."""
        if self.next_ckpt is None or train_tokens < self.next_ckpt or train_tokens >= self.w.budget:
            return False
        while self.next_ckpt <= train_tokens:
            self.next_ckpt += self.every
        return True

    # -- saving -------------------------------------------------------------
    def capture(self, reason: str) -> dict:
        """Every part's state; the per-rank parts gathered from every rank
        (a collective: it runs on all of them)."""
        w = self.w
        mine: dict = {}
        state: dict = {"format": CHECKPOINT_FORMAT, "reason": reason, "world": w.world, "budget": w.budget}
        for part in self.parts:
            if hasattr(part, "rank_state_dict"):
                _merge(mine, part.rank_state_dict(), part)
            _merge(state, part.state_dict(), part)
        ranks: list = [None] * w.world
        if w.distributed:
            import torch.distributed as dist

            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        state["ranks"] = ranks
        return state

    def save(self, reason: str, metrics: dict) -> None:
        t = time.perf_counter()
        try:
            self._save(reason, metrics)
        finally:
            self.seconds += time.perf_counter() - t

    def _save(self, reason: str, metrics: dict) -> None:
        w = self.w
        self.session.stop_if_orphaned()  # before the metrics commit, too
        state = self.capture(reason)
        model_state, optimizer_state = w.model_and_optimizer_state()
        if w.rank != 0:
            self.session.report(metrics, None)
            return
        # Every counted token reaches the ledger first: the mixer state in
        # the checkpoint then matches the workers' state exactly.
        state["mixer"] = self.exchange.snapshot()
        state["model"] = model_state
        state["optimizer"] = optimizer_state
        if self.metrics_log is not None:
            # Written before the checkpoint that covers them is reported, not
            # after: a worker lost between the report and a later commit
            # would restart from this checkpoint with their steps never
            # written. Written first, a loss before Ray registers the
            # checkpoint retrains them, and the logger's run tag keeps the
            # retrained steps from being written twice.
            self.metrics_log.commit(state["step"])
        report_checkpoint(self.session, {**metrics, "checkpoint_reason": reason}, lambda d: write_state(d, state),
                          w.local_checkpoint_dir, f"{state['step']:08d}-{reason}", self.keep)
        print(f"[raymix] checkpoint ({reason}) at {state['train_tokens']} train tokens, step {state['step']}",
              flush=True)

    # -- restoring ----------------------------------------------------------
    def restore(self) -> bool:
        """Load the session's checkpoint into the model, the optimizer and
        every part. Returns False when the run had already finished (its final
        checkpoint is reported again and the loop must not run)."""
        w = self.w
        d = self.session.checkpoint_dir()
        if d is None:
            return True
        if os.path.exists(os.path.join(d, RESULT_FILE)):
            # The run had finished when it failed: its final checkpoint stands.
            done = LoopResult.read(d)
            keys = ("train_tokens", "steps", "loop_seconds", "tokens_per_second")
            self.session.report({k: getattr(done, k) for k in keys}, d if w.rank == 0 else None)
            return False
        restored = read_state(d)
        resized = restored["world"] != w.world
        if resized and w.rank == 0:
            print(f"[raymix] the checkpoint was written by {restored['world']} workers, this run has {w.world}: "
                  "the data positions, model, optimizer, mixer and signal state carry over; each worker's "
                  "own generators and signal example streams start afresh", flush=True)
        w.load_model_and_optimizer(restored["model"], restored["optimizer"])
        for part in self.parts:
            if hasattr(part, "load_rank_state_dict") and not resized:
                part.load_rank_state_dict(restored["ranks"][w.rank])
            part.load_state_dict(restored)
        return True


def _merge(into: dict, new: dict, part: Any) -> None:
    clash = set(into) & set(new)
    if clash:
        raise RuntimeError(f"checkpoint keys {sorted(clash)} of {type(part).__name__} are already taken")
    into.update(new)
