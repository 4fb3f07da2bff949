"""The workers' side of the mixer: the mixture in force on every rank, the
per-task counts not yet reported, and the reply in flight.

Rank 0 alone talks to the mixer actor (through ``raymix.mixer.MixerClient``,
or an in-process client); every rank receives the mixture by broadcast, so
all sample from the same weights. A report's reply is collected at the next
sync, one interval later, so that the call never blocks a step; a report
carrying a signal's result is answered at once and its mixture applies now.

A mixer actor that is dead for good (:class:`~raymix.mixer.MixerLost`) is
announced to every rank in the same broadcast, and the loop stops: no rank
may wait in a collective that another has left.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


class MixerExchange:
    def __init__(self, client, num_tasks: int, rank: int, distributed: bool, lost: Optional[str] = None):
        self.client = client if rank == 0 else None
        self.lost = lost
        """Why the mixer actor is gone for good (rank 0's words), once it is; the loop then stops."""
        self.T, self.rank, self.distributed = num_tasks, rank, distributed
        self.sync_tokens = np.zeros(num_tasks)
        self.sync_loss = np.zeros((2, num_tasks))
        self.pending = None
        # A reply already resolved by a flush (a checkpoint's snapshot): the
        # mixture the next sync applies, as it would have applied ``pending``.
        self.ready: Optional[dict] = None
        self.version, self.weights = 0, np.full(num_tasks, 1.0 / num_tasks)
        self._restored: Optional[dict] = None
        self.meta_reported = 0
        """Meta tokens sent to the ledger so far (signals and evaluation), on rank 0."""

    def broadcast(self, mix: Optional[dict]) -> tuple[int, np.ndarray]:
        """Rank 0's ``{"version", "weights"}`` on every rank, or (rank 0 lost
        the mixer) the mixture in force, with :attr:`lost` set on every rank."""
        import torch

        buf = torch.zeros(self.T + 2, dtype=torch.float64)
        if self.rank == 0 and self.lost is not None:
            buf[1] = 1.0
        elif self.rank == 0:
            buf[0] = mix["version"]
            buf[2:] = torch.tensor(mix["weights"], dtype=torch.float64)
        if self.distributed:
            import torch.distributed as dist

            dist.broadcast(buf, src=0)
        if buf[1] > 0:
            self.lost = self.lost or "rank 0 lost the mixer actor (its log says why)"
            return self.version, self.weights
        w = buf[2:].numpy().clip(0)
        return int(buf[0]), w / w.sum()

    def start(self, train_tokens: int, restores: int = 0) -> int:
        """The mixture to start with: the restored checkpoint's, or (no
        checkpoint) the mixer reset to its initial state, since training
        starts from the first token again (a restart after a failure before
        the first registered checkpoint would otherwise count the lost
        attempt's tokens twice).

        ``restores`` is the restored checkpoint's count plus one (0: nothing
        restored); returns the run's restores, counted by the mixer on rank 0
        (see :meth:`raymix.mixer.Mixer.count_restore`)."""
        from raymix.mixer import MixerLost

        restored, initial = self._restored, None
        try:
            if self.client is not None and self.lost is None and restored is not None:
                # The restored mixer serves what the run had been answered last
                # (at the checkpoint's flush): applied at the next sync, as it
                # would have been without the restart.
                latest = self.client.restore(restored["mixer"])
                self.ready = latest if int(latest["version"]) != int(restored["version"]) else None
                if restores:
                    restores = int(self.client.call("count_restore", restores - 1))
            elif self.client is not None and self.lost is None:
                initial = self.client.reset()
        except MixerLost as e:
            self.lost = str(e)
        if restored is not None:
            initial = {"version": restored["version"], "weights": restored["weights"]}
        self.version, self.weights = self.broadcast(initial)
        self._restored = None
        if self.client is not None and self.lost is None:
            self.client.applied(self.version, train_tokens, self.weights.tolist())
        return restores

    def add(self, stats: np.ndarray) -> None:
        """Count a step's all-reduced [tokens, loss sum, loss count] per task."""
        self.sync_tokens += stats[0]
        self.sync_loss += stats[1:]

    def sync(self, signals: Optional[dict], train_tokens: int) -> None:
        """Report the counts since the last sync (and a signal's result), and
        apply the mixture rank 0 then holds."""
        from raymix.mixer import MixerLost

        current = {"version": self.version, "weights": self.weights.tolist()}
        if self.client is not None and signals is not None:
            self.meta_reported += int(np.sum(signals["meta_tokens"]))
        if self.client is not None and self.lost is None:
            try:
                current = self._report(signals, current)
            except MixerLost as e:
                self.lost = str(e)
        self.sync_tokens[:] = 0
        self.sync_loss[:] = 0
        version, weights = self.broadcast(current)
        if self.lost is not None:
            return
        if version != self.version:
            self.version, self.weights = version, weights
            if self.client is not None:
                self.client.applied(self.version, train_tokens, self.weights.tolist())

    def _report(self, signals: Optional[dict], current: dict) -> dict:
        """Rank 0: this interval's report; returns the mixture to apply now."""
        # The reply to the previous report was sent one interval ago and is
        # ready; this interval's report is collected at the next sync, except
        # after a signal's computation, whose new mixture applies now.
        if self.pending is not None:
            current = self.client.get(self.pending)
        elif self.ready is not None:
            current = self.ready
        self.ready = None
        self.pending = self.client.report(
            self.sync_tokens.astype(np.int64).tolist(), self.sync_loss[0].tolist(), self.sync_loss[1].tolist(),
            signals["meta_tokens"] if signals else None, signals,
        )
        if signals is not None:
            current, self.pending = self.client.get(self.pending), None
        return current

    def report_meta_tokens(self, tokens: np.ndarray) -> None:
        """Tokens read only for evaluation or signals (rank 0; not awaited)."""
        if self.client is not None:
            self.meta_reported += int(np.sum(tokens))
            self.client.report([0] * self.T, None, None, tokens.astype(np.int64).tolist())

    def flush(self) -> None:
        """Rank 0: every counted token reaches the ledger, and the replies are in."""
        if self.client is None:
            return
        if self.pending is not None:
            self.client.get(self.pending)
            self.pending = None
        # Kept, not dropped: a mixture the policy proposed from these reports
        # must still reach the workers (a run that checkpoints at every sync
        # would otherwise never apply a mixer-side policy's updates).
        self.ready = self.client.get(self.client.report(self.sync_tokens.astype(np.int64).tolist(),
                                                        self.sync_loss[0].tolist(), self.sync_loss[1].tolist()))
        self.sync_tokens[:] = 0
        self.sync_loss[:] = 0

    def snapshot(self) -> dict:
        """Rank 0: the mixer actor's state once every count is in."""
        self.flush()
        return self.client.snapshot()

    def summary(self) -> dict:
        self.flush()
        return self.client.call("summary")

    @property
    def restarts(self) -> Optional[int]:
        return self.client.restarts if self.client is not None else None

    @property
    def pid(self) -> Optional[int]:
        return self.client.pid if self.client is not None else None

    # -- checkpoint part ------------------------------------------------------
    def state_dict(self) -> dict:
        # The actor's own state (key "mixer") is added by rank 0 when it saves.
        return {"version": self.version, "weights": self.weights.tolist(), "meta_reported": self.meta_reported}

    def load_state_dict(self, state: dict) -> None:
        self._restored = {"version": state["version"], "weights": state["weights"], "mixer": state.get("mixer")}
        self.meta_reported = int(state.get("meta_reported", 0))
