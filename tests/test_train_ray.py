"""End-to-end runs on a local Ray instance (2 CPUs, fractional workers).

One small pool and model, shared by the tests in this module, so Ray starts
once. Each run checks the contract scripts rely on: summary.json's fields,
the ledger, the budget, and the MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from raymix.config import load_config
from raymix.errors import RaymixError

pytestmark = pytest.mark.ray

SMALL = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=4",
    "model.vocab_size=512",
    "train.micro_batch_size=16",
    "train.sync_every=2",
    "train.log_every=2",
    "eval.max_test_examples=4",
    "eval.max_new_tokens=6",
    "runtime.num_cpus=2",
    "runtime.num_workers=2",
    "runtime.cpus_per_worker=0.5",
    "runtime.object_store_memory=200000000",
    "budget.tokens=6000",
    "eval.suite=null",  # lm-eval scoring is covered by the sweep test
]


def _mlflow_run(summary: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    return client, client.get_run(summary["mlflow_run_id"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ["uniform", "proportional"])
def test_budgeted_run_two_workers(ray_local, tmp_path: Path, policy: str, monkeypatch) -> None:
    from raymix.driver import run

    monkeypatch.chdir(tmp_path)  # a relative --output must work: workers have another cwd

    # uniform without curve evaluations, proportional with 4 of them
    curve = "eval.curve_points=0" if policy == "uniform" else "eval.curve_points=4"
    # proportional also runs the memory-saving path: gradient checkpointing,
    # and accumulation derived from a global batch in tokens (2 micro-batches).
    extra = [] if policy == "uniform" else ["train.gradient_checkpointing=true", "train.global_batch_tokens=8192"]
    cfg = load_config(None, SMALL + [f"policy.name={policy}", curve] + extra)
    summary = run(cfg, "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("policy", "seed", "budget_tokens", "train_tokens", "meta_tokens", "global_batch_tokens",
                "ledger", "val_loss", "worst_val_loss", "mean_val_loss", "test_exact_match",
                "wall_seconds", "tokens_per_second", "mixture_schedule", "mlflow_run_id",
                "mlflow_tracking_uri"):
        assert key in on_disk, key
    assert summary["policy"] == policy
    if policy == "proportional":
        assert summary["global_batch_examples"] == 16 * 2 * 2  # micro-batch x workers x derived accumulation
    ledger_total = sum(row["train_tokens"] for row in summary["ledger"].values())
    assert ledger_total == summary["train_tokens"]
    assert 0 <= summary["train_tokens"] - summary["budget_tokens"] < summary["global_batch_tokens"]
    # Evaluation tokens during training are meta tokens, never train tokens.
    assert summary["meta_tokens"] == sum(row["meta_tokens"] for row in summary["ledger"].values())
    if policy == "uniform":
        assert summary["meta_tokens"] == 0 and summary["curve"] == []
    else:
        assert summary["meta_tokens"] > 0
        points = summary["curve"]
        assert len(points) == 5 and points[0]["train_tokens"] == 0
        assert points[-1]["train_tokens"] == summary["train_tokens"]
        assert points[-1]["worst_val_loss"] < points[0]["worst_val_loss"]
    tasks = list(summary["ledger"])
    assert set(summary["val_loss"]) == set(tasks) and len(tasks) >= 20
    assert summary["worst_val_loss"] == max(summary["val_loss"].values())
    # The schedule is in the format a static mixture accepts, starting at 0.
    offset, weights = summary["mixture_schedule"][0]
    assert offset == 0 and abs(sum(weights.values()) - 1) < 1e-9
    if policy == "proportional":
        sizes = summary["pool"]["tokens_per_task"]
        big, small = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
        assert weights[big] > 10 * weights[small]
        assert summary["ledger"][big]["train_tokens"] > summary["ledger"][small]["train_tokens"]
    # A Hugging Face checkpoint that loads.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["model_dir"])

    client, mlrun = _mlflow_run(summary)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["policy.name"] == policy
    assert mlrun.data.params["budget.tokens"] == "6000"
    assert any(k.startswith("mixture/") for k in mlrun.data.metrics)
    assert any(k.startswith("loss/") for k in mlrun.data.metrics)
    history = client.get_metric_history(summary["mlflow_run_id"], "train/tokens")
    assert len(history) >= 2
    assert mlrun.data.metrics["train_tokens"] == summary["train_tokens"]
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"ledger.json", "mixture_schedule.json", "summary.json", "mixture.png", "config.yaml"} <= artifacts


@pytest.mark.timeout(600)
def test_natural_instructions_pool(ray_local, tmp_path: Path) -> None:
    ni = os.environ.get("RAYMIX_NI_SAMPLE")
    if not ni:
        pytest.skip("RAYMIX_NI_SAMPLE is not set (path to the Natural Instructions sample)")
    from raymix.driver import run

    cfg = load_config(None, SMALL + [
        f"data.sources=[{{kind: natural_instructions, path: {ni}}}]",
        "data.max_seq_len=256",
        "runtime.num_workers=1",
        "budget.fraction=0.2",
        "budget.tokens=null",
    ])
    summary = run(cfg, tmp_path / "ni")
    assert len(summary["ledger"]) == 6
    assert all(t.startswith("task") for t in summary["ledger"])
    assert sum(r["train_tokens"] for r in summary["ledger"].values()) == summary["train_tokens"]
    assert summary["train_tokens"] >= summary["budget_tokens"]
    _, mlrun = _mlflow_run(summary)
    assert mlrun.info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_failed_run_is_marked_failed_and_keeps_output(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from raymix.driver import run

    out = tmp_path / "bad"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = load_config(None, SMALL + ["data.sources=[{kind: jsonl, path: /nonexistent/tasks.jsonl}]"])
    with pytest.raises(RaymixError, match="nonexistent"):
        run(cfg, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "summary.json").exists()
    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raymix").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_cli_refuses_bad_input_before_training(tmp_path: Path, capsys) -> None:
    from raymix.train import main

    assert main(["--set", "policy.name=unifrom", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown policy 'unifrom'" in err and "did you mean 'uniform'" in err
    assert not (tmp_path / "x").exists()
    assert main(["--set", "budget.fraction=0", "--output", str(tmp_path / "y")]) == 2
    assert "budget.fraction must be > 0" in capsys.readouterr().err
    assert main(["--set", "trian.lr=0.1", "--output", str(tmp_path / "z")]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_output_with_finished_run_is_refused(tmp_path: Path) -> None:
    from raymix.driver import run

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RaymixError, match="already holds a finished run"):
        run(load_config(None, SMALL), tmp_path)
    assert (tmp_path / "summary.json").read_text() == "{}"


@pytest.mark.timeout(600)
def test_adapt_run_two_workers(ray_local, tmp_path: Path) -> None:
    """ADAPT end to end: meta signals all-reduced over 2 workers, applied by the
    mixer, meta tokens in the ledger apart from train tokens, signals in MLflow."""
    from raymix.driver import run

    cfg = load_config(None, SMALL + ["policy.name=adapt", "policy.adapt.every_steps=2",
                                     "policy.adapt.warmup_steps=2", "policy.adapt.tasks_per_step=4",
                                     "policy.adapt.lr=0.5"])
    summary = run(cfg, tmp_path / "adapt")
    assert summary["meta_steps"] >= 3
    assert summary["meta_tokens"] > 0
    assert sum(r["train_tokens"] for r in summary["ledger"].values()) == summary["train_tokens"]
    assert sum(r["meta_tokens"] for r in summary["ledger"].values()) == summary["meta_tokens"]
    assert 0 <= summary["train_tokens"] - summary["budget_tokens"] < summary["global_batch_tokens"]
    schedule = summary["mixture_schedule"]
    assert len(schedule) >= 2, "the learned mixture never changed"
    offsets = [o for o, _ in schedule]
    assert offsets == sorted(offsets) and offsets[0] == 0
    first, last = schedule[0][1], schedule[-1][1]
    assert max(abs(first[t] - last[t]) for t in first) > 1e-3
    client, mlrun = _mlflow_run(summary)
    keys = set(mlrun.data.metrics)
    assert "meta/J" in keys and "meta/entropy" in keys and "meta/time_share" in keys
    assert "mixture/kl_uniform" in keys
    # Per-task test loss (the split no policy reads) in summary.json and MLflow, beside validation.
    saved = json.loads((tmp_path / "adapt" / "summary.json").read_text())
    assert set(saved["test_loss"]) == set(saved["val_loss"]) and all(v == v for v in saved["test_loss"].values())
    assert saved["worst_test_loss"] == max(saved["test_loss"].values())
    assert {"worst_test_loss", "mean_test_loss"} <= keys and any(k.startswith("test_loss/") for k in keys)
    assert any(k.startswith("signal/") and k.endswith("/alignment") for k in keys)
    assert any(k.startswith("signal/") and k.endswith("/val_loss") for k in keys)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "meta/J")) >= 3


@pytest.mark.timeout(600)
def test_nonfinite_loss_aborts_with_last_good_checkpoint(ray_local, tmp_path: Path) -> None:
    """A diverging run stops at the first non-finite loss, before that step's
    update, checkpoints the last good state, and fails (no retry, no
    FINISHED MLflow run, no summary)."""
    from mlflow.tracking import MlflowClient

    from raymix.driver import run
    from raymix.loop.checkpoint import read_state

    out = tmp_path / "nan"
    cfg = load_config(None, SMALL + ["train.lr=1e12", "train.grad_clip=0", "train.warmup_fraction=0",
                                     "runtime.max_failures=2", "eval.curve_points=0"])
    with pytest.raises(RaymixError, match=r"training loss became (nan|inf).*last good state.*checkpointed at") as e:
        run(cfg, out)
    ckpt = str(e.value).rsplit("checkpointed at ", 1)[1].strip()
    state = read_state(ckpt)
    assert state["reason"] == "aborted" and state["train_tokens"] < 6000
    import torch

    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()
    client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raymix").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def _periodic_states(out: Path) -> dict[int, dict]:
    """The periodic checkpoints a Ray Train run kept, by step."""
    from raymix.loop.checkpoint import read_state

    states = (read_state(str(m.parent)) for m in (out / "ray").rglob("raymix_manifest.json"))
    return {s["step"]: s for s in states if s["reason"] == "periodic"}


@pytest.mark.timeout(600)
def test_fsdp_run_matches_ddp_two_workers(ray_local, tmp_path: Path) -> None:
    """runtime.parallelism=fsdp end to end on 2 workers, with gradient
    accumulation, clipping, gradient checkpointing, curve points, periodic
    checkpoints and the final evaluation: the same budget accounting, the same
    identity, and (same seed, same data) the same losses and checkpoints as
    the DDP run, up to float32 reduction order."""
    import torch

    from raymix.config import identity_hash
    from raymix.driver import run

    common = SMALL + ["train.grad_accum=2", "train.micro_batch_size=8", "train.grad_clip=0.5"]
    fsdp_cfg = load_config(None, common + ["runtime.parallelism=fsdp", "train.gradient_checkpointing=true"])
    ddp_cfg = load_config(None, common)
    assert identity_hash(fsdp_cfg) == identity_hash(ddp_cfg)
    fsdp = run(fsdp_cfg, tmp_path / "fsdp")
    ddp = run(ddp_cfg, tmp_path / "ddp")
    lr = ddp_cfg.train.lr

    assert 0 <= fsdp["train_tokens"] - fsdp["budget_tokens"] < fsdp["global_batch_tokens"]
    assert sum(r["train_tokens"] for r in fsdp["ledger"].values()) == fsdp["train_tokens"]
    assert fsdp["ledger"] == ddp["ledger"] and fsdp["steps"] == ddp["steps"]
    assert fsdp["mixture_schedule"] == ddp["mixture_schedule"]
    # Training moved the model: the comparison below is not of two untrained models.
    assert fsdp["curve"][-1]["worst_val_loss"] < fsdp["curve"][0]["worst_val_loss"] - 0.5
    # Tolerances. The two runs take the same float32 steps through different
    # reductions (reduce-scatter of shards against an all-reduce), so they
    # drift apart by rounding, amplified over the steps; no closed form bounds
    # that, so the figures below are measured here (8 steps, 2 cores) with a
    # wide margin. Adam adds one discontinuity: its step is about
    # lr * sign(g), so an element whose gradient is within rounding of 0 can
    # step the other way on one side (2 lr apart). The losses do not see such
    # an element (its gradient is ~0, so is their sensitivity to it); the
    # parameters are compared in norm, which admits a few of them.
    # Validation losses (~3-6): measured within 7e-7, abs 1e-4.
    for t, loss in ddp["val_loss"].items():
        assert fsdp["val_loss"][t] == pytest.approx(loss, abs=1e-4), t
    for a, b in zip(fsdp["curve"], ddp["curve"]):
        assert a["train_tokens"] == b["train_tokens"]
        assert a["mean_val_loss"] == pytest.approx(b["mean_val_loss"], abs=1e-4)
    assert fsdp["test_exact_match"].keys() == ddp["test_exact_match"].keys()

    # The checkpoint format is the DDP one (so either can resume the other):
    # full parameter tensors under the same names, optimizer state by index.
    sharded, full = _periodic_states(tmp_path / "fsdp"), _periodic_states(tmp_path / "ddp")
    assert sharded and sharded.keys() == full.keys()
    for step in full:
        a, b = sharded[step], full[step]
        assert a["model"].keys() == b["model"].keys()
        for k, v in b["model"].items():
            assert type(a["model"][k]) is torch.Tensor and a["model"][k].shape == v.shape
            # Rounding drift: measured 3e-7 of a tensor's norm; 1e-4 allows 300x.
            # Sign flips: 2 lr each; 4 lr in norm admits up to 4 of them. A real
            # difference (a wrong shard, a missing average) moves every
            # element by ~lr per step: sqrt(numel) lr in norm, far beyond.
            diff = float((a["model"][k].double() - v.double()).norm())
            assert diff <= 1e-4 * float(v.double().norm()) + 4 * lr, (step, k, diff)
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        assert [g["params"] for g in a["optimizer"]["param_groups"]] == \
            [g["params"] for g in b["optimizer"]["param_groups"]]
        for i, st in b["optimizer"]["state"].items():
            # exp_avg: an average of gradients whose rounding differs by ~1e-6
            # of their scale (measured 6e-7 of the tensor's norm): 1e-3 in norm.
            m_a, m_b = a["optimizer"]["state"][i]["exp_avg"].double(), st["exp_avg"].double()
            assert float((m_a - m_b).norm()) <= 1e-3 * float(m_b.norm()), (step, i)
    # The final model is a full Hugging Face checkpoint that loads.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(fsdp["model_dir"])


@pytest.mark.timeout(300)
def test_preparation_out_of_process_reads_relative_paths_and_raises_the_input_error(ray_local, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """A run on Ray Train workers prepares in a one-off Ray worker process
    (``prepare_out_of_process``): relative paths in the config are the
    user's (the worker starts elsewhere), what it returns is what the
    workers load, and bad input raises the same RaymixError, naming the
    file, as preparing here does; not Ray's wrapper."""
    from raymix.bench.task_scaling import write_synthetic_tasks
    from raymix.driver.setup import prepare_out_of_process

    monkeypatch.chdir(tmp_path)
    write_synthetic_tasks(tmp_path / "src", 3, 20)
    # A cache of its own: the shared one (RAYMIX_CACHE) may hold this pool from an earlier run.
    base = [o for o in SMALL if not o.startswith("data.sources")] + [f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, base + ["data.sources=[{kind: jsonl, path: src}]"])
    phases: dict = {}
    tok_dir, pool, init_dir, tracker = prepare_out_of_process(cfg, tmp_path / "run", phases)
    assert tracker is None  # no MLflow run asked for
    assert pool.tasks == ("t0000", "t0001", "t0002") and not pool.cache_hit
    assert (Path(tok_dir) / "tokenizer.json").exists() and (Path(init_dir) / "config.json").exists()
    assert {"tokenizer", "shards", "model_init", "prepare_process"} <= set(phases)
    assert pool.train_examples().tolist() == [16, 16, 16]  # 20 examples a task: 80% train
    # The process ends with its answer. It loaded torch (the initial model);
    # as a max_calls=1 task after a cold cache's Ray Data run it lived on,
    # titled ray::IDLE (1 GB on the embedded default), owning an object that
    # Ray Data's detached actors still referenced.
    deadline = time.monotonic() + 15
    while (left := _ray_workers_with_torch()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tasks.jsonl").write_text('{"task": "a", "id": "1"\n')  # read there, not here
    bad = load_config(None, base + ["data.sources=[{kind: jsonl, path: bad}]"])
    with pytest.raises(RaymixError, match=r"bad/tasks.jsonl:1: malformed JSON \(line 1, column 24\)") as e:
        prepare_out_of_process(bad, tmp_path / "badrun", {})
    assert type(e.value) is RaymixError  # the cause, not Ray's RayTaskError wrapper


def _ray_workers_with_torch() -> list[str]:
    """Titles of the idle or preparing Ray worker processes on this machine
    that have torch's library mapped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            if title.startswith(("ray::IDLE", "ray::_Preparer")) and "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                found.append(f"{pid} {title}")
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


RUN_WITHOUT_MLFLOW_IN_DRIVER = r"""
import json, sys
from pathlib import Path
from raymix.config import load_config
from raymix.driver import single
from raymix.errors import RaymixError

out, small = Path(sys.argv[1]), json.loads(sys.argv[2])
seen = {}
train_on_workers = single._train_on_workers

def spy(*args, **kwargs):
    seen["mlflow_at_fit"] = "mlflow" in sys.modules
    seen["torch_at_fit"] = "torch" in sys.modules
    return train_on_workers(*args, **kwargs)

single._train_on_workers = spy
(out / "bad").mkdir(parents=True)
(out / "bad" / "tasks.jsonl").write_text('{"task": "a", "id": "1"\n')
summary = single.run_single(load_config(None, small), out / "good")  # first: the failed one ends its run here
seen["mlflow_run_id"] = summary["mlflow_run_id"]
try:
    single.run_single(load_config(None, small + ["data.sources=[{kind: jsonl, path: %s}]" % (out / "bad")]),
                      out / "failed")
except RaymixError as e:
    seen["error"] = str(e)
print(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_driver_of_workers_holds_no_mlflow_while_they_train(tmp_path: Path) -> None:
    """A run on Ray Train workers opens its MLflow run, logs its config and
    pool and prepares in one other process: the driver has imported neither
    MLflow nor torch when the workers start, and the run is complete
    (FINISHED, config, pool statistics and metrics, the summary). A
    preparation that fails leaves the run it opened FAILED with the error,
    found through run.json. In a child process: pytest's holds both."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYMIX_LOCAL_RAY")}
    small = [o for o in SMALL if o != "runtime.num_workers=2"] + ["runtime.num_workers=1", "train.sync_every=4"]
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_MLFLOW_IN_DRIVER, str(tmp_path), json.dumps(small)],
                          capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["mlflow_at_fit"] is False and seen["torch_at_fit"] is False
    assert "bad/tasks.jsonl:1: malformed JSON" in seen["error"]

    good = MlflowClient(f"sqlite:///{tmp_path / 'good' / 'mlflow.db'}").get_run(seen["mlflow_run_id"])
    assert good.info.status == "FINISHED"
    assert good.data.params["policy.name"] == "uniform"
    assert good.data.metrics["pool/num_tasks"] == 23 and good.data.metrics["budget/tokens"] > 0
    assert "train/loss" in good.data.metrics  # the rank-0 worker's
    client = MlflowClient(f"sqlite:///{tmp_path / 'good' / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(good.info.run_id)}
    assert {"config.yaml", "pool_stats.json", "summary.json"} <= names

    failed_record = json.loads((tmp_path / "failed" / "run.json").read_text())
    client = MlflowClient(failed_record["mlflow_tracking_uri"])
    failed = client.get_run(failed_record["mlflow_run_id"])
    assert failed.info.status == "FAILED"
    assert "malformed JSON" in failed.data.tags["raymix.error"]
    assert not (tmp_path / "failed" / "summary.json").exists()
