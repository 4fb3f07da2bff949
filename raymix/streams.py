"""Per-task example streams over the tokenised shards, and batch collation.

Each training worker holds one :class:`TaskStream` per task and draws every
example's task from the current mixture, so a mixture that changes during
training takes effect at once. A stream reads its task's Parquet files a
chunk at a time (memory stays bounded by ``chunk_rows`` per task), shuffles
within the chunk, takes every ``world``-th row for its rank, and starts a new
seeded pass over the files when it runs out (a repeat, capped by the mixer).
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

import numpy as np


class TaskStream:
    def __init__(self, shard_dir: str, seed: int, rank: int = 0, world: int = 1, chunk_rows: int = 8192):
        self.files = sorted(glob.glob(os.path.join(shard_dir, "*.parquet")))
        if not self.files:
            raise FileNotFoundError(f"no shards in {shard_dir}")
        self.seed, self.rank, self.world, self.chunk_rows = seed, rank, world, chunk_rows
        self.epoch = 0
        self.served = 0  # examples served in this epoch (for resume)
        self._iter = self._examples()

    def _chunks(self, epoch: int) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        import pyarrow.parquet as pq

        rng = np.random.default_rng([self.seed, epoch])
        for fi in rng.permutation(len(self.files)):
            pf = pq.ParquetFile(self.files[fi])
            for batch in pf.iter_batches(
                batch_size=self.chunk_rows, columns=["input_ids", "prompt_len", "status"]
            ):
                keep = np.asarray(batch.column("status").to_pylist()) != "dropped"
                col = batch.column("input_ids")
                # Slice the flat values by the list offsets: no per-token Python objects.
                offsets = col.offsets.to_numpy()
                values = col.values.to_numpy().astype(np.int64)
                ids = [values[offsets[j] : offsets[j + 1]] for j in np.flatnonzero(keep)]
                plen = np.asarray(batch.column("prompt_len").to_numpy())[keep]
                yield ids, plen

    def _examples(self) -> Iterator[tuple[np.ndarray, int]]:
        while True:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            offset = 0
            produced = False
            for ids, plen in self._chunks(self.epoch):
                order = rng.permutation(len(ids))
                for j, i in enumerate(order):
                    # Ranks split each chunk's shuffled order between them,
                    # counting positions across chunks so small tasks
                    # (chunks shorter than ``world``) are split fairly too.
                    if (offset + j) % self.world == self.rank:
                        produced = True
                        self.served += 1
                        yield ids[i], int(plen[i])
                offset += len(order)
            if not produced:  # fewer rows than ranks: every rank reads all
                for ids, plen in self._chunks(self.epoch):
                    for i in range(len(ids)):
                        self.served += 1
                        yield ids[i], int(plen[i])
            self.epoch += 1
            self.served = 0

    def next(self) -> tuple[np.ndarray, int]:
        return next(self._iter)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        """Fast-forward to the saved position (deterministic given the seed)."""
        self.epoch, target = int(state["epoch"]), int(state["served"])
        self.served = 0
        self._iter = self._examples()
        for _ in range(target):
            next(self._iter)


def collate(examples: list[tuple[np.ndarray, int]], pad_id: int, pad_to_multiple: int = 8):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
    prompt and padding, so the loss is on completion tokens only)."""
    import torch

    longest = max(len(ids) for ids, _ in examples)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for row, (ids, plen) in enumerate(examples):
        t = torch.from_numpy(ids)
        input_ids[row, : len(ids)] = t
        mask[row, : len(ids)] = 1
        labels[row, plen : len(ids)] = t[plen:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def read_split(shard_dir: str, columns: list[str]) -> dict[str, list]:
    """All rows of one task's split (validation and test sets are small)."""
    import pyarrow.dataset as pads

    if not os.path.isdir(shard_dir):
        return {c: [] for c in columns}
    table = pads.dataset(shard_dir, format="parquet").to_table(columns=columns + ["status", "id"])
    table = table.sort_by("id")
    keep = [s != "dropped" for s in table.column("status").to_pylist()]
    return {c: [v for v, k in zip(table.column(c).to_pylist(), keep) if k] for c in columns}
