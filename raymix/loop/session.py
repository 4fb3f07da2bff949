"""The training function's view of where it runs: a Ray Train worker
(:class:`RayTrainSession`) or the calling process (:class:`InProcessSession`,
``runtime.num_workers=0``). The loop asks its session for its rank, its
device, the model prepared for its parallelism, the checkpoint to restore,
and where to report metrics and checkpoints; nothing else in the loop knows
which of the two it runs in.
"""

from __future__ import annotations


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
        from raymix.loop.checkpoint import latest_local_checkpoint

        return latest_local_checkpoint(self.local_dir)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append((dict(metrics), checkpoint_dir))
