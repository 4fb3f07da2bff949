"""``python -m raymix.bench gpu``, the GPU check: its FLOPs arithmetic, its
device table, and its CPU stand-in run end to end (a tiny Qwen3 on packed
rows through raymix's driver, uniform and ADAPT in-process), so the script a
GPU machine runs cannot rot where no GPU is. Nothing here asserts on speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raymix.bench import main
from raymix.bench.gpu import QWEN3_0_6B, QWEN3_TINY, markdown
from raymix.flops import ModelFlops, peak_bf16_flops

RAY = ["--set", "runtime.num_cpus=2", "--set", "runtime.object_store_memory=200000000",
       "--set", "runtime.data_concurrency=1"]


@pytest.mark.parametrize("shape", [QWEN3_TINY, dict(QWEN3_0_6B, num_hidden_layers=2, vocab_size=1000)])
def test_parameter_count_matches_the_built_model(shape: dict) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**dict({"vocab_size": 512}, **shape))
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    flops = ModelFlops.from_config(config)  # built on the meta device
    assert flops == ModelFlops.of(model)
    assert flops.parameters == sum(p.numel() for p in model.parameters())
    assert flops.output == config.vocab_size * config.hidden_size and flops.body == flops.parameters - flops.output


def test_qwen3_0_6b_flops_and_peaks() -> None:
    from transformers import Qwen3Config

    flops = ModelFlops.from_config(Qwen3Config(**QWEN3_0_6B))
    assert flops.parameters == 596_049_920  # Qwen3-0.6B: 0.6B with the tied embedding, 0.44B without
    assert flops.output == 151_936 * 1024 and flops.body == 596_049_920 - 151_936 * 1024
    assert flops.attention_width == 16 * 128 == 2048  # wider than hidden (1024) in this shape
    assert flops.palm_per_token(2048) == 6 * 596_049_920 + 12 * 28 * 2048 * 2048
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("Tesla T4") is None


def test_gpu_is_run_on_request_only(tmp_path: Path, monkeypatch) -> None:
    """``python -m raymix.bench`` with no name runs the CPU benchmarks, not the GPU check."""
    import raymix.bench as bench

    called = []
    monkeypatch.setattr(bench, "BENCHMARKS", {k: (lambda *a, k=k, **kw: called.append(k) or {})
                                              for k in bench.BENCHMARKS})
    monkeypatch.setattr(bench, "MODULES", {})
    assert main(["--output", str(tmp_path)]) == 0
    assert "gpu" not in called and "throughput" in called


@pytest.mark.ray
@pytest.mark.slow  # about 1 minute alone (Ray, data preparation, two runs); 4 on a busy 2-core machine
@pytest.mark.heavy  # CI's 90 minutes go to the fault, resume and concurrency tests; the fast tests above keep the FLOPs and shapes
@pytest.mark.timeout(900)
def test_cpu_stand_in_writes_its_figures(tmp_path: Path, monkeypatch) -> None:
    import ray

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    try:
        rc = main(["gpu", "--output", str(out), *RAY, "--set", "runtime.num_workers=0",
                   "--set", "data.sources=[{kind: synthetic, scale: 0.02}]", "--set", "model.vocab_size=512"])
    finally:
        ray.shutdown()
    assert rc == 0
    r = json.loads((out / "bench.json").read_text())["gpu"]
    assert not r["cuda"] and r["peak_bf16_flops"] is None and r["row_length"] == 256
    # In-process: no FSDP (it shards over workers); on CPU the fast kernels are compiled layers alone.
    assert set(r["runs"]) == {"ddp-uniform", "ddp-uniform (compile)", "ddp-adapt (compile)"}
    for name, v in r["runs"].items():
        assert "error" not in v, (name, v)
        row = v["runs"][0]
        assert row["batch_layout"] == "packed" and row["steps"] >= 2, name
        assert v["tokens_per_second"] > 0 and 0.5 < v["utilisation"] <= 1 and v["mfu"] is None
        # The model FLOPs each run needed: fewer than the usual estimate
        # (the output layer at completion positions, attention within examples).
        assert 0 < v["model_flops_per_token"] < r["palm_flops_per_token"] and row["loop_mfu"] is None
        assert 0 < v["batch_time_share"] < 1
        assert v["peak_memory_gib"] == 0  # no CUDA
    assert r["runs"]["ddp-adapt (compile)"]["meta_time_share"] > 0
    assert r["runs"]["ddp-uniform"]["meta_time_share"] == 0 and r["runs"]["ddp-uniform"]["kernels"] == "sdpa"
    assert r["fast_kernels"] == "compile" and r["fast_kernels_speedup"] > 0 and r["adapt_overhead"] is not None
    assert r["cases"] == list(r["runs"]) and not (out / "gpu" / "partial.json").exists()  # complete: bench.json has it
    # The run's summary.json and its MLflow run carry the utilisation and the peak memory.
    from mlflow.tracking import MlflowClient

    summary = json.loads((out / "gpu" / "ddp-uniform-0" / "summary.json").read_text())
    assert summary["utilisation"] == r["runs"]["ddp-uniform"]["utilisation"]
    assert summary["peak_device_memory_bytes"] == 0 and summary["batch_layout"] == "packed"
    metrics = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["utilisation"] == pytest.approx(summary["utilisation"])
    assert metrics["model_flops_per_token"] == pytest.approx(summary["model_flops_per_token"])
    assert summary["mfu"] is None and "mfu" not in metrics  # no GPU peak on CPU
    md = (out / "bench.md").read_text()
    assert "| ddp-adapt (compile) |" in md and "ADAPT's overhead" in md and "CPU stand-in" in md
    assert "compile against sdpa" in md
    assert markdown(r)[0] == "## gpu\n"


def _gpu_result() -> dict:
    run = {"parallelism": "ddp", "policy": "uniform", "runs": [], "tokens_per_second": 32000.0, "mfu": 0.139,
           "peak_memory_gib": 51.0, "utilisation": 0.998, "meta_time_share": 0.0}
    return {"device": "NVIDIA H200", "cuda": True, "peak_bf16_flops": 989e12, "model": "Qwen3-0.6B shape",
            "parameters": 596_049_920, "model_flops_per_token": 4.28e9, "row_length": 2048, "micro_batch_size": 871,
            "mean_example_tokens": 18.2, "budget_tokens": 635_375, "repeats": 1, "workers": 1,
            "runs": {"ddp-uniform": run, "ddp-adapt": dict(run, policy="adapt", meta_time_share=0.13)},
            "adapt_overhead": 0.198,
            "device_note": "/opt/venv/bin/python /srv/x.py --temp-dir=/tmp/ray sqlite:////tmp/a-b/mlflow.db runs/gpu-check"}


def test_a_copied_tree_names_its_commit_and_a_gpu_machines_json_renders(tmp_path: Path, monkeypatch) -> None:
    """RAYMIX_COMMIT wins over git (a GPU machine's copy of the tree may carry
    a stale history), and ``--render`` writes the Markdown of that machine's
    bench.json here without running anything."""
    import raymix.bench as bench

    monkeypatch.setattr(bench, "BENCHMARKS", dict(bench.BENCHMARKS, gpu=lambda *a, **kw: _gpu_result()))
    monkeypatch.setenv("RAYMIX_COMMIT", "abc1234")
    assert main(["gpu", "--output", str(tmp_path / "device")]) == 0
    written = json.loads((tmp_path / "device" / "bench.json").read_text())
    assert written["commit"] == "abc1234" and written["commits"] == {"gpu": "abc1234"}
    monkeypatch.delenv("RAYMIX_COMMIT")
    report = tmp_path / "reports" / "gpu_check.md"
    assert main(["--render", str(tmp_path / "device" / "bench.json"), "--output", str(tmp_path / "here"),
                 "--report", str(report)]) == 0
    md = report.read_text()
    assert md == (tmp_path / "device" / "bench.md").read_text() == (tmp_path / "here" / "bench.md").read_text()
    assert "commit `abc1234`" in md and "| ddp-adapt | 32,000 | 13.9% | 51.0 |" in md and "+19.8%" in md
    # The figures beside the report, for a later --merge; as in every
    # bench.json, absolute paths keep their names only (the device's
    # folders are no part of a published report), relative ones are kept.
    assert json.loads(report.with_suffix(".json").read_text()) == written
    assert written["gpu"]["device_note"] == "python x.py --temp-dir=ray sqlite:///mlflow.db runs/gpu-check"
    (tmp_path / "bad.json").write_text('{"gpu": {}}')
    assert main(["--render", str(tmp_path / "bad.json"), "--output", str(tmp_path / "x")]) == 2


def test_model_ceiling_script_runs_its_cpu_path(tmp_path: Path) -> None:
    """scripts/gpu_model_ceiling.py (the GPU check's yardstick) on its tiny CPU stand-in."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ceiling.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_model_ceiling.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["device"] == "CPU" and len(r["variants"]) == 8
    for name, v in r["variants"].items():
        assert "error" not in v, (name, v)
        if "flex" in name:  # no flex attention backward on CPU
            assert v == {"skipped": "torch's flex attention has no backward on CPU"}
            continue
        assert v["tokens_per_second"] > 0 and 0 < v["mfu"] < v["mfu_palm"]


def test_counted_flops_render_beside_the_usual_estimate(tmp_path: Path) -> None:
    """A result with per-run model FLOPs shows them, their MFU and the usual
    (PaLM) estimate's MFU side by side; a failed case keeps the table's columns."""
    r = _gpu_result()
    del r["model_flops_per_token"]
    r["palm_flops_per_token"] = 4.99e9
    r["runs"]["ddp-uniform"].update(model_flops_per_token=2.95e9, mfu=0.0955, mfu_palm=0.1615, batch_time_share=0.004)
    r["runs"]["ddp-adapt"] = {"parallelism": "ddp", "policy": "adapt", "error": "OutOfMemoryError: CUDA | out"}
    md = "\n".join(markdown(r))
    assert "| ddp-uniform | 32,000 | 2.95 | 9.6% | 16.2% | 51.0 | 0.998 | 0.00 | 0.004 |" in md
    assert "4.99 GFLOP per token" in md
    failed = next(line for line in md.splitlines() if line.startswith("| ddp-adapt"))
    assert failed.count("|") == md.splitlines()[[i for i, x in enumerate(md.splitlines()) if x.startswith("| run")][0]].count("|")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_recount_gives_an_earlier_results_runs_their_model_flops(tmp_path: Path, monkeypatch) -> None:
    """scripts/gpu_check_recount.py: the check's pool prepared again, its
    uniform draws counted, and a GPU result's tokens/s turned into MFU; a
    result from another pool (micro-batch, budget) is refused by name."""
    import subprocess
    import sys

    import ray

    from raymix.bench.gpu import GPU_SIZES, check_pool
    from raymix.config import load_config

    monkeypatch.setenv("RAYMIX_CACHE", str(tmp_path / "cache"))
    sets = [*RAY[1::2], "data.sources=[{kind: synthetic, scale: 0.02}]", "model.vocab_size=512"]
    try:
        _, _, _, mbs, budget = check_pool(load_config(None, sets), tmp_path / "pool", dict(GPU_SIZES))
    finally:
        ray.shutdown()
    r = _gpu_result()
    r.update(micro_batch_size=mbs, budget_tokens=budget)
    (tmp_path / "bench.json").write_text(json.dumps({"gpu": r}))
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "scripts" / "gpu_check_recount.py"), str(tmp_path / "bench.json"),
           "--work", str(tmp_path / "work"), *[a for x in sets for a in ("--set", x)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["tokens"] >= budget and 0 < out["completion_share"] < 1 and out["attention_pairs_per_token"] >= 1
    assert out["model_flops_per_token"] < out["palm_flops_per_token"]
    run = out["runs"]["ddp-uniform"]
    assert run["mfu"] == pytest.approx(32000.0 * out["model_flops_per_token"] / 989e12, rel=1e-12)
    assert out["runs"]["ddp-adapt"]["counts"].endswith("(an approximation: the run's mixture moved)")
    r.update(micro_batch_size=mbs + 1)
    (tmp_path / "bench.json").write_text(json.dumps({"gpu": r}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode != 0 and "pass the check's own --set" in proc.stderr


def test_a_check_cut_short_leaves_the_cases_it_finished(tmp_path: Path, monkeypatch) -> None:
    """After each case the figures so far go to ``partial.json`` (a bench.json
    that ``--render`` reads): a device call that ends during a later case
    (its time limit kills the process) keeps them, and the report names the
    cases not run. Preparation, runs and measurement are stand-ins here."""
    import raymix.bench.gpu as gpu
    import raymix.driver
    from raymix.config import load_config

    class Killed(BaseException):  # as the time limit's signal: nothing in the check catches it
        pass

    monkeypatch.setenv("RAYMIX_COMMIT", "abc1234")
    monkeypatch.setattr(gpu, "check_pool", lambda cfg, out, sizes: (None, None, 18.0, 10, 100))
    monkeypatch.setattr(gpu, "write_model", lambda *a, **kw: __import__("transformers").Qwen3Config(
        **dict(QWEN3_TINY, vocab_size=64)))
    done: list = []

    def run(cfg, out):
        if len(done) == 2:
            raise Killed
        done.append(out.name)
        return {"n": len(done)}

    monkeypatch.setattr(raymix.driver, "run", run)
    monkeypatch.setattr(gpu, "_measure", lambda s, palm, peak: {
        "tokens_per_second": 100.0 * s["n"], "model_flops_per_token": 1e6, "peak_memory_gib": 0.0,
        "utilisation": 0.99, "meta_time_share": 0.0, "batch_time_share": 0.01})
    out = tmp_path / "gpu"
    out.mkdir()
    with pytest.raises(Killed):
        gpu.bench_gpu(load_config(None, ["runtime.num_workers=0"]), out, 1)
    assert done == ["ddp-uniform-0", "ddp-uniform-compile-0"]
    partial = json.loads((out / "partial.json").read_text())
    assert partial["commit"] == "abc1234" and list(partial["gpu"]["runs"]) == ["ddp-uniform", "ddp-uniform (compile)"]
    assert partial["gpu"]["fast_kernels_speedup"] == 2.0 and partial["gpu"]["adapt_overhead"] is None
    report = tmp_path / "gpu_check.md"
    assert main(["--render", str(out / "partial.json"), "--output", str(tmp_path / "r"), "--report", str(report)]) == 0
    assert "Not run (the check ended before them): ddp-adapt (compile)." in report.read_text()


def test_a_device_name_is_not_matched_inside_another_model_name() -> None:
    """The peak table is looked up by substring: an L40 (181 TFLOP/s dense
    bf16) must not get the L4's 121, and an NVL board (H100 NVL, H200 NVL:
    835 TFLOP/s dense bf16) must not get the SXM part's 989; names as
    ``torch.cuda.get_device_name`` gives them."""
    assert peak_bf16_flops("NVIDIA L40") == 181e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA H100 NVL") == 835e12 and peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA GH200 480GB") == 989e12  # Grace Hopper: the H100/H200 SXM's tensor cores
    assert peak_bf16_flops("NVIDIA A10") is None and peak_bf16_flops("NVIDIA A100 80GB PCIe") == 312e12
