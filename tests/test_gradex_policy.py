"""GradEx as a policy: the pure policy, its config, and one run end to end
(in-process, tiny pool): the phase switch, the selection, the ledger's meta
vs train tokens, the verification's fields, MLflow, and scores_only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raymix.config import GradexConfig, PolicyConfig, identity_hash, load_config
from raymix.errors import RaymixError
from raymix.policies import PoolInfo, Signals, build_policy
from raymix.policies.gradex import GradexPolicy

SIZES = np.array([100, 1000, 10000, 400], dtype=np.int64)

# Tolerances: the policy's mixtures are float64 ratios of a few token counts
# (~1e-16 relative on any CPU): numpy's and pytest's defaults hold with a
# wide margin. The end-to-end runs' figures are compared where they say.


def pool(sizes: np.ndarray = SIZES) -> PoolInfo:
    tasks = tuple("abcdefgh"[: len(sizes)])
    return PoolInfo(tasks, sizes, sizes // 10, 3000)


def policy(**kw) -> GradexPolicy:
    return build_policy(PolicyConfig(name="gradex", gradex=GradexConfig(**kw)), pool())


# --------------------------------------------------------------------------- the pure policy


def test_uniform_until_the_selection_then_only_the_selected():
    p = policy(num_subsets=2, verify_subsets=1)
    assert np.allclose(p.initial_weights(), 0.25)
    assert p.update(Signals(np.array([10, 10, 10, 10]))) is None  # no selection yet: keep uniform
    w = p.update(Signals(np.zeros(4), extra={"gradex_selection": [2, 0], "gradex_scores": [-1, 2, -3, 0.5]}))
    assert np.allclose(w, [0.5, 0, 0.5, 0])
    assert p.phase == 2 and p.selected == [0, 2] and p.scores == [-1, 2, -3, 0.5]
    # Once switched, later signals change nothing.
    assert p.update(Signals(np.zeros(4), extra={"gradex_selection": [1]})) is None
    q = policy(num_subsets=2, verify_subsets=1)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q.phase == 2 and q.selected == [0, 2]


def test_proportional_phase_two_and_bad_selection():
    p = policy(mixture="proportional", num_subsets=2, verify_subsets=1)
    w = p.update(Signals(np.zeros(4), extra={"gradex_selection": [1, 3]}))
    assert np.allclose(w, np.array([0, 1000, 0, 400]) / 1400)
    with pytest.raises(ValueError, match="task indices"):
        policy(num_subsets=2, verify_subsets=1).update(Signals(np.zeros(4), extra={"gradex_selection": [7]}))
    with pytest.raises(ValueError, match="task indices"):
        policy(num_subsets=2, verify_subsets=1).update(Signals(np.zeros(4), extra={"gradex_selection": []}))


def test_subset_counts_on_small_pools_and_factory_checks():
    from raymix.policies.gradex import subset_counts

    # 4 tasks, subsets of 2: 6 distinct subsets exist; K at most half of them, M the rest.
    assert subset_counts(GradexConfig(num_subsets=4, verify_subsets=2), 4, 0) == (2, 4, 2)
    assert subset_counts(GradexConfig(), 4, 0) == (2, 3, 3)
    assert subset_counts(GradexConfig(verify_subsets=0), 4, 0) == (2, 6, 0)
    assert subset_counts(GradexConfig(), 23, 0) == (12, 64, 4)  # the embedded default: as configured
    # a target task is in every subset: 3 free tasks, 1 more per subset of 2
    assert subset_counts(GradexConfig(), 4, 1) == (2, 2, 1)
    with pytest.raises(RaymixError, match="subset_size=4 gives 4 tasks.*must leave some task out"):
        subset_counts(GradexConfig(subset_size=4), 4, 0)
    with pytest.raises(RaymixError, match="only 1 distinct"):
        subset_counts(GradexConfig(subset_size=1), 2, 1)
    with pytest.raises(RaymixError, match=r"policy.gradex.target: unknown task\(s\) \['zz'\]"):
        policy(target=["zz"], num_subsets=1)
    with pytest.raises(RaymixError, match="subset_size=9 gives 9 tasks"):
        policy(subset_size=9, num_subsets=1)


@pytest.mark.parametrize("override,message", [
    ("policy.gradex.meta_share=1", "policy.gradex.meta_share must be in"),
    ("policy.gradex.projection_dim=0", "policy.gradex.projection_dim must be >= 1"),
    ("policy.gradex.subset_size=2.5", "policy.gradex.subset_size must be"),
    ("policy.gradex.verify_subsets=-1", "policy.gradex.verify_subsets must be >= 0"),
    ("policy.gradex.selection=best", "policy.gradex.selection: 'best' is not one of"),
    ("policy.gradex.fit=regularised", "policy.gradex.reg must be > 0 for fit=regularised"),
    ("policy.gradex.max_tasks=0", "policy.gradex.max_tasks"),
    ("policy.gradex.target=[]", "policy.gradex.target is empty"),
])
def test_config_validation_names_the_field(override, message):
    with pytest.raises(RaymixError, match=message):
        load_config(None, ["policy.name=gradex", override])


def test_identity_hashes_of_other_policies_do_not_change():
    # The hashes before policy.gradex existed (computed on main at 239d2bb; since
    # then changed once, when the split rule entered every identity).
    # Pinned on one worker: runs recorded there (every published sweep trains in
    # local mode) keep these; the default's 2 workers count since the worker
    # count entered the identity where it sets the global batch.
    assert identity_hash(load_config(None, ["runtime.num_workers=1"])) == "d7b40bb85ca96e1e"
    assert identity_hash(load_config(None, ["policy.name=adapt", "runtime.num_workers=1"])) == "6587967be01fef06"  # ADAPT's defaults, every_steps 80 (issue 13), split by question
    assert identity_hash(load_config(None, ["policy.gradex.num_subsets=9", "runtime.num_workers=1"])) == "d7b40bb85ca96e1e"
    g = identity_hash(load_config(None, ["policy.name=gradex"]))
    assert g != identity_hash(load_config(None, ["policy.name=gradex", "policy.gradex.num_subsets=9"]))


# --------------------------------------------------------------------------- end to end

SMALL = [
    "data.sources=[{kind: synthetic, scale: 0.02}]",
    "data.max_test=4",
    "model.vocab_size=512",
    "train.micro_batch_size=8",
    "train.sync_every=2",
    "train.log_every=2",
    "eval.max_test_examples=2",
    "eval.max_new_tokens=4",
    "eval.curve_points=0",
    "eval.suite=null",
    "runtime.num_cpus=2",
    "runtime.num_workers=0",
    "runtime.object_store_memory=200000000",
    "budget.tokens=6000",
    "policy.name=gradex",
    "policy.gradex.projection_dim=32",
    "policy.gradex.examples_per_task=2",
    "policy.gradex.target_examples_per_task=2",
    "policy.gradex.num_subsets=12",
    "policy.gradex.verify_subsets=3",
    "policy.gradex.finetune_steps=2",
    "policy.gradex.max_tasks=5",
]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gradex_run_end_to_end(ray_local, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from raymix.driver import run

    summary = run(load_config(None, SMALL), tmp_path / "run")
    g = summary["gradex"]
    tasks = list(summary["ledger"])
    T = len(tasks)
    assert summary["policy"] == "gradex" and not summary["gradex_scores_only"]
    # The estimation ran once the meta initialisation's share (30%) was spent.
    at = g["train_tokens_at_estimation"]
    assert 0.3 * summary["budget_tokens"] <= at < 0.3 * summary["budget_tokens"] + summary["global_batch_tokens"]
    # Phase switch: uniform until then, only the selected tasks after.
    sched = summary["mixture_schedule"]
    assert sched[0][0] == 0 and all(abs(w - 1 / T) < 1e-9 for w in sched[0][1].values())
    assert len(sched) == 2 and sched[1][0] == at
    chosen = set(g["selected"])
    assert 1 <= len(chosen) <= 5
    assert {t for t, w in sched[1][1].items() if w > 0} == chosen
    assert all(abs(w - 1 / len(chosen)) < 1e-9 for t, w in sched[1][1].items() if t in chosen)
    # Threshold selection: the most helpful scores, all below 0 (or the single best when none is).
    finite = {t: s for t, s in g["scores"].items() if s is not None}
    ranked = sorted(finite, key=finite.get)
    assert set(ranked[: len(chosen)]) == chosen
    assert all(finite[t] < 0 for t in chosen) or len(chosen) == 1
    # Ledger: after the switch only selected tasks train; gradient tokens are meta tokens.
    led = summary["ledger"]
    assert sum(r["train_tokens"] for r in led.values()) == summary["train_tokens"]
    assert 0 <= summary["train_tokens"] - summary["budget_tokens"] < summary["global_batch_tokens"]
    unselected_train = sum(led[t]["train_tokens"] for t in tasks if t not in chosen)
    assert unselected_train <= at  # they only trained in phase 1
    assert sum(led[t]["train_tokens"] for t in chosen) >= summary["train_tokens"] - at
    assert summary["meta_tokens"] == g["meta_tokens"] > 0  # no curve points: GradEx's reads only
    # The verification's fine-tuning reads count too (3 subsets here).
    assert 0 < g["verification_meta_tokens"] < g["meta_tokens"]
    assert all(r["meta_tokens"] > 0 for r in led.values())  # every task's gradients were read
    # The verification: K estimated vs actually fine-tuned losses and the figures.
    v = g["verification"]
    assert len(v["estimated"]) == len(v["actual"]) == len(v["subsets"]) == 3
    assert all(np.isfinite(v["estimated"])) and all(np.isfinite(v["actual"]))
    rel = np.mean(np.abs(np.subtract(v["estimated"], v["actual"])) / np.abs(v["actual"]))
    assert v["relative_error"] == pytest.approx(rel)  # float64 mean of 3 ratios: default rel 1e-6
    assert -1 <= v["spearman"] <= 1 or np.isnan(v["spearman"])
    assert v["speedup"] > 0 and v["finetune_seconds_per_subset"] > 0
    # The held-out subsets are not among the M scored ones, and fine-tuning moved the loss.
    # Fine-tuning moves a loss by O(0.1); rounding would be ~1e-7 (float32 model).
    assert not any(np.isclose(a, g["base_loss"], rtol=1e-9) for a in v["actual"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["gradex"]["selected"] == g["selected"]
    client = MlflowClient(summary["mlflow_tracking_uri"])
    mlrun = client.get_run(summary["mlflow_run_id"])
    for key in ("gradex/relative_error", "gradex/spearman", "gradex/speedup", "gradex/num_selected"):
        assert key in mlrun.data.metrics, key
    assert mlrun.data.metrics["gradex/num_selected"] == len(chosen)
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert "gradex.json" in artifacts
    # The generated report carries the estimate's error and speed-up.
    from raymix.report import write_report

    text = write_report(summary["mlflow_tracking_uri"], "raymix", tmp_path / "report").read_text()
    section = text.split("## GradEx")[1].split("\n## ")[0]
    assert "| gradex |" in section and f"{v['relative_error']:.4f}" in section and f"{v['speedup']:.1f}" in section


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gradex_scores_only_stops_after_the_estimation(ray_local, tmp_path: Path, capsys):
    from raymix.train import main

    rc = main(["--output", str(tmp_path / "s")] + [x for s in SMALL + [
        "policy.gradex.scores_only=true", "policy.gradex.verify_subsets=0", "policy.gradex.selection=forward"]
        for x in ("--set", s)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GradEx task scores" in out and "stopped after the estimation" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    g = summary["gradex"]
    assert summary["gradex_scores_only"] and "verification" not in g
    assert summary["train_tokens"] == g["train_tokens_at_estimation"] < summary["budget_tokens"]
    # The selection's mixture is recorded where the run stopped: nothing trained on it.
    assert [o for o, _ in summary["mixture_schedule"]] == [0, summary["train_tokens"]]
    # forward selection: each addition lowered the estimated loss
    fl = g["forward_losses"]
    assert all(b < a for a, b in zip(fl, fl[1:]))
    # (when no addition helps, min_tasks=1 fills in the best-scored task)
    assert len(fl) == len(g["selected"]) + 1 or (len(fl) == 1 and len(g["selected"]) == 1)
    for t in g["selected"]:
        assert f"\n{t}" in out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gradex_resume_before_and_after_the_switch(ray_local, tmp_path: Path):
    """A run resumed from a checkpoint written after the estimation keeps its
    report and selection (no second estimation); one resumed from before it
    estimates again at the same point and selects the same tasks."""
    import shutil

    from raymix.driver import run

    cfg = load_config(None, SMALL + ["train.checkpoint_tokens=1000", "train.checkpoints_to_keep=20",
                                     "policy.gradex.verify_subsets=0"])
    out = tmp_path / "run"
    first = run(cfg, out)
    at = first["gradex"]["train_tokens_at_estimation"]
    ckpts = out / "checkpoints"

    def resume_from(keep) -> dict:
        for d in ckpts.iterdir():
            if d.name not in keep:
                shutil.rmtree(d)
        (out / "summary.json").unlink()
        return run(cfg, out, resume=True)

    def tokens(d: Path) -> int:
        return json.loads((d / "raymix_manifest.json").read_text())["train_tokens"]

    periodic = sorted(d.name for d in ckpts.iterdir() if d.name.endswith("-periodic"))
    after = [p for p in periodic if tokens(ckpts / p) > at]
    before = [p for p in periodic if tokens(ckpts / p) < at]
    assert after and before
    resumed = resume_from(periodic)  # the latest periodic one: after the switch
    assert resumed["restores"] == 1
    assert resumed["gradex"] == first["gradex"]  # restored with the state, not estimated again
    assert resumed["mixture_schedule"] == first["mixture_schedule"]
    assert resumed["ledger"] == first["ledger"]
    again = resume_from(before)  # before the switch: estimated again, on the same θ0
    g1, g2 = first["gradex"], again["gradex"]
    assert g2["train_tokens_at_estimation"] == at and g2["selected"] == g1["selected"]
    # Resumed in this process (local mode, one torch thread), the run retrains
    # the same steps from the checkpoint to the same θ0 with the same kernels,
    # so the scores should be bit-identical; pytest's default rel 1e-6 is kept
    # until that is checked (a different θ0 would move them by far more).
    assert g2["scores"] == pytest.approx(g1["scores"])
    assert [o for o, _ in again["mixture_schedule"]] == [0, at]
    assert again["ledger"] == first["ledger"]
