"""The peers in the training loop in this process (no Ray Train): Aioli's
probe mixtures applied exactly on schedule, DoReMi's signal against a
reference model, ODM's bandit, each through the registry only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raymix.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
    "runtime.num_workers=0",
    "budget.tokens=3000",
    "eval.suite=null",
]


class StepRecorder:
    """A mixer client that records, for every report, the loop's cumulative
    train tokens it carried and whether it carried a signal."""

    def __init__(self, inner):
        self.inner, self.reports = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, train_tokens, loss_sum=None, loss_count=None, meta_tokens=None, meta=None):
        self.reports.append(meta)
        return self.inner.report(train_tokens, loss_sum, loss_count, meta_tokens, meta)


def _run(prepared, tmp: Path, overrides=()):
    from raymix.loop import InProcessSession, LoopConfig, LoopResult, train_loop
    from raymix.mixer import LocalMixerClient, Mixer
    from raymix.policies import PoolInfo

    pool, tok_dir, init_dir = prepared
    cfg = load_config(None, SMALL + [o.replace("INIT_DIR", init_dir) for o in overrides])
    budget = cfg.budget.tokens
    info = PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), budget)
    mixer = Mixer(cfg.policy, info, cfg.budget.max_epochs)
    client = StepRecorder(LocalMixerClient(mixer))
    loop = LoopConfig(run=cfg, pool=pool, budget_tokens=budget, tokenizer_dir=tok_dir, init_model_dir=init_dir,
                      output_dir=str(tmp), local_checkpoint_dir=str(tmp / "checkpoints"))
    train_loop(loop, InProcessSession(False, str(tmp / "checkpoints")), mixer=client)
    return LoopResult.read(str(tmp / "checkpoints" / "final")), mixer, client


def test_aioli_probes_apply_on_schedule(prepared, tmp_path: Path) -> None:
    """Readings at steps 1, 1+s, 1+2s, ... (s = probe_steps); each probe
    mixture is in force from the step after its reading, and the fitted
    mixture from the step after the last one."""
    from raymix.policies.aioli import probe_mixture

    result, mixer, client = _run(prepared, tmp_path, [
        "budget.tokens=6000", "budget.max_epochs=100", "policy.name=aioli", "policy.aioli.probe_steps=2", "policy.aioli.sweeps=1",
        "policy.aioli.tasks_per_round=2", "policy.aioli.round_share=1.0", "policy.aioli.val_examples_per_task=2"])
    readings = [m for m in client.reports if m and "probe_index" in m]
    assert [m["probe_index"] for m in readings] == [0, 1, 2]
    assert result.meta_steps == 3 and result.mixer["meta_tokens"] > 0
    policy = mixer.policy
    K = len(policy.tasks)
    offsets = [o for o, _ in result.mixer["mixture_schedule"]]
    weights = [np.array([w[t] for t in policy.tasks]) for _, w in result.mixer["mixture_schedule"]]
    # initial (uniform), probe 1, probe 2, fitted
    np.testing.assert_allclose(weights[0], 1 / K)
    for k in (0, 1):
        np.testing.assert_allclose(weights[1 + k], probe_mixture(K, policy.probed, int(policy.order[k]), 0.625),
                                   atol=1e-9)
    np.testing.assert_allclose(weights[3], policy.p, atol=1e-9)
    # the gaps between the probe mixtures' starts are probe_steps steps of training
    steps_tokens = offsets[2] - offsets[1], offsets[3] - offsets[2]
    assert all(t > 0 for t in steps_tokens)
    assert result.mixer["policy_summary"]["aioli"]["rounds"] == 1


def test_doremi_proxy_against_a_reference_model(prepared, tmp_path: Path) -> None:
    """The signal scores both models on a separate batch per task; the mixer
    steps alpha; the averaged weights are in the mixer's summary."""
    result, mixer, client = _run(prepared, tmp_path, [
        "policy.name=doremi", "policy.doremi.reference_model=INIT_DIR", "policy.doremi.every_steps=1",
        "policy.doremi.examples_per_task=1", "train.lr=0.01"])
    signals = [m for m in client.reports if m and "excess" in m]
    assert len(signals) == result.meta_steps >= 2
    ex = np.array(signals[-1]["excess"])
    assert np.isfinite(ex).all() and (ex >= 0).all()
    d = result.mixer["policy_summary"]["doremi"]
    assert d["updates"] == len(signals) and sum(d["weights"].values()) == pytest.approx(1.0)
    assert result.mixer["meta_tokens"] > 0


def test_odm_in_the_loop(prepared, tmp_path: Path) -> None:
    result, mixer, client = _run(prepared, tmp_path, ["policy.name=odm", "policy.odm.warmup_share=0.2"])
    o = result.mixer["policy_summary"]["odm"]
    assert o["updates"] >= 1 and 0 < o["t"] < 1.2 * 100000  # the last report may overshoot the budget
    assert result.mixer["meta_tokens"] == 0 and len(result.mixer["mixture_schedule"]) >= 2
