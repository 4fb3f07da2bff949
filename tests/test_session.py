"""The training function's sessions: a Ray worker process stops once its
raylet is gone (:class:`raymix.loop.session.RayletWatch`), and only a Ray
worker process watches. The end-to-end case, a driver killed with its
process group whose Ray Train workers stop within a few steps, is
``tests/test_faults_ray.py``'s kill tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_gone

CHILD = """
import sys, time
from raymix.loop.session import RayletWatch
watch = RayletWatch()
for _ in range(5):
    watch()
print("healthy", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    watch()
    time.sleep(0.02)
print("survived", flush=True)
"""


def test_raylet_watch_stops_a_process_whose_parent_died(tmp_path: Path) -> None:
    """A process whose parent lives passes every check; once the parent
    exits (the process reparented, as a Ray worker is when its raylet dies)
    the next check ends it with the orphan status and a message."""
    log = tmp_path / "child.log"
    # The parent: a shell that starts the child, waits a second, and exits
    # without waiting for it; its exit status records the child's pid.
    parent = subprocess.run(
        ["bash", "-c", f'{sys.executable} -c "$0" > {log} 2>&1 & echo $! ; sleep 1', CHILD],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 30
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert text.startswith("healthy\n"), text
    assert "the raylet that started this worker" in text and "is gone" in text, text
    assert "survived" not in text


@pytest.mark.ray
def test_only_a_ray_actor_watches_its_raylet(ray_local, tmp_path: Path) -> None:
    """The in-process session watches in a Tune trial's actor (a raylet's
    child, which a killed sweep driver orphans) and not in a driver, whose
    parent may exit first (a nohup launch)."""
    import ray

    from raymix.loop.session import InProcessSession

    assert InProcessSession(False, str(tmp_path))._watch is None

    @ray.remote(num_cpus=0)
    class Trial:
        def watched(self, local_dir: str) -> tuple:
            session = InProcessSession(False, local_dir)
            session.stop_if_orphaned()  # the raylet lives: nothing happens
            parent = Path(f"/proc/{os.getppid()}/comm").read_text().strip()
            return session._watch is not None and session._watch.raylet == os.getppid(), parent

    watched, parent = ray.get(Trial.remote().watched.remote(str(tmp_path)))
    assert watched and parent == "raylet"
