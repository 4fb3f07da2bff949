"""A training worker's fixed context: its rank and device, the tokenizer, the
model prepared for its parallelism (DDP, FSDP, or one process), and how the
model and optimizer state are saved and loaded under each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from raymix.config import RunConfig
from raymix.loop.contract import LoopConfig


@dataclass
class Worker:
    cfg: RunConfig
    loop: LoopConfig
    rank: int
    world: int
    distributed: bool
    """A process group exists: collectives run across ``world`` ranks."""
    device: Any
    tokenizer: Any
    model: Any
    """The model as trained (DDP-wrapped, or FSDP-sharded in place)."""
    raw_model: Any
    """The model's own module (what signals and evaluation call)."""
    optimizer: Any = None
    task_metrics: Any = None
    """What per-task metrics become in MLflow (``raymix.metrics_view.TaskMetricsView``);
    a checkpoint part, since it keeps the per-task series above the threshold."""

    @property
    def budget(self) -> int:
        return self.loop.budget_tokens

    @property
    def fsdp(self) -> bool:
        return self.cfg.runtime.parallelism == "fsdp"  # config refuses it without workers (a process group)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def local_checkpoint_dir(self) -> Optional[str]:
        return self.loop.local_checkpoint_dir

    @classmethod
    def build(cls, loop: LoopConfig, session) -> Worker:
        import torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        from raymix.models import load_tokenizer

        cfg = loop.run
        rank, world = session.context()
        torch.set_num_threads(cfg.runtime.torch_threads)
        device = session.device()
        distributed = dist.is_available() and dist.is_initialized() and world > 1
        tokenizer = load_tokenizer(loop.tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(loop.init_model_dir, dtype=torch.float32)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = session.prepare_model(model, cfg.runtime.parallelism)
        # FSDP2 shards in place (no wrapper): the model is its own raw model.
        raw_model = model.module if hasattr(model, "module") else model
        from raymix.metrics_view import TaskMetricsView

        view = TaskMetricsView(loop.pool.tasks, cfg.tracking.per_task_metrics_max_tasks)
        return cls(cfg, loop, rank, world, distributed, device, tokenizer, model, raw_model, task_metrics=view)

    def all_reduce(self, tensor):
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def model_and_optimizer_state(self) -> tuple[Optional[dict], Optional[dict]]:
        """Full (unsharded) state dicts on rank 0, None elsewhere; under FSDP
        a collective (every rank gathers its shards to rank 0), so every rank
        calls it. The same format under either parallelism."""
        if self.fsdp:
            from raymix.fsdp import full_model_state, full_optimizer_state

            return full_model_state(self.model), full_optimizer_state(self.model, self.optimizer, self.rank)
        if self.rank == 0:
            return self.raw_model.state_dict(), self.optimizer.state_dict()
        return None, None

    def load_model_and_optimizer(self, model_state: dict, optimizer_state: dict) -> None:
        if self.fsdp:
            from raymix.fsdp import load_full_state

            # Every rank read the whole checkpoint and keeps its own shard.
            load_full_state(self.model, self.optimizer, model_state, optimizer_state)
        else:
            self.raw_model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)

    def final_model(self):
        """The unsharded model on rank 0 (None elsewhere) for the final
        evaluation and the saved checkpoint. Under FSDP rank 0 rebuilds it from
        the gathered state (a collective), since each of its forwards would
        otherwise wait on the other ranks."""
        if not self.fsdp:
            return self.raw_model if self.rank == 0 else None
        import torch
        from transformers import AutoModelForCausalLM

        from raymix.fsdp import full_model_state

        full = full_model_state(self.model)
        if self.rank != 0:
            return None
        model = AutoModelForCausalLM.from_pretrained(self.loop.init_model_dir, dtype=torch.float32)
        model.load_state_dict(full)
        return model.to(self.device)
