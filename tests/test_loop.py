"""The training loop in this process, with an in-process mixer: no Ray.

``raymix.loop.train_loop`` runs under an ``InProcessSession`` with a
``LocalMixerClient``. Checked: a budgeted run's ledger, a checkpoint round
trip (stopped after its first checkpoint, resumed, equal to an uninterrupted
run), that a do-nothing worker-side signal changes nothing, and that a toy
learned policy defined entirely in this file (a mixer-side policy and a
worker-side signal, registered from here) trains end to end.
"""

from __future__ import annotations

import json
import os
import time
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
    "eval.curve_points=2",
    "runtime.num_workers=0",
    "budget.tokens=3000",
    "eval.suite=null",
]


class RecordingSession:
    """An ``InProcessSession`` that keeps every report, and can stop the run
    (as a lost worker would) right after its first periodic checkpoint."""

    def __init__(self, local_dir: str, stop_after_checkpoint: bool = False):
        from raymix.loop import InProcessSession

        self.inner = InProcessSession(False, local_dir)
        self.stop = stop_after_checkpoint

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def report(self, metrics: dict, checkpoint_dir):
        self.inner.report(metrics, checkpoint_dir)
        if self.stop and checkpoint_dir and metrics.get("checkpoint_reason") == "periodic":
            raise KeyboardInterrupt("stopped after the first checkpoint")


def _run(prepared, tmp: Path, overrides=(), mixer_state=None, stop=False, mixer=None, **loop_fields):
    from raymix.loop import LoopConfig, LoopResult, train_loop
    from raymix.mixer import LocalMixerClient, Mixer
    from raymix.policies import PoolInfo

    pool, tok_dir, init_dir = prepared
    cfg = load_config(None, SMALL + list(overrides))
    budget = cfg.budget.tokens
    info = PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), budget)
    mixer = mixer or LocalMixerClient(Mixer(cfg.policy, info, cfg.budget.max_epochs))
    loop = LoopConfig(run=cfg, pool=pool, budget_tokens=budget, tokenizer_dir=tok_dir, init_model_dir=init_dir,
                      output_dir=str(tmp), local_checkpoint_dir=str(tmp / "checkpoints"), **loop_fields)
    session = RecordingSession(str(tmp / "checkpoints"), stop_after_checkpoint=stop)
    try:
        train_loop(loop, session, mixer=mixer)
    except KeyboardInterrupt:
        return None, mixer, session
    return LoopResult.read(str(tmp / "checkpoints" / "final")), mixer, session


def test_budgeted_run_ledger(prepared, tmp_path: Path) -> None:
    result, mixer, session = _run(prepared, tmp_path)
    ledger = result.mixer["ledger"]
    train = sum(row["train_tokens"] for row in ledger.values())
    assert train == result.train_tokens == result.mixer["train_tokens"]
    # The run stops at the budget, overshooting by less than one step's tokens.
    assert 3000 <= train < 3000 + 8 * 64
    # Curve evaluations are meta tokens, never train tokens.
    assert result.mixer["meta_tokens"] > 0 and len(result.curve) == 3  # the start and 2 points
    assert result.steps > 0 and set(result.val_loss) == set(prepared[0].tasks)
    # Test loss per task, on the split no policy reads, beside the validation loss.
    assert set(result.test_loss) == set(prepared[0].tasks) and all(v == v for v in result.test_loss.values())
    assert all("worst_test_loss" in p and "meta_tokens" in p for p in result.curve)
    assert os.path.exists(tmp_path / "progress" / "rank0.json")
    assert session.inner.reports[-1][1].endswith("final")


def test_checkpoint_round_trip(prepared, tmp_path: Path) -> None:
    """Stopped right after its first checkpoint and run again in the same
    folder, the run restores and ends where an uninterrupted run ends. The
    comparison is exact: one process, the same kernels and the same data
    order, so resuming must reproduce every floating-point operation."""
    every = ["train.checkpoint_tokens=1000"]
    full, _, _ = _run(prepared, tmp_path / "full", every)
    part, _, session = _run(prepared, tmp_path / "cut", every, stop=True)
    assert part is None and any(d and d.endswith("-periodic") for _, d in session.inner.reports)
    resumed, _, _ = _run(prepared, tmp_path / "cut", every)  # a fresh mixer, as after a driver restart
    assert resumed.restores == 1 and full.restores == 0
    # Speed is over the tokens each loop trained and timed: after the
    # restore, those since the checkpoint at 1,000 tokens.
    assert full.timed_tokens == full.train_tokens and 0 < resumed.timed_tokens <= full.train_tokens - 1000
    assert resumed.tokens_per_second == pytest.approx(resumed.timed_tokens / resumed.loop_seconds, rel=1e-12)
    assert resumed.train_tokens == full.train_tokens and resumed.steps == full.steps
    assert resumed.mixer["ledger"] == full.mixer["ledger"]
    assert resumed.val_loss == full.val_loss
    assert resumed.curve == full.curve


def test_two_restores_of_one_checkpoint_count_two(prepared, tmp_path: Path) -> None:
    """A worker group restarted twice from the same checkpoint (the second
    attempt lost before its own checkpoint was registered) has restored
    twice. The mixer, which outlives worker groups, is shared by the three
    attempts as the mixer actor is; the checkpoint alone would say 1."""
    import shutil

    from raymix.loop.checkpoint import read_state
    from raymix.mixer import LocalMixerClient, Mixer
    from raymix.policies import PoolInfo

    every = ["train.checkpoint_tokens=1000"]
    pool = prepared[0]
    cfg = load_config(None, SMALL + every)
    mixer = LocalMixerClient(Mixer(cfg.policy, PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(),
                                                        cfg.budget.tokens), cfg.budget.max_epochs))
    ckpts = tmp_path / "checkpoints"
    assert _run(prepared, tmp_path, every, stop=True, mixer=mixer)[0] is None  # lost after checkpoint 1
    (first,) = list(ckpts.iterdir())
    assert _run(prepared, tmp_path, every, stop=True, mixer=mixer)[0] is None  # restore 1, lost again
    # ... before its checkpoint was registered: as Ray Train would, the
    # restart finds only the first one.
    for later in set(ckpts.iterdir()) - {first}:
        assert read_state(str(later))["train_tokens"] > read_state(str(first))["train_tokens"]
        shutil.rmtree(later)
    resumed, _, _ = _run(prepared, tmp_path, every, mixer=mixer)  # restore 2
    assert resumed.restores == 2 and resumed.train_tokens >= cfg.budget.tokens
    # A new driver (a fresh mixer) starts from the checkpoint's count.
    assert Mixer(cfg.policy, mixer.mixer.pool, cfg.budget.max_epochs).count_restore(1) == 2


class DyingMixer:
    """A ``LocalMixerClient`` whose actor dies for good after the run's first
    checkpoint: every reply from then on raises ``MixerLost``."""

    def __init__(self, inner):
        self.inner, self.dead = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def snapshot(self) -> dict:
        state = self.inner.snapshot()
        self.dead = True
        return state

    def get(self, reply):
        from raymix.mixer import MixerLost

        if self.dead:
            raise MixerLost("the mixer actor mixer-test is dead and will not be restarted")
        return self.inner.get(reply)


def test_a_lost_mixer_stops_at_the_last_checkpoint_which_resumes(prepared, tmp_path: Path) -> None:
    """The mixer lost for good after the first checkpoint: the loop stops at
    its next sync without raising (a raise would make Ray Train restart the
    workers, to no avail) and without writing another checkpoint; the
    complete last one resumes with a new mixer and the run finishes."""
    from raymix.loop import LoopConfig, train_loop
    from raymix.loop.checkpoint import read_state
    from raymix.mixer import LocalMixerClient, Mixer
    from raymix.policies import PoolInfo

    every = ["train.checkpoint_tokens=1000"]
    pool, tok_dir, init_dir = prepared
    cfg = load_config(None, SMALL + every)
    info = PoolInfo(pool.tasks, pool.train_tokens(), pool.train_examples(), cfg.budget.tokens)
    dying = DyingMixer(LocalMixerClient(Mixer(cfg.policy, info, cfg.budget.max_epochs)))
    ckpts = tmp_path / "checkpoints"
    loop = LoopConfig(run=cfg, pool=pool, budget_tokens=cfg.budget.tokens, tokenizer_dir=tok_dir,
                      init_model_dir=init_dir, output_dir=str(tmp_path), local_checkpoint_dir=str(ckpts))
    session = RecordingSession(str(ckpts))
    train_loop(loop, session, mixer=dying)  # returns: no exception
    assert dying.dead
    (only,) = list(ckpts.iterdir())  # the first checkpoint, complete, and nothing after it
    assert only.name.endswith("-periodic") and 1000 <= read_state(str(only))["train_tokens"] < 2000
    assert session.inner.reports[-1][0]["checkpoint_reason"] == "periodic"
    resumed, _, _ = _run(prepared, tmp_path, every)  # a fresh mixer, as after --resume
    assert resumed.restores == 1 and resumed.train_tokens >= cfg.budget.tokens
    assert sum(row["train_tokens"] for row in resumed.mixer["ledger"].values()) == resumed.train_tokens


class ObservingSignal:
    """A worker-side signal that does nothing but look: it observes every
    step, is due every third step, and computes nothing."""

    seen: list = []

    def __init__(self, ctx):
        self.ctx = ctx

    def observe(self, view):
        ObservingSignal.seen.append(view.step)

    def due(self, view):
        return view.step % 3 == 0

    def compute(self, view):
        return None

    def metrics(self, signals, weights, timing):
        return {}

    def stops_run(self):
        return False

    def summary(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_do_nothing_signal_changes_nothing(prepared, tmp_path: Path) -> None:
    """Uniform, with and without a signal that is due but computes nothing:
    bit-identical losses (same process, same kernels, same draws)."""
    from raymix.policies import register_policy
    from raymix.policies.static import StaticPolicy
    from raymix.registry import POLICIES

    register_policy("test_observer", signal=ObservingSignal)(
        lambda cfg, pool: StaticPolicy(np.ones(len(pool.tasks))))
    try:
        plain, _, _ = _run(prepared, tmp_path / "plain", ["policy.name=uniform"])
        ObservingSignal.seen = []
        watched, _, _ = _run(prepared, tmp_path / "watched", ["policy.name=test_observer"])
    finally:
        POLICIES.pop("test_observer")
    assert ObservingSignal.seen == list(range(1, watched.steps + 1))
    assert watched.val_loss == plain.val_loss
    assert watched.curve == plain.curve
    assert watched.mixer["ledger"] == plain.mixer["ledger"]
    assert watched.meta_steps == watched.steps // 3


class FocusPolicy:
    """A toy learned policy: moves all weight to the task the workers name."""

    def __init__(self, cfg, pool):
        self.T = len(pool.tasks)
        self.focus = None

    def initial_weights(self):
        return np.ones(self.T)

    def update(self, signals):
        if "focus" not in signals.extra:
            return None
        self.focus = int(signals.extra["focus"])
        w = np.full(self.T, 1e-9)
        w[self.focus] = 1.0
        return w

    def state_dict(self):
        return {"focus": self.focus}

    def load_state_dict(self, state):
        self.focus = state["focus"]


class FocusSignal:
    """Its worker-side signal: once, after the fourth step, names the task
    with the highest training loss seen so far (from the loop's all-reduced
    per-task statistics) and stops reporting."""

    def __init__(self, ctx):
        self.T = len(ctx.pool.tasks)
        self.loss = np.zeros((2, self.T))
        self.done = False

    def observe(self, view):
        self.loss += view.stats[1:]

    def due(self, view):
        return not self.done and view.step == 4

    def compute(self, view):
        self.done = True
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.loss[1] > 0, self.loss[0] / np.maximum(self.loss[1], 1), -np.inf)
        return {"focus": int(np.argmax(mean)), "meta_tokens": [0] * self.T}

    def metrics(self, signals, weights, timing):
        return {"toy/focus": float(signals["focus"])}

    def stops_run(self):
        return False

    def summary(self):
        return {"toy_done": self.done}

    def state_dict(self):
        return {"toy_done": self.done}

    def load_state_dict(self, state):
        self.done = state.get("toy_done", False)


def test_toy_learned_policy_from_a_test_file(prepared, tmp_path: Path) -> None:
    """A policy defined and registered here, without touching raymix/: its
    signal's result reaches the mixer, the mixture follows, the loop stays
    the same."""
    from raymix.policies import register_policy
    from raymix.registry import POLICIES

    register_policy("test_focus", signal=FocusSignal)(FocusPolicy)
    try:
        result, mixer, _ = _run(prepared, tmp_path, ["policy.name=test_focus"])
    finally:
        POLICIES.pop("test_focus")
    focus = mixer.mixer.policy.focus
    assert focus is not None and result.meta_steps == 1
    assert result.signal_summary == {"toy_done": True}
    schedule = result.mixer["mixture_schedule"]
    assert len(schedule) == 2  # uniform, then the focused mixture from step 4 on
    tasks = list(prepared[0].tasks)
    assert schedule[1][1][tasks[focus]] > 0.99
    ledger = result.mixer["ledger"]
    first = schedule[1][0]
    # After the switch (at `first` train tokens) almost every token is the focused task's.
    assert ledger[tasks[focus]]["train_tokens"] >= 0.9 * (result.train_tokens - first)
    assert json.dumps(result.signal_summary)


def test_packing_keeps_the_examples_and_counts_fewer_positions(prepared, tmp_path: Path) -> None:
    """Packed (the default) and padded runs draw the same examples: the same
    steps and per-task train tokens; packing computes fewer positions
    (its utilisation, reported in the result, is higher)."""
    packed, _, _ = _run(prepared, tmp_path / "packed")
    padded, _, _ = _run(prepared, tmp_path / "padded", ["train.packing=false"])
    assert packed.batch_layout == "packed" and padded.batch_layout == "padded (train.packing is false)"
    assert packed.steps == padded.steps and packed.train_tokens == padded.train_tokens
    assert ({t: r["train_tokens"] for t, r in packed.mixer["ledger"].items()}
            == {t: r["train_tokens"] for t, r in padded.mixer["ledger"].items()})
    assert 0 < padded.utilisation < packed.utilisation <= 1
    # The model FLOPs the examples needed do not depend on their layout
    # (exact: sums of integer counts), and lie between the body alone at
    # every token and the whole model plus attention over full-length examples.
    from transformers import AutoModelForCausalLM

    from raymix.flops import ModelFlops

    flops = ModelFlops.of(AutoModelForCausalLM.from_pretrained(prepared[2]))
    assert packed.model_flops_per_token == padded.model_flops_per_token
    longest = load_config(None, SMALL).data.max_seq_len
    assert (6 * flops.body < packed.model_flops_per_token
            < 6 * flops.parameters + 12 * flops.layers * flops.attention_width * (longest + 1) / 2)
    assert packed.mfu is None  # CPU: no peak to compare with
    # The first curve point (before any step) is the same model: identical.
    assert packed.curve[0]["worst_val_loss"] == padded.curve[0]["worst_val_loss"]



def test_mfu_is_the_model_flops_rate_over_a_known_peak(prepared, tmp_path: Path, monkeypatch) -> None:
    """Where the device's peak is known (a listed GPU; here a stand-in peak
    for the CPU), the result's MFU is tokens/s x model FLOPs per token over
    the peak x workers."""
    from mlflow.tracking import MlflowClient

    import raymix.flops

    monkeypatch.setattr(raymix.flops, "device_peak_flops", lambda device: 1e12)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("mfu")).info.run_id
    result, _, _ = _run(prepared, tmp_path, mlflow_tracking_uri=uri, mlflow_run_id=run_id)
    assert result.mfu == pytest.approx(result.tokens_per_second * result.model_flops_per_token / 1e12, rel=1e-12)
    assert result.world == 1 and 0 < result.mfu
    # And per logging interval, as train/mfu beside train/tokens_per_second.
    rate = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens_per_second")}
    mfu = {m.step: m.value for m in client.get_metric_history(run_id, "train/mfu")}
    assert mfu and mfu.keys() == rate.keys()
    last = max(mfu)
    # The last interval ends at the budget, where the per-token count is the result's.
    assert mfu[last] == pytest.approx(rate[last] * result.model_flops_per_token / 1e12, rel=1e-12)


def test_compiled_layers_train_as_the_eager_ones(prepared, tmp_path: Path) -> None:
    """``train.compile``: the step's decoder layers compiled, the rest
    (evaluation, ADAPT's forward-mode meta step every 4 steps) eager. The
    same run ends with the same ledger and, to float tolerance, the same
    losses."""
    adapt = ["policy.name=adapt", "policy.adapt.every_steps=4", "policy.adapt.warmup_steps=4"]
    eager, _, _ = _run(prepared, tmp_path / "eager", adapt)
    compiled, _, _ = _run(prepared, tmp_path / "compiled", [*adapt, "train.compile=true"])
    assert len(compiled.mixer["mixture_schedule"]) > 1  # ADAPT moved the mixture: meta steps ran
    assert compiled.steps == eager.steps and compiled.mixer["ledger"] == eager.mixer["ledger"]
    # Inductor's fused kernels reorder float32 reductions (RMSNorm's mean,
    # the softmax, the fused backward sums): each op moves by a few eps32
    # (1.2e-7) relative; 15 AdamW steps carry that into the weights, and the
    # validation losses (O(4)) moved by at most 1e-6 absolute here (2.5e-7
    # relative, default and AVX2 kernels alike). rtol 1e-5 leaves 40x that;
    # a wrong forward or a lost update moves them by far more (a single
    # extra step at lr 1e-2 changes them in the second decimal).
    for task, loss in eager.val_loss.items():
        assert compiled.val_loss[task] == pytest.approx(loss, rel=1e-5), task


# ------------------------------------------------------- what a resumed run reports


class Recorder:
    """Stands in for MetricLogger: every (step, metrics) the loop logs."""

    def __init__(self):
        self.steps: dict[int, dict] = {}
        self.client = None

    def log(self, metrics, step):
        self.steps.setdefault(step, {}).update(metrics)

    def commit(self, through_step=None):
        pass


def _recorded(prepared, tmp, overrides, monkeypatch, stop=False):
    import raymix.loop.loop as loop_mod

    rec = Recorder()
    monkeypatch.setattr(loop_mod, "_metric_logger", lambda loop: rec)
    result, _, session = _run(prepared, tmp, overrides, stop=stop)
    return result, rec, session


def test_per_task_train_loss_after_a_resume(prepared, tmp_path: Path, monkeypatch) -> None:
    """``loss/<task>`` at a logged step is the mean over the steps since the
    previous log, after a restore too: MetricsHook's sums since the last log
    are part of the checkpoint (the first log after a restore averaged only
    the steps since the checkpoint)."""
    every = ["train.checkpoint_tokens=1000", "train.log_every=4"]
    full, rec_full, _ = _recorded(prepared, tmp_path / "full", every, monkeypatch)
    _, rec_cut, session = _recorded(prepared, tmp_path / "cut", every, monkeypatch, stop=True)
    ckpt_step = int(next(d for _, d in session.inner.reports if d and d.endswith("-periodic")).split("/")[-1][:8])
    resumed, rec_res, _ = _recorded(prepared, tmp_path / "cut", every, monkeypatch)
    assert resumed.val_loss == full.val_loss  # the training itself is reproduced exactly
    assert ckpt_step % 4 != 0  # the checkpoint falls between two logs
    first_log = min(s for s in rec_res.steps if s > ckpt_step and any(k.startswith("loss/") for k in rec_res.steps[s]))
    got = {k: v for k, v in rec_res.steps[first_log].items() if k.startswith("loss/")}
    want = {k: v for k, v in rec_full.steps[first_log].items() if k.startswith("loss/")}
    assert got == pytest.approx(want, nan_ok=True), f"step {first_log} (checkpoint at step {ckpt_step})"


class SlowSignal(ObservingSignal):
    """A worker-side signal due at every step whose computation takes 0.5 s."""

    def __init__(self, ctx):
        self.T = len(ctx.pool.tasks)

    def observe(self, view):
        pass

    def due(self, view):
        return True

    def compute(self, view):
        time.sleep(0.5)
        return {"meta_tokens": [0] * self.T}


def test_meta_time_share_after_a_resume(prepared, tmp_path: Path) -> None:
    """``meta_seconds`` is restored from the checkpoint (all attempts'
    signal time) while ``loop_seconds`` starts again at the restore: the
    share of the loop's time in the signal is over ``timed_meta_seconds``,
    the signal's time since the restore (it exceeded 1 after a resume)."""
    from raymix.policies import register_policy
    from raymix.policies.static import StaticPolicy
    from raymix.registry import POLICIES

    register_policy("review_slow", signal=SlowSignal)(lambda cfg, pool: StaticPolicy(np.ones(len(pool.tasks))))
    try:
        every = ["train.checkpoint_tokens=1000", "policy.name=review_slow"]
        full, _, _ = _run(prepared, tmp_path / "full", every)
        _run(prepared, tmp_path / "cut", every, stop=True)
        resumed, _, _ = _run(prepared, tmp_path / "cut", every)
    finally:
        POLICIES.pop("review_slow")
    assert full.timed_meta_seconds == full.meta_seconds <= full.loop_seconds
    assert resumed.timed_meta_seconds < resumed.meta_seconds  # the earlier attempt's are not this loop's
    assert resumed.timed_meta_seconds <= resumed.loop_seconds, (
        f"meta time share {resumed.timed_meta_seconds / resumed.loop_seconds:.2f} > 1 after the resume "
        f"(uninterrupted: {full.meta_seconds / full.loop_seconds:.2f})")


def test_aborted_checkpoint_positions_match_its_steps(prepared, tmp_path: Path) -> None:
    """The "aborted" checkpoint (non-finite loss) is the last good state: its
    data positions are those of the steps its model trained on (the refused
    step's draws are undone), so a resume from it trains those examples."""
    from raymix.loop.checkpoint import latest_local_checkpoint, read_state

    # A learning rate that overflows the parameters after the first update.
    with pytest.raises(FileNotFoundError):  # the loop stopped without a final checkpoint (_run reads it)
        _run(prepared, tmp_path, ["train.lr=1e30", "train.warmup_fraction=0", "eval.curve_points=0",
                                  "train.checkpoint_fraction=0"])
    d = latest_local_checkpoint(str(tmp_path / "checkpoints"))
    assert d is not None and d.endswith("-aborted"), d
    state = read_state(d)
    mbs, accum = 8, 1
    trained = state["step"] * mbs * accum  # examples the checkpoint's model was trained on
    drawn = sum(s["served"] for s in state["data"]["streams"])  # no stream wrapped this early
    assert all(s["epoch"] == 0 for s in state["data"]["streams"])
    ledger = sum(state["mixer"]["ledger"]["train"])
    assert ledger == state["train_tokens"]  # the ledger is the last good step's...
    assert drawn == trained, f"{drawn} examples drawn by the checkpoint's positions, {trained} trained ({state['step']} steps)"


def test_interval_throughput_leaves_out_curve_evaluations(prepared, tmp_path: Path, monkeypatch) -> None:
    """``train/tokens_per_second`` per logging interval counts training time
    only, as the loop's final figure does: curve evaluations (made slow
    here, 0.3 s each) are not in it. The intervals' seconds (tokens over
    rate) add up to at most the loop's training time."""
    from raymix.loop import evaluation

    real = evaluation.CurveEvaluator.__call__

    def slow(self, *a, **k):
        time.sleep(0.3)
        return real(self, *a, **k)

    monkeypatch.setattr(evaluation.CurveEvaluator, "__call__", slow)
    result, rec, _ = _recorded(prepared, tmp_path, ["train.log_every=2", "eval.curve_points=4"], monkeypatch)
    logged = sorted((s, m) for s, m in rec.steps.items() if "train/tokens_per_second" in m)
    seconds, before = 0.0, 0
    for _, m in logged:
        seconds += (m["train/tokens"] - before) / m["train/tokens_per_second"]
        before = m["train/tokens"]
    assert result.curve_seconds > 8 * 0.3  # 5 points, validation and test each
    # Timer resolution and the logging itself: within 5% of the loop's time.
    assert seconds <= result.loop_seconds * 1.05, (seconds, result.loop_seconds, result.curve_seconds)


def test_a_non_finite_gradient_with_a_finite_loss_aborts_before_the_update(prepared, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A finite loss whose gradient norm is not (bf16 overflow in the
    backward) stops the run as a non-finite loss does: no update, an
    "aborted" checkpoint of the last good step, naming the gradient."""
    import torch

    from raymix.loop.checkpoint import latest_local_checkpoint, read_state

    real, calls = torch.nn.utils.clip_grad_norm_, []

    def third_is_inf(params, max_norm, *a, **k):
        calls.append(1)
        norm = real(params, max_norm, *a, **k)
        return torch.tensor(float("inf")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", third_is_inf)
    reports: list = []

    class Keeping(RecordingSession):
        def report(self, metrics: dict, checkpoint_dir):
            reports.append(metrics)
            super().report(metrics, checkpoint_dir)

    monkeypatch.setitem(globals(), "RecordingSession", Keeping)
    with pytest.raises(FileNotFoundError):  # no final checkpoint: the loop stopped
        _run(prepared, tmp_path, ["eval.curve_points=0", "train.checkpoint_fraction=0"])
    d = latest_local_checkpoint(str(tmp_path / "checkpoints"))
    assert d is not None and d.endswith("-aborted"), d
    assert read_state(d)["step"] == 2  # the last good step's state
    assert any("the gradient's norm became inf" in str(m.get("aborted", "")) for m in reports), reports
