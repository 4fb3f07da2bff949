"""Out-of-domain evaluation through lm-eval (raymix.eval), offline on CPU.

One tiny Llama checkpoint (llama-micro, a 512-token BPE trained here) is
evaluated untrained and after a short plain-PyTorch fine-tune on the training
tasks that the OOD task max_parity composes (list_max, parity); the trained
model must beat the untrained one on an OOD task. Evaluations use 1 torch
thread, which on a busy 2-core machine is several times faster than 2.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from raymix.errors import RaymixError  # noqa: E402
from raymix.eval import evaluate_checkpoint, load_suite, main  # noqa: E402

LIMIT = 10
OOD_EMBEDDED_TASKS = [t["task"] for t in load_suite("ood_embedded")["tasks"]]


def _tokenizer_and_model(cache: Path):
    from raymix.config import ModelConfig
    from raymix.models import build_model, train_tokenizer
    from raymix.tasks.synthetic import generate_suite

    records = generate_suite(scale=0.02, seed=0)
    texts = lambda: (f"{r.prompt}\nAnswer: {r.completion}" for r in records)  # noqa: E731
    tok, _ = train_tokenizer(texts, 512, cache, "test-eval")
    return tok, build_model(ModelConfig(preset="llama-micro", vocab_size=512), tok, seed=0)


def _finetune(model, tok, steps: int = 300, batch: int = 16, seed: int = 0) -> float:
    """Plain SFT as raymix does it: BOS + prompt + " completion" + EOS, loss on the answer."""
    import torch

    from raymix.models import render_completion, render_prompt
    from raymix.tasks.synthetic import generate_suite

    examples = []
    for r in generate_suite(scale=0.1, seed=1, tasks=["list_max", "parity"]):
        p = [tok.bos_token_id] + tok(render_prompt(tok, r.prompt, False), add_special_tokens=False)["input_ids"]
        c = tok(render_completion(r.completion, False), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((p, c))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = rng.sample(examples, batch)
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            labels[i, len(p):n] = torch.tensor(c)
            mask[i, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"untrained": dir, "trained": dir, "train_loss": float}."""
    import torch

    root = tmp_path_factory.mktemp("eval_ckpt")
    tok, model = _tokenizer_and_model(root / "cache")
    out = {}
    for name in ("untrained", "trained"):
        if name == "trained":
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out["train_loss"] = _finetune(model, tok)
            finally:
                torch.set_num_threads(prev)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("eval-test", artifact_location=(root / "artifacts").as_uri())
    return uri, client.create_run(exp).info.run_id


@pytest.fixture(scope="module")
def untrained_eval(checkpoints, mlflow_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_untrained")
    uri, run_id = mlflow_run
    summary = evaluate_checkpoint(checkpoints["untrained"], "ood_embedded", str(out), limit=LIMIT,
                                  mlflow_run_id=run_id, tracking_uri=uri, threads=1)
    return out, summary


def _finite_summary(summary: dict) -> None:
    assert set(summary["tasks"]) == set(OOD_EMBEDDED_TASKS)
    for task, row in summary["tasks"].items():
        assert row, task
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row.values()), (task, row)
    assert math.isfinite(summary["aggregate"])


def test_ood_embedded_writes_results_and_summary(untrained_eval) -> None:
    out, summary = untrained_eval
    results = json.loads((out / "results.json").read_text())
    on_disk = json.loads((out / "eval_summary.json").read_text())
    assert on_disk == summary
    assert set(OOD_EMBEDDED_TASKS) <= set(results["results"])
    _finite_summary(summary)
    assert summary["suite"] == "ood_embedded" and summary["limit"] == LIMIT and summary["seconds"] > 0
    primaries = [summary["tasks"][t][summary["primary_metrics"][t]] for t in OOD_EMBEDDED_TASKS]
    # A float64 mean of 7 metrics in [0, 1], summed in another order: default rel 1e-6.
    assert summary["aggregate"] == pytest.approx(sum(primaries) / len(primaries))
    # Generated data and rendered lm-eval YAMLs stay beside the results, in the training format.
    task_dir = out / "lm_eval_tasks"
    assert sorted(p.stem for p in task_dir.glob("*.yaml")) == sorted(OOD_EMBEDDED_TASKS)
    rows = [json.loads(line) for line in (task_dir / "data" / "max_parity.jsonl").read_text().splitlines()]
    assert len(rows) == LIMIT and rows[0]["choices"] == [" even", " odd"]
    assert rows[0]["targets"] == [f" {rows[0]['answer']}"]
    sample = json.loads((out / "samples" / "raymix_ood_max_parity.jsonl").read_text().splitlines()[0])
    assert sample["arguments"][0][0] == f"{rows[0]['prompt']}\nAnswer:"


def test_documents_are_deterministic_and_limit_is_a_prefix(tmp_path: Path) -> None:
    from raymix.eval import _prepare_synthetic

    suite = load_suite("ood_embedded")
    a, b = tmp_path / "a", tmp_path / "b"
    for d, n in ((a, 5), (b, 8)):
        d.mkdir()
        _prepare_synthetic(suite, d, n, seed=3)
    first = (a / "data" / "list_sum.jsonl").read_text().splitlines()
    assert first == (b / "data" / "list_sum.jsonl").read_text().splitlines()[:5]


def test_mlflow_run_gets_eval_metrics_and_artifacts(untrained_eval, mlflow_run) -> None:
    from mlflow.tracking import MlflowClient

    uri, run_id = mlflow_run
    _, summary = untrained_eval
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    # The same float64 values through MLflow's store (default rel 1e-6).
    assert metrics["eval/aggregate"] == pytest.approx(summary["aggregate"])
    assert metrics["eval/raymix_ood_max_parity_mc/acc"] == pytest.approx(
        summary["tasks"]["raymix_ood_max_parity_mc"]["acc"])
    names = {a.path for a in client.list_artifacts(run_id, "eval/ood_embedded")}
    assert names == {"eval/ood_embedded/results.json", "eval/ood_embedded/eval_summary.json"}


def test_trained_model_beats_untrained_on_ood(checkpoints, untrained_eval, tmp_path: Path) -> None:
    # Trained on list_max and parity only; the suite's tasks are held out.
    # The untrained model never produces an answer.
    assert checkpoints["train_loss"] < 2.0  # from ln(512) = 6.2 untrained
    _, before = untrained_eval
    after = evaluate_checkpoint(checkpoints["trained"], "ood_embedded", str(tmp_path), limit=LIMIT, threads=1)
    _finite_summary(after)
    gains = {t: after["tasks"][t][m] - before["tasks"][t][m] for t, m in after["primary_metrics"].items()}
    assert max(gains.values()) > 0, gains
    # Which held-out task improves depends on the training trajectory, and so
    # on the CPU's kernels: under ATEN_CPU_CAPABILITY=default max_parity stayed
    # at 0 while it rose under avx2. The suite's aggregate must rise on any CPU.
    assert after["aggregate"] > before["aggregate"], (before["aggregate"], after["aggregate"], gains)


def test_ood_embedded_suite_covers_every_ood_task() -> None:
    from raymix.tasks.synthetic import OOD_TASKS, generate_ood

    tasks = load_suite("ood_embedded")["tasks"]
    gen = {t["ood_task"] for t in tasks if t["template"] == "generate_until"}
    mc = {t["ood_task"] for t in tasks if t["template"] == "multiple_choice"}
    with_choices = {r.task for r in generate_ood(n_per_task=1) if r.choices}
    assert gen == set(OOD_TASKS) and mc == with_choices and len(mc) == 4
    assert all(t["primary_metric"] == ("acc" if t["template"] == "multiple_choice" else "exact_match")
               for t in tasks)


def test_ood_paper_lists_11_tasks_that_render_for_lm_eval(tmp_path: Path) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    from raymix.eval import _prepare_harness

    suite = load_suite("ood_paper")
    assert len(suite["tasks"]) == 11
    assert {t["category"] for t in suite["tasks"]} == {
        "reasoning", "reading_comprehension", "code", "instruction_following"}
    primary = _prepare_harness(suite, tmp_path)
    assert list(primary) == [t["task"] for t in suite["tasks"]]
    for t in suite["tasks"]:
        cfg = load_yaml(tmp_path / f"{t['task']}.yaml", resolve_func=False)
        assert cfg["task"] == t["task"] and cfg["num_fewshot"] == t["num_fewshot"]
        assert cfg["dataset_path"], t["task"]


def test_ood_paper_fails_fast_offline(checkpoints, tmp_path: Path) -> None:
    # A fresh process with empty Hugging Face caches: nothing can be loaded.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "raymix.eval", "--checkpoint", checkpoints["untrained"],
         "--suite", "ood_paper", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # Fast means before any model is loaded or scored (a wall-clock bound
    # only measured how busy the machine was: 15 s on a loaded 2-core one).
    assert "Loading weights" not in proc.stdout + proc.stderr
    for t in load_suite("ood_paper")["tasks"]:
        assert t["task"] in proc.stderr
    assert "could not be loaded offline" in proc.stderr
    assert not (out / "lm_eval_tasks").exists() and not (out / "results.json").exists()


def test_unknown_suite_and_bad_input(checkpoints, tmp_path: Path, capsys) -> None:
    with pytest.raises(RaymixError, match=r"unknown suite 'ood_embeded'.*did you mean 'ood_embedded'"):
        evaluate_checkpoint(checkpoints["untrained"], "ood_embeded", str(tmp_path))
    assert main(["--checkpoint", checkpoints["untrained"], "--suite", "nope", "--output", str(tmp_path)]) == 2
    assert "ood_embedded" in capsys.readouterr().err
    missing = tmp_path / "no_such_model"
    with pytest.raises(RaymixError, match=str(missing)):
        evaluate_checkpoint(str(missing), "ood_embedded", str(tmp_path))
    assert main(["--checkpoint", str(missing), "--suite", "ood_embedded", "--output", str(tmp_path)]) == 2
    with pytest.raises(RaymixError, match="--limit"):
        evaluate_checkpoint(checkpoints["untrained"], "ood_embedded", str(tmp_path), limit=0)
    with pytest.raises(RaymixError, match="--batch-size"):
        evaluate_checkpoint(checkpoints["untrained"], "ood_embedded", str(tmp_path), batch_size="big")
    with pytest.raises(RaymixError, match="needs --ni-dir"):
        evaluate_checkpoint(checkpoints["untrained"], "ni_heldout", str(tmp_path))
    with pytest.raises(RaymixError, match="no such run"):
        evaluate_checkpoint(checkpoints["untrained"], "ood_embedded", str(tmp_path),
                            mlflow_run_id="0123abcd", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")


def test_ni_heldout_over_tasks_the_run_trains_on_is_refused(tmp_path: Path) -> None:
    """A held-out suite whose eval.ni_dir holds a training task (by its file
    stem, as both name it) is refused before training: its score would be on
    seen data. Disjoint task sets pass."""
    from raymix.config import load_config
    from raymix.driver.setup import resolve_suite

    def task_dir(name: str, tasks: tuple[str, ...]) -> Path:
        d = tmp_path / name
        d.mkdir()
        for t in tasks:
            (d / f"{t}.json").write_text(json.dumps({"Definition": ["Answer."], "Instances": [
                {"id": f"{t}-0", "input": "x", "output": ["y"]}]}))
        return d

    train = task_dir("train", ("task001_a", "task002_b"))
    held = task_dir("held", ("task002_b", "task003_c"))
    other = task_dir("other", ("task003_c",))
    src = f"data.sources=[{{kind: natural_instructions, path: {train}}}]"
    with pytest.raises(RaymixError, match=r"eval.ni_dir .* holds 1 task\(s\) that data.sources\[0\] .* task002_b"):
        resolve_suite(load_config(None, [src, "eval.suite=ni_heldout", f"eval.ni_dir={held}"]))
    assert resolve_suite(load_config(None, [src, "eval.suite=ni_heldout", f"eval.ni_dir={other}"])) == "ni_heldout"
    # the source's own task filter counts: training on task001_a alone leaves task002_b held out
    only_a = f"data.sources=[{{kind: natural_instructions, path: {train}, tasks: [task001_a]}}]"
    assert resolve_suite(load_config(None, [only_a, "eval.suite=ni_heldout", f"eval.ni_dir={held}"])) == "ni_heldout"


def test_ni_heldout_renders_tasks_from_ni_files(tmp_path: Path) -> None:
    from raymix.eval import _prepare_ni

    ni = tmp_path / "ni"
    ni.mkdir()
    for name in ("task001_even", "task002_odd"):
        (ni / f"{name}.json").write_text(json.dumps({
            "Definition": ["Answer yes or no."],
            "Instances": [{"id": f"{name}-{i}", "input": f"Is {i} even?", "output": ["yes", "Yes"]}
                          for i in range(5)]}))
    work = tmp_path / "work"
    work.mkdir()
    primary = _prepare_ni(load_suite("ni_heldout"), work, 3, str(ni))
    assert primary == {"ni_task001_even": "exact_match,none", "ni_task002_odd": "exact_match,none"}
    rows = [json.loads(line) for line in (work / "data" / "task001_even.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["prompt"] == "Answer yes or no.\n\nInput: Is 0 even?"
    assert rows[0]["targets"] == [" yes", " Yes"]
    import yaml

    cfg = yaml.safe_load((work / "ni_task001_even.yaml").read_text())
    assert cfg["doc_to_text"] == "{{prompt}}\nAnswer:" and cfg["generation_kwargs"]["until"] == ["\n"]
