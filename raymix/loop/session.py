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
"""Exit status of a Ray worker process that stopped because its raylet was gone."""


class RayletWatch:
    """Stops a Ray worker process whose raylet has died.

    Ray starts each worker process in a process group of its own, so a
    driver killed with its group (a closed terminal, a preempted job) takes
    the local cluster's raylet with it but not the workers. Reparented, they
    went on training for seconds, up to a whole run's last 18,000 tokens,
    writing checkpoints and MLflow metrics into the run that a ``--resume``
    was about to continue. A watch records the parent (the raylet) of the
    process it is built in; :meth:`__call__` exits at once if that parent
    changed. A parent changes only by dying, so a healthy worker is never
    stopped, and one ``getppid`` a step costs nothing measurable."""

    def __init__(self) -> None:
        self.raylet = os.getppid()

    def __call__(self) -> None:
        if os.getppid() != self.raylet:
            # Read only in the worker's own log file: the log monitor that
            # forwarded it to the driver died with the raylet.
            print(f"[raymix] worker {os.getpid()}: the raylet that started this worker (pid {self.raylet}) is "
                  "gone, with its Ray node or the driver's local cluster; stopping without writing anything "
                  "more (--resume continues the run from its last registered checkpoint)", flush=True)
            os._exit(ORPHAN_EXIT)


def in_ray_actor() -> bool:
    """This process is a Ray actor's (a Tune trial's), so a raylet's child."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class RayTrainSession:
    """The training function's view of Ray Train inside a ``TorchTrainer`` worker."""

    def __init__(self) -> None:
        self.stop_if_orphaned = RayletWatch()
        """Called before each step, each metrics commit and each checkpoint
        write (:func:`raymix.loop.checkpoint.report_checkpoint`): no
        controller would register this worker's checkpoints once its raylet
        is gone."""

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
        # Watched in a Tune trial's actor, whose raylet dies with a killed
        # sweep driver. Not in a driver process, whose parent may well exit
        # first (a nohup launch).
        self._watch = RayletWatch() if in_ray_actor() else None

    def stop_if_orphaned(self) -> None:
        if self._watch is not None:
            self._watch()

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
