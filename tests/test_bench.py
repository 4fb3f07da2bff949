"""raymix.bench's task_scaling, data_plane and memory benchmarks at tiny
sizes: they run through the command line and write their figures. Nothing
here asserts on speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymix.bench import main
from raymix.bench.memory import TreeSampler, _self_peak_mib

RAY = ["--set", "runtime.num_cpus=2", "--set", "runtime.object_store_memory=200000000",
       "--set", "runtime.data_concurrency=1"]


def test_unknown_benchmark_and_bad_task_counts_are_refused(tmp_path: Path) -> None:
    assert main(["nope", "--output", str(tmp_path)]) == 2
    assert main(["task_scaling", "--tasks", "8", "--output", str(tmp_path)]) == 2
    assert main(["task_scaling", "--tasks", "0,8", "--output", str(tmp_path)]) == 2
    assert main(["task_runs", "--run-tasks", "20", "--output", str(tmp_path)]) == 2
    assert main(["task_runs", "--run-tasks", "20", "--adapt-tasks", "", "--output", str(tmp_path)]) == 2
    assert main(["task_runs", "--run-tasks", "20,1000", "--examples", "3999", "--output", str(tmp_path)]) == 2
    assert main(["task_runs", "--run-tasks", "20,100", "--adapt-tasks", "1000", "--output", str(tmp_path)]) == 2
    assert main(["task_runs", "--run-tasks", "20,100", "--adapt-tasks", "x", "--output", str(tmp_path)]) == 2


def test_tree_sampler_counts_descendants() -> None:
    grandchild = "import time; b = b'x' * (64 * 2**20); time.sleep(2)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    proc = subprocess.Popen([sys.executable, "-c", child])
    sampler = TreeSampler(proc.pid, interval=0.05).start()
    proc.wait()
    time.sleep(0.1)
    mem = sampler.stop()
    assert mem["samples"] > 0 and mem["max_processes"] >= 2
    peak = mem["peak_mib"]
    assert peak["total"]["rss"] >= 64 and peak["total"]["processes"] >= 2
    assert peak["driver"]["rss"] < peak["total"]["rss"]  # the grandchild's bytes are not the root's
    assert peak["other"]["rss"] >= 64 and peak["total"]["pss"] > 0
    assert {p["group"] for p in mem["processes"]} >= {"driver", "other"}
    assert _self_peak_mib() > 0


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_task_scaling_and_data_plane_write_their_figures(tmp_path: Path, monkeypatch) -> None:
    import ray

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    try:
        rc = main(["task_scaling", "data_plane", "--output", str(out), "--tasks", "4,8", "--repeats", "1",
                   "--warmup", "0", *RAY, "--set", "data.sources=[{kind: synthetic, scale: 0.02}]",
                   "--set", "model.vocab_size=512"])
    finally:
        ray.shutdown()
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())

    ts = res["task_scaling"]
    assert ts["task_counts"] == [4, 8]
    for n in ("4", "8"):
        row = ts["runs"][n]
        assert row["tasks"] == int(n) and row["pool_tokens"] > 0
        assert row["meta_step"]["n"] == 1 and row["meta_step"]["median"] > 0
        assert row["mixer_report"]["median"] > 0 and row["meta_tokens_per_step"] > 0
        assert row["val_tasks_read"] == int(n)  # small pools read every task's validation loss
    assert ts["meta_step_ratio"] > 0 and ts["mixer_report_ratio"] > 0 and isinstance(ts["target_met"], bool)

    dp = res["data_plane"]
    assert dp["rows"] > 0 and dp["tokens"] > 0 and dp["tokens_match"]
    for path in ("ray_data", "plain"):
        for metric in ("seconds", "rows_per_second", "tokens_per_second"):
            assert dp["summary"][path][metric]["median"] > 0
    assert dp["summary"]["cache_hit"]["seconds"]["median"] > 0
    assert dp["ratio_tokens_per_second"] > 0
    assert not (out / "data_plane" / "scratch").exists()  # cold caches are removed

    md = (out / "bench.md").read_text()
    assert "## task_scaling" in md and "## data_plane" in md


def test_policy_cost_refuses_a_static_or_unknown_policy(tmp_path: Path) -> None:
    assert main(["policy_cost", "--policies", "proportional", "--output", str(tmp_path)]) == 2
    assert main(["policy_cost", "--policies", "adapt,nope", "--output", str(tmp_path)]) == 2


@pytest.mark.slow
@pytest.mark.heavy  # three runs; CI's time goes to the fault and resume tests
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_policy_cost_writes_per_update_figures(tmp_path: Path, monkeypatch) -> None:
    """ODM (mixer-side only) and ADAPT (a worker-side signal) against
    uniform at a tiny budget in-process: each row has its updates and
    per-update costs, and ADAPT's meta tokens are counted."""
    import ray

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    try:
        rc = main(["policy_cost", "--policies", "odm,adapt", "--output", str(out), "--repeats", "1", *RAY,
                   "--set", "data.sources=[{kind: synthetic, scale: 0.02}]", "--set", "model.vocab_size=512",
                   "--set", "budget.tokens=12000", "--set", "runtime.num_workers=0", "--set", "eval.suite=null",
                   "--set", "eval.curve_points=0", "--set", "policy.adapt.every_steps=2",
                   "--set", "policy.adapt.warmup_steps=2", "--set", "train.sync_every=2"])
    finally:
        ray.shutdown()
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())["policy_cost"]
    assert set(res["policies"]) == {"odm", "adapt"}
    odm, adapt = res["policies"]["odm"], res["policies"]["adapt"]
    assert odm["updates"] >= 1 and odm["meta_tokens"] == 0 and odm["meta_tokens_per_update"] == 0
    assert adapt["updates"] >= 1 and adapt["meta_tokens_per_update"] > 0 and adapt["signal_seconds_per_update"] > 0
    assert "| adapt |" in (out / "bench.md").read_text()


def test_startup_splits_a_summary_into_its_parts() -> None:
    from raymix.bench.throughput import STARTUP_PARTS, markdown, startup

    summary = {"wall_seconds": 30.0,
               "phase_seconds": {"tracking_setup": 1.0, "ray_init": 2.0, "tokenizer": 0.5, "shards": 1.5,
                                 "model_init": 1.0, "ray_train": 20.0, "lm_eval": 3.0, "log_summary": 1.0},
               "ray_train_seconds": {"worker_start": 6.0, "worker_setup": 4.0, "train_loop": 8.0,
                                     "checkpoints": 1.0, "final_eval": 0.5, "report_and_shutdown": 1.5}}
    parts = startup(summary)
    assert set(parts) == set(STARTUP_PARTS)
    # Preparation is every phase but Ray's start, training, lm-eval, tracking setup and logging.
    assert parts["prepare"] == pytest.approx(3.0)
    assert (parts["ray_init"], parts["worker_start"], parts["lm_eval"]) == (2.0, 6.0, 3.0)
    run = {"tokens": 1, "steps": 1, "seconds": 1.0, "tokens_per_second": 100.0, "utilisation": 1.0,
           "startup": parts}
    lines = markdown({"model": "m", "micro_batch_size": 1, "torch_threads": 1, "budget_tokens": 1, "repeats": 1,
                      "median_tokens_per_second": {"plain": 100.0, "raymix_1w": 100.0},
                      "min_max_tokens_per_second": {"plain": (100.0, 100.0), "raymix_1w": (100.0, 100.0)},
                      "startup_median_seconds": {"raymix_1w": parts}, "runs": {"raymix_1w": [run]}})
    assert any(line.startswith("| raymix_1w | 30.0 | 2.0 | 3.0 | 6.0 | 4.0 |") for line in lines)


def test_sweeps_refuses_a_missing_space(tmp_path: Path) -> None:
    assert main(["sweeps", "--space", str(tmp_path / "nope.yaml"), "--output", str(tmp_path)]) == 2


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_sweeps_measures_a_sweep_in_process_and_on_workers(tmp_path: Path, monkeypatch) -> None:
    """The smoke space through ``python -m raymix.sweep``, in-process and with
    2 workers: the efficiency is the trials' loop seconds over the sweep's
    wall, and the trials' parts come from their summaries."""
    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    space = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml"
    out = tmp_path / "bench"
    assert main(["sweeps", "--space", str(space), "--output", str(out), "--repeats", "1",
                 "--set", "runtime.num_cpus=2"]) == 0
    r = json.loads((out / "bench.json").read_text())["sweeps"]
    assert set(r["median"]) == {"in-process", "2 workers"}
    for mode, runs in r["runs"].items():
        (one,) = runs
        assert one["trials"] == 2 and one["trials_timed"] == 2
        assert 0 < one["efficiency"] < 1 and one["efficiency"] == pytest.approx(
            one["trial_loop_seconds"] / one["sweep_wall_seconds"])
        parts = one["trial_parts_seconds"]
        assert parts["train_loop"] > 0 and parts["wall"] <= one["sweep_wall_seconds"]
        if mode == "2 workers":
            assert parts["worker_start"] > 0 and parts["worker_setup"] > 0
    assert "## sweeps" in (out / "bench.md").read_text()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_task_runs_counts_the_examples_each_evaluation_reads(tmp_path: Path, monkeypatch) -> None:
    """Two tiny whole runs (4 and 8 tasks of the same 80 examples): their
    figures, and the examples evaluated per run from their pool statistics."""
    import ray

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    try:
        rc = main(["task_runs", "--run-tasks", "4,8", "--adapt-tasks", "8", "--repeats", "2", "--examples", "80",
                   "--warmup", "1", "--output", str(out), *RAY,
                   "--set", "runtime.num_workers=0", "--set", "budget.tokens=600", "--set", "model.vocab_size=512",
                   "--set", "eval.max_test_examples=3", "--set", "eval.curve_points=2",
                   # bounds in all that bind: one prompt and one curve example per task
                   "--set", "eval.max_exact_match_prompts=4", "--set", "eval.curve_max_examples=4",
                   # ADAPT's meta steps within so small a budget (the uniform runs ignore these)
                   "--set", "policy.adapt.every_steps=1", "--set", "policy.adapt.warmup_steps=0"])
    finally:
        ray.shutdown()
    assert rc == 0
    r = json.loads((out / "bench.json").read_text())["task_runs"]
    assert r["budget_tokens"] == 600
    for n, per_task in (("4", 20), ("8", 10)):
        x = r["runs"][n]
        val = test = max(1, per_task // 10)  # write_synthetic_tasks: a tenth each, at least one
        assert (x["val_examples"], x["test_examples"]) == (int(n) * val, int(n) * test)
        assert x["exact_match_prompts"] == int(n)  # eval.max_exact_match_prompts=4: one per task (4 x 2 unbounded)
        assert x["final_eval_examples"] == x["val_examples"] + x["test_examples"] + x["exact_match_prompts"]
        # eval.curve_max_examples=4: one validation and one test example per task at each of 3 points
        assert x["curve_examples"] == 3 * 2 * int(n) and x["train_tokens"] >= 600
        assert x["final_eval_ms_per_example"] == pytest.approx(1e3 * x["final_eval_seconds"] / x["final_eval_examples"])
        assert x["loss_eval_ms_per_example"] > 0 and x["generation_ms_per_prompt"] > 0
    assert r["runs"]["4"]["ratios"]["final_eval_ms_per_example"] == 1.0
    # Medians over the two repeats: each figure lies within its runs' range.
    for x in r["runs"].values():
        assert len(x["loop_seconds_all"]) == 2 and min(x["loop_seconds_all"]) <= x["loop_seconds"] <= max(
            x["loop_seconds_all"])
    (a,) = r["adapt"].values()
    assert r["policy"] == "uniform" and list(r["adapt"]) == ["8"] and a["meta_seconds"] > 0
    assert a["loop_vs_policy"] == pytest.approx(a["loop_seconds"] / r["runs"]["8"]["loop_seconds"])
    assert a["loop_without_meta_vs_policy"] < a["loop_vs_policy"]
    assert len(a["loop_vs_policy_by_round"]) == 2
    # One untimed run first; every other round in the reverse order, so no
    # count always runs last in its round.
    assert r["warmup_runs"] == 1 and (out / "task_runs" / "warmup" / "r0" / "run" / "summary.json").is_file()
    assert r["run_order"] == ["T4", "T8", "T8-adapt", "T8-adapt", "T8", "T4"]
    # One tokenizer, so one model, at every task count (and for ADAPT's runs).
    sizes = {json.loads(c.read_text())["vocab_size"] for c in out.glob("task_runs/T*/r*/run/init_model/config.json")}
    assert sizes == {r["shared_tokenizer_vocab"]}
    md = (out / "bench.md").read_text()
    assert "per example" in md and "ADAPT against uniform" in md and "one tokenizer of" in md
    assert "every other round in the reverse order, after 1 untimed run(s) at 4 tasks)" in md


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_utilisation_counts_layouts_and_merge_keeps_an_earlier_section(tmp_path: Path, monkeypatch) -> None:
    """``utilisation`` on a tiny embedded pool: the same drawn tokens under
    each layout, packing computing fewer positions than padding and CPU
    widths no more than CUDA's; then ``data_plane`` run with ``--merge``
    keeps that section, naming the commit it was measured on."""
    import ray

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAYMIX_NI_SAMPLE", raising=False)
    tiny = [*RAY, "--set", "data.sources=[{kind: synthetic, scale: 0.02}]", "--set", "model.vocab_size=512"]
    try:
        assert main(["utilisation", "--output", str(tmp_path / "u"), *tiny]) == 0
        first = json.loads((tmp_path / "u" / "bench.json").read_text())
        pools = first["utilisation"]["pools"]
        assert list(pools) == ["embedded default", "embedded default, GPU check sizes"]
        u, gpu = pools.values()
        assert not first["utilisation"]["ni_sample"] and u["tasks"] == 23
        util, computed = u["utilisation"], u["computed_positions"]
        assert computed["padded"] > computed["packed, CUDA widths (x8)"] >= computed["packed, CPU widths"] >= u[
            "real_tokens"] > 0
        assert util["packed, CPU widths"] == pytest.approx(u["real_tokens"] / computed["packed, CPU widths"])
        # The positions-only layout computes the positions of the masked one at the same widths.
        assert computed["packed, positions only (x8)"] == computed["packed, CUDA widths (x8)"]
        assert gpu["micro_batch_size"] == 871 and gpu["pack_length"] == 2048 and gpu["steps"] == 40
        assert gpu["utilisation"]["packed, positions only (x8)"] > 0.95  # 18-token examples fill 2,048-token rows
        assert set(gpu["host_ms_per_step"]) == {"draw", *computed} and min(gpu["host_ms_per_step"].values()) > 0
        # As a bench.json written before per-section commits were recorded:
        # the section falls back to the file's commit.
        first["commit"] = "abc1234"
        del first["commits"]
        prior = tmp_path / "prior.json"
        prior.write_text(json.dumps(first))
        assert main(["data_plane", "--output", str(tmp_path / "d"), "--repeats", "1", "--warmup", "0",
                     "--merge", str(prior), "--report", str(tmp_path / "bench.md"), *tiny]) == 0
        assert main(["data_plane", "--output", str(tmp_path / "e"), "--merge", str(tmp_path / "nope.json")]) == 2
    finally:
        ray.shutdown()
    merged = json.loads((tmp_path / "d" / "bench.json").read_text())
    assert merged["utilisation"] == first["utilisation"] and "data_plane" in merged
    assert merged["commits"]["utilisation"] == "abc1234" and merged["commits"]["data_plane"] == merged["commit"]
    md = (tmp_path / "bench.md").read_text()
    assert "## utilisation" in md and "## data_plane" in md and "measured on commit `abc1234`" in md
    assert "| embedded default, GPU check sizes | 23 | 871 |" in md and "Host time per step" in md
    assert json.loads((tmp_path / "bench.json").read_text()) == merged  # beside the report, for a later --merge


@pytest.mark.parametrize("packing", [True, False])
def test_throughput_runs_each_path_once_per_repeat(tmp_path: Path, monkeypatch, packing: bool) -> None:
    """Packed by default: in-process and 1 worker run packed and padded, 2
    workers packed. With ``train.packing=false`` every path is padded already:
    in-process, 1 and 2 workers, each ``repeats`` times (no padded duplicate
    whose repeats are run and thrown away). Runs and the plain loop are stand-ins."""
    import raymix.bench.throughput as throughput
    import raymix.driver
    import raymix.driver.setup
    from raymix.config import load_config

    class Pool:
        pool_tokens = 1000

    summary = {"train_tokens": 100, "steps": 1, "train_loop_seconds": 1.0, "tokens_per_second": 100.0,
               "utilisation": 1.0, "batch_layout": "x", "wall_seconds": 2.0, "phase_seconds": {},
               "ray_train_seconds": {k: 0.0 for k in ("worker_start", "worker_setup", "train_loop", "checkpoints",
                                                       "final_eval", "report_and_shutdown")}}
    calls: list = []
    monkeypatch.setattr(raymix.driver.setup, "init_ray", lambda cfg: None)
    monkeypatch.setattr(raymix.driver.setup, "prepare_model_and_data", lambda cfg, out: (
        type("Tok", (), {"pad_token_id": 0})(), None, Pool(), "init"))
    monkeypatch.setattr(raymix.driver, "run", lambda cfg, out: calls.append(out.name) or summary)
    monkeypatch.setattr(throughput, "plain_loop", lambda *a: {"tokens_per_second": 100.0, "utilisation": 0.5})
    cfg = load_config(None, [f"train.packing={str(packing).lower()}", "budget.tokens=100"])
    r = throughput.bench_throughput(cfg, tmp_path, 2)
    if packing:
        names = ["raymix_inprocess", "raymix_inprocess_padded", "raymix_1w", "raymix_1w_padded", "raymix_2w"]
    else:
        names = ["raymix_inprocess", "raymix_1w", "raymix_2w"]
    assert calls == [f"{n}-{i}" for n in names for i in range(2)]
    assert list(r["runs"]) == ["plain", *names]
