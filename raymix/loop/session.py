"""The training function's view of where it runs: a Ray Train worker
(:class:`RayTrainSession`) or the calling process (:class:`InProcessSession`,
``runtime.num_workers=0``). The loop asks its session for its rank, its
device, the model prepared for its parallelism, the checkpoint to restore,
and where to report metrics and checkpoints; nothing else in the loop knows
which of the two it runs in.
"""

from __future__ import annotations

import os

ORPHAN_EXIT = 75
"""Exit status of a worker that stopped because its raylet was gone."""


class RayTrainSession:
    """The training function's view of Ray Train inside a ``TorchTrainer`` worker."""

    def __init__(self) -> None:
        # The raylet that started this worker process. Ray starts each
        # worker in its own process group, so a driver killed with its
        # group (a killed terminal, a preempted job) takes the local
        # cluster's raylet with it but not the workers: reparented, they
        # went on training for seconds (measured: a whole run's last 18,000
        # tokens) and wrote checkpoints and MLflow metrics into the run that
        # a --resume was about to continue.
        self._raylet = os.getppid()

    def stop_if_orphaned(self) -> None:
        """Exit at once, writing nothing more, if this worker's raylet has
        died (the process was reparented): no controller will register its
        checkpoints, and a --resume may already be writing to the run. A
        parent can only change by dying, so this never stops a healthy
        worker; one ``getppid`` a step costs nothing measurable."""
        if os.getppid() != self._raylet:
            # Read only in the worker's own log file: the log monitor that
            # forwarded it to the driver died with the raylet.
            print(f"[raymix] worker {os.getpid()}: the raylet that started this worker (pid {self._raylet}) is gone, "
                  "with its Ray node or the driver's local cluster; stopping without writing anything more "
                  "(--resume continues the run from its last registered checkpoint)", flush=True)
            os._exit(ORPHAN_EXIT)

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

        self.stop_if_orphaned()  # a checkpoint is copied into the run's storage by the worker itself
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

    def stop_if_orphaned(self) -> None:
        """Nothing to check: the loop runs in the driver itself, whose parent
        may well exit first (a ``nohup`` launch)."""

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
