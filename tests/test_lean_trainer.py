"""raymix's runs start Ray Train without the actors that cannot serve them:
its DatasetManager (raymix gives its trainer no ``datasets``) and, where
Ray's State API does not answer (a local Ray without its dashboard, as raymix
starts one), its PlacementGroupCleaner, which polls that API; and without
torch in the driver and the run's controller (``TorchProcessGroupConfig``)."""

from __future__ import annotations

import pytest

from raymix.driver.trainer import lean_trainer_class, state_api_answers


def _callbacks(trainer_class, datasets=None):
    import ray.train

    trainer = trainer_class(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    if datasets is not None:
        trainer.datasets = datasets
    return sorted(type(c).__name__ for c in trainer._create_default_callbacks())


@pytest.mark.ray
def test_a_local_run_starts_neither_dataset_manager_nor_placement_group_cleaner(ray_local) -> None:
    from ray.train.torch import TorchTrainer

    lean = lean_trainer_class()
    assert lean is not TorchTrainer
    assert not state_api_answers()  # ray_local starts Ray without its dashboard, as raymix does
    ray_own = _callbacks(TorchTrainer)
    assert {"DatasetsCallback", "PlacementGroupCleanerCallback"} <= set(ray_own)
    dropped = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert _callbacks(lean) == sorted(c for c in ray_own if c not in dropped)  # nothing else left out
    # Given datasets, their manager stays.
    assert "DatasetsCallback" in _callbacks(lean, datasets={"train": object()})


@pytest.mark.ray
def test_the_cleaner_stays_where_the_state_api_answers(ray_local, monkeypatch) -> None:
    import raymix.driver.trainer as trainer

    monkeypatch.setattr(trainer, "state_api_answers", lambda: True)
    assert "PlacementGroupCleanerCallback" in _callbacks(lean_trainer_class())


@pytest.mark.ray
def test_scaling_policy_sends_no_resource_requests_on_a_local_ray_raymix_started(ray_local, monkeypatch) -> None:
    """Where init_ray started the local Ray (LOCAL_RAY_ENV set), the fixed
    scaling policy is swapped for one without the AutoscalingCoordinator;
    elsewhere Ray's own policy goes to the controller."""
    import ray.train
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raymix.driver.setup import LOCAL_RAY_ENV

    given = []
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kw: given.append(kw["scaling_policy"]))
    lean = lean_trainer_class()
    scaling = ray.train.ScalingConfig(num_workers=1)
    trainer = lean(lambda: None, scaling_config=scaling)
    monkeypatch.delenv(LOCAL_RAY_ENV, raising=False)
    trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling))
    monkeypatch.setenv(LOCAL_RAY_ENV, "1")
    trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling))
    assert type(given[0]) is FixedScalingPolicy
    local = given[1]
    assert isinstance(local, FixedScalingPolicy) and type(local) is not FixedScalingPolicy
    assert local.scaling_config is scaling

    class Context:
        run_id = "r"

    local.after_controller_start(Context())  # no coordinator client, so no actor
    local.make_decision_for_non_running_worker_group()
    assert local._coordinator_client is None


FIT_ON_RAYMIX_RAY = """
import json, os, sys
import ray, ray.train
from raymix.config import load_config
from raymix.driver.setup import LOCAL_RAY_ENV, init_ray
from raymix.driver.trainer import lean_trainer_class

OUT = sys.argv[1]  # captured by value with train_fn (the workers' sys.argv is Ray's)

def train_fn():
    # On each worker: the process group Ray's torch backend would have set
    # up, and whether the run's controller maps torch's library (Linux /proc).
    import glob
    import torch.distributed as dist

    maps, pids = [], []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            # This run's controller: a child of this worker's raylet (a
            # controller left by another Ray on the machine is not).
            stat = open(cmdline[:-len("cmdline")] + "stat").read()
            if (open(cmdline, "rb").read().startswith(b"ray::TrainController")
                    and int(stat[stat.rindex(")") + 2:].split()[1]) == os.getppid()):
                maps.append(open(cmdline[:-len("cmdline")] + "maps").read())
                pids.append(int(cmdline.split("/")[2]))
        except OSError:  # a process that ended meanwhile
            pass
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(OUT, f"probe-{rank}.json"), "w") as f:
        json.dump({"backend": dist.get_backend(), "world": dist.get_world_size(),
                   "rank_env": os.environ.get("RANK"), "controllers": len(maps),
                   "controller_torch": any("libtorch" in m for m in maps), "controller_pids": pids}, f)

init_ray(load_config(overrides=["runtime.num_cpus=2", "runtime.object_store_memory=100000000"]))
env = {k: os.environ.get(k) for k in (LOCAL_RAY_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
lean_trainer_class()(train_fn, scaling_config=ray.train.ScalingConfig(
    num_workers=2, resources_per_worker={"CPU": 1}),
    run_config=ray.train.RunConfig(storage_path=sys.argv[1])).fit()
names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
# The run's controller ends with its run, before this driver (or its Ray) does.
import time
controller = json.load(open(os.path.join(OUT, "probe-0.json")))["controller_pids"]
deadline = time.monotonic() + 20
while controller and time.monotonic() < deadline and os.path.exists(f"/proc/{controller[0]}"):
    time.sleep(0.2)
alive = bool(controller) and os.path.exists(f"/proc/{controller[0]}")
print(json.dumps({"env": env, "named": names, "driver_torch": "torch" in sys.modules,
                  "controller_alive_after_fit": alive}))
"""


@pytest.mark.ray
def test_a_run_on_a_local_ray_leaves_no_coordinator_and_starts_no_watcher(tmp_path) -> None:
    """A whole fit on a Ray that init_ray started: the environment says so
    (and turns the preemption watcher off), the detached
    AutoscalingCoordinator actor, which would outlive the run, was never
    created, torch's process group is up on the workers while the driver
    and the controller never imported torch, and the controller has ended
    when fit returns. In a child process: init_ray starts its own Ray."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAYMIX_LOCAL_RAY", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    out = subprocess.run([sys.executable, "-c", FIT_ON_RAYMIX_RAY, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["env"] == {"RAYMIX_LOCAL_RAY": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert "AutoscalingCoordinator" not in got["named"], got["named"]
    # Two workers joined a gloo process group, as TorchTrainer's would have,
    # and neither the driver nor the controller loaded torch to start them.
    probes = [json.loads((tmp_path / f"probe-{r}.json").read_text()) for r in (0, 1)]
    for p in probes:
        assert len(p.pop("controller_pids")) == 1
    assert probes == [{"backend": "gloo", "world": 2, "rank_env": str(r), "controllers": 1,
                       "controller_torch": False} for r in (0, 1)], probes
    assert got["driver_torch"] is False
    # Ray Train's SIGINT handler kept the controller's handle after fit: it
    # lived on, and outlived the local Ray when that shut down first.
    assert got["controller_alive_after_fit"] is False
