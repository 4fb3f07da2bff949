"""Faults mid-run: a killed training worker, a killed mixer actor, a killed
driver. Each run is a real ``python -m raymix.train`` process with its own
local Ray (2 CPUs); the test finds the process to kill through the run's
``progress/rank<R>.json`` files and kills it with SIGKILL once the first
checkpoint is behind it.

What must hold afterwards: the run finishes; the ledger's total equals the
workers' own count (restored, not double-counted) and lies in
``[budget, budget + one global batch)``, the window of every run without a
fault; the mixture schedule is continuous; exactly one MLflow run, FINISHED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_gone

from raymix.loop.checkpoint import MANIFEST_FILE

pytestmark = pytest.mark.ray

BUDGET = 30000
CHECKPOINT = 8000
ARGS = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=4",
    "model.vocab_size=512",
    "train.micro_batch_size=4",
    "train.sync_every=2",
    "train.log_every=1",
    "eval.max_test_examples=4",
    "eval.max_new_tokens=6",
    "eval.suite=null",
    "eval.curve_points=2",
    "runtime.num_cpus=2",
    "runtime.num_workers=2",
    "runtime.cpus_per_worker=0.5",
    "runtime.object_store_memory=200000000",
    f"budget.tokens={BUDGET}",
    f"train.checkpoint_tokens={CHECKPOINT}",
    "runtime.max_failures=1",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.setdefault("RAYMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    e["RAY_ADDRESS"] = ""  # each run starts its own local Ray
    return e


def _cmd(out: Path, extra=(), resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "raymix.train", "--output", str(out)]
    if resume:
        return cmd + ["--resume"]
    for a in ARGS + list(extra):
        cmd += ["--set", a]
    return cmd


def _progress(out: Path, rank: int = 0) -> dict | None:
    try:
        return json.loads((out / "progress" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_registered(out: Path) -> bool:
    """A checkpoint that a restart would find: in-process runs keep complete
    ones in OUTPUT/checkpoints; Ray Train knows a reported one only after its
    controller's next poll of the workers (every 2 s), recorded in its
    checkpoint-manager snapshot. A fault injected before that restarts the
    run from scratch, a different (also handled) case from the one tested."""
    local = out / "checkpoints"
    if local.is_dir() and any((d / MANIFEST_FILE).exists() for d in local.glob("*-periodic")):
        return True
    for snap in (out / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text())["checkpoint_results"]:
                return True
        except (OSError, ValueError, KeyError):
            pass
    return False


def _run_and_kill(out: Path, env: dict, pick_pid, extra=(), kill_group: bool = False,
                  after_tokens: int = CHECKPOINT + 3000, timeout: float = 600, inject=None) -> tuple[int, str]:
    """Start a run, SIGKILL ``pick_pid(out)`` (or call ``inject()``) once rank
    0 passed ``after_tokens`` and a checkpoint is registered."""
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        p = subprocess.Popen(_cmd(out, extra), stdout=f, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    killed_at = None
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < timeout:
            st = _progress(out)
            if (killed_at is None and st and st["train_tokens"] >= after_tokens
                    and _checkpoint_registered(out)):
                assert st["train_tokens"] < BUDGET, "the run ended before the fault could be injected"
                print(f"fault injected at {st['train_tokens']} train tokens", flush=True)
                if inject is not None:
                    inject()
                elif kill_group:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    os.kill(pick_pid(out), signal.SIGKILL)
                killed_at = st["train_tokens"]
            time.sleep(0.05)
        if kill_group:
            p.wait(timeout=60)
            if killed_at is not None:
                _check_orphans_stopped(out, killed_at)
        else:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert killed_at is not None, f"no fault injected; log:\n{log.read_text()[-3000:]}"
    return p.returncode, log.read_text()


def _check_orphans_stopped(out: Path, killed_at: int) -> None:
    """After the driver's process group is killed, its Ray workers (each in
    a process group of its own) stop within a step or two of the raylet's
    death, writing nothing more. Before they checked, they trained on for
    seconds: 11,456 to 29,400 of 30,000 tokens, checkpoints included, racing
    the --resume that followed."""
    ranks = [json.loads(f.read_text()) for f in (out / "progress").glob("rank*.json")]
    deadline = time.monotonic() + 30
    while not all(process_gone(r["pid"]) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(process_gone(r["pid"]) for r in ranks), f"workers {[r['pid'] for r in ranks]} outlived the driver by 30 s"
    # At most the step in flight when the progress was read and the one in
    # flight at the kill (each at most micro_batch 4 x 128 tokens x 2 ranks,
    # or the global batch of 1,024); four steps' worth leaves slack and is
    # still far below what the unchecked workers trained.
    advanced = max(json.loads(f.read_text())["train_tokens"] for f in (out / "progress").glob("rank*.json"))
    assert advanced - killed_at <= 4 * 1024, f"the workers trained on from {killed_at} to {advanced} tokens"


def _check_finished(out: Path) -> dict:
    from mlflow.tracking import MlflowClient

    summary = json.loads((out / "summary.json").read_text())
    ledger_total = sum(r["train_tokens"] for r in summary["ledger"].values())
    assert ledger_total == summary["train_tokens"] == summary["loop_train_tokens"]
    assert BUDGET <= summary["train_tokens"] < BUDGET + summary["global_batch_tokens"]
    assert summary["meta_tokens"] == sum(r["meta_tokens"] for r in summary["ledger"].values())
    offsets = [o for o, _ in summary["mixture_schedule"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    # Continuous: no stretch longer than a few sync intervals without an
    # applied entry for a policy that changes the mixture at every sync.
    client = MlflowClient(summary["mlflow_tracking_uri"])
    runs = client.search_runs([summary["mlflow_experiment_id"]])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].info.run_id == summary["mlflow_run_id"]
    return summary


def _check_each_step_once(summary: dict) -> None:
    """Every MLflow metric has one value per step, also for the steps trained
    twice around a fault; with ``train.log_every=1`` every step is there."""
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(summary["mlflow_tracking_uri"]), summary["mlflow_run_id"]
    keys = list(client.get_run(run_id).data.metrics)
    assert "train/loss" in keys and "curve/worst_val_loss" in keys and "pool/tokens" in keys
    for key in keys:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert len(steps) == len(set(steps)), (key, steps)
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert loss_steps == list(range(1, summary["steps"] + 1)), loss_steps


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_training_worker_restores_from_checkpoint(tmp_path: Path, env: dict) -> None:
    out = tmp_path / "worker"
    rc, log = _run_and_kill(out, env, lambda o: _progress(o, 0)["pid"], ["policy.name=proportional"])
    assert rc == 0, log[-4000:]
    summary = _check_finished(out)
    assert (summary["restores"], summary["mixer_restarts"]) == (1, 0), log[-4000:]
    # The curve had 3 points (start, half, end): none lost, none repeated.
    points = [p["train_tokens"] for p in summary["curve"]]
    assert len(points) == 3 and points == sorted(set(points)), points
    # The steps between the checkpoint and the kill were trained twice, and
    # are in MLflow once.
    _check_each_step_once(summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_mixer_actor_restarts_with_its_state(tmp_path: Path, env: dict) -> None:
    out = tmp_path / "mixer"
    extra = ["policy.name=adapt", "policy.adapt.every_steps=4", "policy.adapt.warmup_steps=4",
             "policy.adapt.tasks_per_step=4"]
    rc, log = _run_and_kill(out, env, lambda o: _progress(o, 0)["mixer_pid"], extra)
    assert rc == 0, log[-4000:]
    summary = _check_finished(out)
    assert (summary["mixer_restarts"], summary["restores"]) == (1, 0), log[-4000:]
    # ADAPT changes the mixture every meta step (4 optimizer steps): the
    # replayed schedule has no hole where the dead actor's entries were.
    offsets = [o for o, _ in summary["mixture_schedule"]]
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert max(gaps) < 4 * summary["global_batch_tokens"] * 2, gaps


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_driver_resumes_with_resume_flag(tmp_path: Path, env: dict) -> None:
    out = tmp_path / "driver"
    rc, log = _run_and_kill(out, env, None, ["policy.name=uniform"], kill_group=True)
    assert rc != 0
    assert not (out / "summary.json").exists()
    # Without --resume the unfinished run is protected, not overwritten.
    p = subprocess.run(_cmd(out, ["policy.name=uniform"]), env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "pass --resume" in p.stderr
    # A config that changes results is refused, naming the field.
    p = subprocess.run(_cmd(out, ["policy.name=proportional"]) + ["--resume"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "policy.name: uniform -> proportional" in p.stderr
    p = subprocess.run(_cmd(out, resume=True), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    summary = _check_finished(out)
    assert summary["restores"] == 1


@pytest.mark.timeout(900)
def test_local_mode_driver_kill_resumes_exactly(tmp_path: Path, env: dict) -> None:
    """Ray Train's local mode (0 workers) keeps its checkpoints in
    OUTPUT/checkpoints. A run killed after a checkpoint and resumed ends
    bit-identical to the same run without the fault: same ledger, same
    validation losses (model, optimizer, RNG and data positions restored)."""
    local = ["policy.name=proportional", "runtime.num_workers=0", "runtime.max_failures=0"]
    clean = tmp_path / "clean"
    r = subprocess.run(_cmd(clean, local), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = tmp_path / "killed"
    rc, _ = _run_and_kill(out, env, None, local, kill_group=True)
    assert rc != 0
    assert any(p.name.endswith("-periodic") for p in (out / "checkpoints").iterdir())
    r = subprocess.run(_cmd(out, resume=True), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    a, b = _check_finished(clean), _check_finished(out)
    assert b["restores"] == 1 and a["restores"] == 0
    assert a["ledger"] == b["ledger"]
    # Exact on purpose: both runs are one process each on this machine, with
    # the same kernels (and ATEN_CPU_CAPABILITY), one torch thread, and the
    # model, optimizer, RNG and data positions restored bit for bit; any
    # difference is a resume bug, not rounding.
    assert a["val_loss"] == b["val_loss"]
    assert a["curve"] == b["curve"]


@pytest.mark.slow
@pytest.mark.timeout(900)
# One direction in CI, the other with the heavy tests (CI's 90 minutes).
@pytest.mark.parametrize("first, then", [("fsdp", "ddp"), pytest.param("ddp", "fsdp", marks=pytest.mark.heavy)])
def test_checkpoint_resumes_under_the_other_parallelism(tmp_path: Path, env: dict, first: str, then: str) -> None:
    """A run under one runtime.parallelism, its driver killed after a
    checkpoint, resumes under the other (a runtime field, so --resume accepts
    the change) from that checkpoint: FSDP writes and reads the DDP format."""
    out = tmp_path / first
    rc, log = _run_and_kill(out, env, None, ["policy.name=uniform", f"runtime.parallelism={first}"],
                            kill_group=True)
    assert rc != 0
    p = subprocess.run(_cmd(out, ["policy.name=uniform", f"runtime.parallelism={then}"]) + ["--resume"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "restored from checkpoint" in p.stdout + p.stderr
    summary = _check_finished(out)
    assert summary["restores"] == 1


def _consumed_prefix_tokens(env: dict, summary: dict) -> dict[str, int]:
    """Per task, the tokens of its examples in their one global order (the
    pool's cached shards, read with the run's seed) up to the position the
    run reached: what the ledger must hold if every drawn example was
    trained once, across workers and resumes."""
    from raymix.data import PreparedPool
    from raymix.streams import TaskStream

    tasks = tuple(summary["data_positions"])
    tokens = summary["pool"]["tokens_per_task"]
    for stats_file in Path(env["RAYMIX_CACHE"]).glob("shards/*/stats.json"):
        stats = json.loads(stats_file.read_text())
        # The run's own pool: the same tasks alone would also match other
        # tests' pools of the synthetic suite in a shared cache (CI's).
        if tuple(stats["tasks"]) == tasks and {t: r["tokens"] for t, r in stats["train"].items()} == tokens:
            pool = PreparedPool(str(stats_file.parent), tasks, stats, True, 0.0)
            break
    else:
        raise AssertionError("the run's pool is not in the test's cache")
    out = {}
    for i, task in enumerate(tasks):
        # Small tasks wrap (a new pass in another order): read on until the
        # stream stands where the run's did.
        target = summary["data_positions"][task]
        stream = TaskStream(pool.shards("train", task), seed=summary["seed"] * 100003 + i)
        out[task] = 0
        while stream.state_dict() != target:
            out[task] += len(stream.next()[0])
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_worker_count(tmp_path: Path, env: dict, first: int, then: int) -> None:
    """A run on ``first`` workers, its driver killed after a checkpoint,
    resumes on ``then`` (a preemptible cluster that shrank or grew): the
    data positions are global, so every task's ledger holds exactly the
    tokens of the first examples of its one order, each trained once."""
    out = tmp_path / f"w{first}"
    # A global batch in tokens (8 examples of 128 tokens) keeps each step's
    # batch whatever the worker count: without it the count sets the batch
    # and --resume refuses the move.
    batch = "train.global_batch_tokens=1024"
    rc, _ = _run_and_kill(out, env, None, ["policy.name=proportional", f"runtime.num_workers={first}", batch],
                          kill_group=True)
    assert rc != 0
    p = subprocess.run(_cmd(out, ["policy.name=proportional", f"runtime.num_workers={then}", batch]) + ["--resume"],
                       env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert f"the checkpoint was written by {first} workers, this run has {then}" in log
    summary = _check_finished(out)
    assert summary["restores"] == 1 and summary["workers"] == then
    ledger = {t: row["train_tokens"] for t, row in summary["ledger"].items()}
    assert ledger == _consumed_prefix_tokens(env, summary)


@pytest.mark.slow
@pytest.mark.heavy  # CI runs the two worker-count resumes above; this one adds Ray Train's own placement
@pytest.mark.timeout(900)
def test_elastic_run_starts_with_the_workers_it_can_place(tmp_path: Path, env: dict) -> None:
    """``runtime.num_workers=[1, 2]`` where only one 1.5-CPU worker fits on
    2 CPUs: Ray Train's elastic group starts with one instead of waiting
    for two, and the run finishes with its ledger exact."""
    out = tmp_path / "elastic"
    extra = ["policy.name=uniform", "runtime.num_workers=[1, 2]", "runtime.cpus_per_worker=1.5",
             "train.global_batch_tokens=1024"]
    p = subprocess.run(_cmd(out, extra), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    summary = _check_finished(out)
    assert summary["workers"] == 1
    ledger = {t: row["train_tokens"] for t, row in summary["ledger"].items()}
    assert ledger == _consumed_prefix_tokens(env, summary)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two runs: the failed one and its resumption
def test_mixer_actor_lost_for_good_fails_with_its_checkpoint_and_resumes(tmp_path: Path, env: dict) -> None:
    """The mixer actor killed for good mid-run (``ray.kill(no_restart=True)``:
    what exhausted restarts or a lost node leave). The run stops at once with
    an error naming the actor (no hang, no retry), its MLflow run FAILED
    with that error, and its last checkpoint on disk, complete; ``--resume``
    continues from that checkpoint with a new actor and finishes, each step
    once in MLflow. The run joins a Ray started here (RAY_ADDRESS), so that
    this test can reach its actor."""
    import ray
    from mlflow.tracking import MlflowClient

    from raymix.loop.checkpoint import read_state
    from raymix.mixer import MIXER_NAMESPACE

    ray.init(num_cpus=2, object_store_memory=200_000_000, include_dashboard=False)
    try:
        # A client joining a cluster needs its token mode said (ray.init set it here).
        run_env = {**env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
                   "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}

        def kill_mixer() -> None:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == MIXER_NAMESPACE]
            assert len(names) == 1, names
            ray.kill(ray.get_actor(names[0], namespace=MIXER_NAMESPACE), no_restart=True)

        out = tmp_path / "mixer-lost"
        t0 = time.monotonic()
        rc, log = _run_and_kill(out, run_env, None, ["policy.name=proportional"], inject=kill_mixer)
        assert rc == 2, log[-4000:]
        error = [ln for ln in log.splitlines() if ln.startswith("raymix: error:")]
        assert error and "the mixer actor mixer-" in error[0] and "cannot be restarted" in error[0], log[-4000:]
        assert "--resume" in error[0]
        print(f"failed {time.monotonic() - t0:.0f}s after the start: {error[0]}")
        assert not (out / "summary.json").exists()
        saved = json.loads((out / "run.json").read_text())
        client = MlflowClient(saved["mlflow_tracking_uri"])
        failed = client.get_run(saved["mlflow_run_id"])
        assert failed.info.status == "FAILED"
        assert "the mixer actor mixer-" in failed.data.tags["raymix.error"]
        # The last checkpoint is complete and loadable, and before the kill.
        checkpoints = sorted(d for d in (out / "ray").glob("train-*/checkpoint_*") if d.is_dir())
        assert checkpoints and all((d / MANIFEST_FILE).exists() for d in checkpoints), checkpoints
        state = read_state(str(checkpoints[-1]))
        assert CHECKPOINT <= state["train_tokens"] < BUDGET and state["reason"] == "periodic"

        p = subprocess.run(_cmd(out, resume=True), env=run_env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert "restored from checkpoint" in p.stdout + p.stderr
    finally:
        ray.shutdown()
    summary = _check_finished(out)
    assert summary["restores"] == 1 and summary["mixer_restarts"] == 0
    assert "raymix.error" not in client.get_run(saved["mlflow_run_id"]).data.tags
    _check_each_step_once(summary)
