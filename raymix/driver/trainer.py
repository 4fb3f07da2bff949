"""The Ray Train trainer that raymix's runs start: Ray's data-parallel
trainer with torch's process group, without what cannot serve a raymix run.

Two things differ from ``ray.train.torch.TorchTrainer``:

- **torch stays out of the driver and the run's controller.** Ray's
  ``TorchConfig`` lives in ``ray.train.torch.config``, which imports torch at
  its top; the driver builds the config and the run's ``TrainController``
  actor unpickles it, so each imports torch (about 185 MB RSS and 1.6 s on 2
  cores) to pass four fields to the workers. :class:`TorchProcessGroupConfig`
  carries the same fields from a module without torch; its backend decides in
  the controller what needs no torch (gloo or nccl, the rank-0 address) and
  calls Ray's own worker-side functions of ``ray.train.torch.config``
  (process group, torch's distributed environment variables, shutdown) on the
  workers, which import torch anyway. It leaves out Ray's TPU setup, which
  raymix does not use.
- **Ray Train actors that cannot serve a run are not started**: see
  :func:`lean_trainer_class`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Optional

from ray.train.backend import Backend, BackendConfig

from raymix.driver.setup import LOCAL_RAY_ENV


def _torch_config_call(name: str, *args, **kwargs):
    """On a worker: ``ray.train.torch.config.<name>(*args, **kwargs)``,
    Ray's own function for the step (imported here, where torch is)."""
    from ray.train.torch import config

    return getattr(config, name)(*args, **kwargs)


def _set_master(addr: str, port: int) -> None:
    """On a worker: where the process group's rank 0 listens (``env://``)."""
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _DeviceContext:
    """Around the training function on a worker: Ray's own context for
    torch (it sets the default CUDA device where a GPU is), imported there."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class TorchProcessGroupBackend(Backend):
    """What ``ray.train.torch.config._TorchBackend`` does for gloo and nccl,
    decided in the controller without importing torch: the workers run Ray's
    functions for each step (:func:`_torch_config_call`)."""

    share_cuda_visible_devices: bool = True  # as Ray's torch backend: NCCL needs the node's GPUs visible

    def on_start(self, worker_group, backend_config: TorchProcessGroupConfig):
        # build_address: [host]:port for IPv6, as Ray's backend writes it.
        from ray._common.network_utils import build_address
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend or (
            GPU_BACKEND if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master, addr, port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(addr, port)}"
        else:
            raise ValueError(f"TorchProcessGroupConfig.init_method must be 'env' or 'tcp', "
                             f"got {backend_config.init_method!r}")
        # LOCAL_RANK, RANK, WORLD_SIZE, ... before the process group, as Ray's
        # backend does for Ray Train V2's worker group (the only one this
        # config is given to: see lean_trainer_class).
        worker_group.execute(_torch_config_call, "_set_torch_distributed_env_vars")
        import ray

        ray.get([worker_group.execute_single_async(
            i, _torch_config_call, "_setup_torch_process_group", backend=backend, world_rank=i,
            world_size=len(worker_group), init_method=url, timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_torch_config_call, "_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        timeout = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                       DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:  # Ray's own bound, as its torch backend waits
            ray.get(futures, timeout=timeout)
        except GetTimeoutError:
            logging.getLogger(__name__).warning("torch's process group shutdown timed out after %s s", timeout)


# NCCL for CUDA tensors, gloo for CPU ones, in one process group: the step's
# statistics, the mixer exchange, the policies' signal sums and the
# checkpoint's per-rank states are small CPU tensors and objects, which an
# NCCL-only group (Ray's default on GPU workers) refuses ("No backend type
# associated with device type cpu"). Ray's torch backend accepts the list.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


@dataclasses.dataclass
class TorchProcessGroupConfig(BackendConfig):
    """``ray.train.torch.TorchConfig``'s fields, from a module without torch
    (see the module's docstring). ``backend`` None: :data:`GPU_BACKEND` where
    the workers have GPUs, gloo otherwise."""

    backend: Optional[str] = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return TorchProcessGroupBackend

    @property
    def train_func_context(self):
        return _DeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


def state_api_answers() -> bool:
    """Whether Ray's State API answers on the cluster this process is
    connected to: it is served by the dashboard, which a local Ray that
    raymix starts leaves off (see ``init_ray``); a cluster's head runs it."""
    import ray
    from ray.util.state import list_nodes

    try:
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=5)
    except Exception:  # ServerUnavailable, a connection error: no State API here
        return False
    return True


def lean_trainer_class():
    """Ray Train's data-parallel trainer for torch, built as ``TorchTrainer``
    is but with :class:`TorchProcessGroupConfig` (no torch in the driver and
    the controller), and without the Ray Train actors that cannot serve a
    raymix run. Ray Train 2.60 starts, for every run:

    - a ``DatasetManager`` actor, also for a trainer given no ``datasets``,
      as raymix's are (their workers read the shards through their own
      per-task streams; see the README's limits);
    - a ``PlacementGroupCleaner`` actor, which asks the State API every
      second whether the run's controller is alive, to remove the worker
      group's placement group should it die uncleanly. Where the State API
      does not answer (a local Ray without its dashboard, as raymix starts
      one) every ask fails: it logs a warning each second and can never
      clean up.

    On a local Ray that raymix started (``init_ray``: one machine, no
    autoscaler), also:

    - the ``AutoscalingCoordinator`` actor (Ray Data's, a detached actor
      that outlives the run), which the fixed scaling policy starts to pass
      the worker group's resource requests to a cluster autoscaler: there is
      none to pass them to. The policy is replaced by one that sends none;
    - the ``PreemptionWatcher`` actor, turned off by ``init_ray`` through
      Ray Train's own switch (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``).

    Each is one more Python process (about 200 MB RSS) and its imports
    while the worker group starts. Ray's API has no switch for the first
    three: the subclass leaves out the callbacks that start them, through
    ``_create_default_callbacks``, and swaps the scaling policy given to
    ``_initialize_and_run_controller``, private methods of the pinned Ray
    (2.60.0); each is kept where it can serve (datasets given, a State API
    that answers, a Ray that raymix did not start). Where those methods or
    modules are missing (another Ray Train), this is Ray's own
    ``TorchTrainer``."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:  # another Ray Train: nothing known to leave out
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    if not all(hasattr(DataParallelTrainer, m) for m in ("_create_default_callbacks",
                                                         "_initialize_and_run_controller")):
        from ray.train.torch import TorchTrainer

        return TorchTrainer

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        """The fixed policy without resource requests to a cluster autoscaler."""

        def after_controller_start(self, train_run_context):
            self._requester_id = f"train-{train_run_context.run_id}"

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

    class LeanTorchTrainer(DataParallelTrainer):
        """``TorchTrainer``'s signature (``torch_config`` included)."""

        def __init__(self, train_loop_per_worker, *, torch_config: Optional[TorchProcessGroupConfig] = None,
                     scaling_config=None, **kwargs):
            torch_config = torch_config or TorchProcessGroupConfig()
            if not torch_config.backend:  # as TorchTrainer decides it
                torch_config = dataclasses.replace(
                    torch_config, backend=GPU_BACKEND if scaling_config is not None and scaling_config.use_gpu else "gloo")
            super().__init__(train_loop_per_worker, backend_config=torch_config, scaling_config=scaling_config,
                             **kwargs)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop: tuple = () if self.datasets else (DatasetsCallback,)
            if not state_api_answers():
                drop += (PlacementGroupCleanerCallback,)
            return [c for c in callbacks if not isinstance(c, drop)]

        def _initialize_and_run_controller(self, **kwargs):
            policy = kwargs.get("scaling_policy")
            if os.environ.get(LOCAL_RAY_ENV) == "1" and type(policy) is FixedScalingPolicy:
                kwargs["scaling_policy"] = LocalFixedScalingPolicy(policy.scaling_config)
            # Ray Train registers a SIGINT handler that holds the run's
            # controller, and leaves it registered after the run: the
            # controller (an actor of about 220 MB) then lives on until the
            # next run replaces the handler or the driver exits, and one
            # still alive when a local Ray shut down outlived it, orphaned.
            # The handler before the run, put back after it, drops the last
            # handle to the controller, and Ray ends it with its run.
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGINT) if main else None
            try:
                return super()._initialize_and_run_controller(**kwargs)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)

    return LeanTorchTrainer
