"""The two contracts between the driver and the training loop, typed.

:class:`LoopConfig` is what the driver hands every worker (through Ray
Train's ``train_loop_config``, or directly in-process); :class:`LoopResult`
is what rank 0 hands back, as ``raymix_eval.json`` in the final checkpoint.
Both are dataclasses: a field added on one side and not the other fails
loudly (a missing or unknown key names itself) instead of going missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from raymix.config import RunConfig
from raymix.data import PreparedPool


@dataclass(frozen=True)
class LoopConfig:
    """Everything a training worker needs besides its Ray Train context."""

    run: RunConfig
    pool: PreparedPool
    budget_tokens: int
    tokenizer_dir: str
    init_model_dir: str
    """The initial model: a directory written by the driver, or a pretrained one."""
    mixer_name: Optional[str] = None
    """The mixer actor's name (rank 0 connects to it); None when the caller
    passes a mixer client to :func:`raymix.loop.train_loop` itself."""
    mlflow_run_id: Optional[str] = None
    mlflow_tracking_uri: Optional[str] = None
    output_dir: Optional[str] = None
    """Where workers write ``progress/rank<R>.json``; None: nowhere."""
    local_checkpoint_dir: Optional[str] = None
    """In-process runs: where checkpoints go (Ray Train's storage otherwise)."""

    def as_train_loop_config(self) -> dict:
        """Ray Train passes its ``train_loop_config`` dict to every worker."""
        return {"loop": self}

    @classmethod
    def from_train_loop_config(cls, config: dict | LoopConfig) -> LoopConfig:
        if isinstance(config, LoopConfig):
            return config
        if set(config) != {"loop"} or not isinstance(config["loop"], LoopConfig):
            raise TypeError(f"train_loop_config must be {{'loop': LoopConfig}}, got keys {sorted(config)}")
        return config["loop"]


RESULT_FILE = "raymix_eval.json"


@dataclass
class LoopResult:
    """Rank 0's account of a finished loop, stored beside the final model."""

    train_tokens: int
    """The workers' own all-reduced count (the mixer's ledger is in ``mixer``)."""
    steps: int
    loop_seconds: float
    """Training time: curve evaluations and checkpoints are not in it."""
    tokens_per_second: float
    worker_entered_at: float
    """Wall clock when the worker entered the loop function (worker start-up)."""
    worker_setup_seconds: float
    meta_seconds: float
    """Time in the policy's worker-side signal."""
    meta_steps: int
    curve_seconds: float
    checkpoint_seconds: float
    restores: int
    eval_seconds: float
    reported_at: float
    val_loss: dict[str, float]
    test_exact_match: dict[str, float]
    curve: list[dict]
    mixer: dict
    """The mixer's summary: ledger, schedule, final weights, spill."""
    mixer_restarts: int
    stopped_early: bool = False
    """The policy's signal stopped the run before the budget was spent."""
    signal_summary: dict = field(default_factory=dict)
    """Keys the policy's signal adds to ``summary.json``."""
    utilisation: float = 0.0
    """Real (unpadded) tokens per position the model computed in training,
    over all workers (0 in a result written before it existed)."""
    timed_tokens: int = 0
    """Of ``train_tokens``, those trained in ``loop_seconds`` (all of them
    unless the run restored from a checkpoint), which ``tokens_per_second``
    divides (0 in a result written before it existed)."""
    timed_meta_seconds: Optional[float] = None
    """Of ``meta_seconds`` (every attempt's), the signal's time within
    ``loop_seconds`` (None in a result written before it existed)."""
    batch_seconds: float = 0.0
    """Of ``loop_seconds``, rank 0's host time drawing the steps' examples
    and laying them out (0 in a result written before it was timed)."""
    model_flops_per_token: float = 0.0
    """Training FLOPs the model needed per real token (:mod:`raymix.flops`;
    0 in a result written before it existed)."""
    mfu: Optional[float] = None
    """Model FLOPs utilisation of the training loop against the GPUs' bf16
    peak; None on CPU, on a GPU whose peak raymix does not know, and in a
    result written before it existed."""
    peak_device_memory_bytes: int = 0
    """Rank 0's peak allocated accelerator memory in training
    (``torch.cuda.max_memory_allocated``); 0 on CPU."""
    batch_layout: str = ""
    """``packed``, or ``padded (why)``: how training laid out its examples."""
    test_loss: dict[str, float] = field(default_factory=dict)
    """Per task, on the test split that no policy reads (runs are compared on
    it); empty in a result written before it existed."""
    world: int = 1
    """Workers at the end of the run (an elastic run's count may vary)."""
    exact_match_seconds: float = 0.0
    """Of ``eval_seconds``, the greedy generation of the final exact match (0
    in a result written before it was timed apart)."""
    data_positions: dict = field(default_factory=dict)
    """Per task, the training examples drawn over all workers: ``epoch`` (passes
    completed) and ``served`` (examples of the current pass)."""

    def metrics(self) -> dict:
        """The numbers reported to Ray Train with the final checkpoint."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), (int, float))}

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, RESULT_FILE), "w") as f:
            json.dump(dataclasses.asdict(self), f)

    @classmethod
    def read(cls, directory: str) -> LoopResult:
        path = os.path.join(directory, RESULT_FILE)
        data = json.loads(open(path).read())
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise RuntimeError(f"{path}: written by another version of raymix's loop "
                               f"(missing {missing}, unknown {unknown})")
        return cls(**data)
