"""The token ledger: per task, tokens consumed by optimizer updates
(``train_tokens``) and tokens spent only on meta-gradients or evaluation
(``meta_tokens``). Part of every checkpoint and every MLflow run."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class TokenLedger:
    def __init__(self, tasks: Sequence[str]):
        self.tasks = tuple(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.train = np.zeros(len(self.tasks), dtype=np.int64)
        self.meta = np.zeros(len(self.tasks), dtype=np.int64)

    def add_train(self, tokens: Sequence[int] | np.ndarray) -> None:
        delta = np.asarray(tokens, dtype=np.int64)
        if delta.shape != self.train.shape or (delta < 0).any():
            raise ValueError(f"train token delta must be {len(self.tasks)} non-negative ints")
        self.train += delta

    def add_meta(self, tokens: Sequence[int] | np.ndarray) -> None:
        delta = np.asarray(tokens, dtype=np.int64)
        if delta.shape != self.meta.shape or (delta < 0).any():
            raise ValueError(f"meta token delta must be {len(self.tasks)} non-negative ints")
        self.meta += delta

    @property
    def train_total(self) -> int:
        return int(self.train.sum())

    @property
    def meta_total(self) -> int:
        return int(self.meta.sum())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            t: {"train_tokens": int(self.train[i]), "meta_tokens": int(self.meta[i])}
            for i, t in enumerate(self.tasks)
        }

    def state_dict(self) -> dict:
        return {"tasks": list(self.tasks), "train": self.train.tolist(), "meta": self.meta.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> TokenLedger:
        ledger = cls(state["tasks"])
        ledger.train[:] = state["train"]
        ledger.meta[:] = state["meta"]
        return ledger
