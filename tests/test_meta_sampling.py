"""Validation-task sampling of ADAPT's meta step on large pools
(raymix.policies.adapt.signal.val_sample): which tasks are read, their weights, and an
unbiased estimate of g_val = sum_j q_j grad L_j."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from raymix.policies.adapt import smooth_max
from raymix.policies.adapt.signal import VAL_TASKS_PER_STEP, val_sample


def test_reads_the_worst_tasks_and_a_weighted_uniform_sample_of_the_rest() -> None:
    T, k = 200, 32
    rng = np.random.default_rng(0)
    est = rng.uniform(1.0, 3.0, T)
    ids = np.arange(T)
    chosen, weight = val_sample(ids, est, k, seed=1, step=5)
    assert len(chosen) == len(set(chosen.tolist())) == k
    worst = np.argsort(-est)[: k // 2]
    assert set(worst) <= set(chosen.tolist())
    assert np.all(weight[worst] == 1.0)
    others = np.setdiff1d(chosen, worst)
    # Inverse inclusion probabilities: one float64 division each (default rtol 1e-7, here and below).
    np.testing.assert_allclose(weight[others], (T - k // 2) / (k - k // 2))
    again, _ = val_sample(ids, est, k, seed=1, step=5)
    np.testing.assert_array_equal(chosen, again)  # same on every rank and after a resume
    other_step, _ = val_sample(ids, est, k, seed=1, step=6)
    assert not np.array_equal(chosen, other_step)


def test_unobserved_tasks_are_sampled_uniformly() -> None:
    T, k = 100, 16
    est = np.full(T, np.nan)
    est[:3] = [2.0, 1.0, 3.0]
    chosen, weight = val_sample(np.arange(T), est, k, seed=0, step=0)
    assert {0, 1, 2} <= set(chosen.tolist())  # fewer seen than k // 2: all seen are on top
    assert len(chosen) == k
    rand = np.setdiff1d(chosen, [0, 1, 2])
    np.testing.assert_allclose(weight[rand], (T - 3) / (k - 3))
    chosen, weight = val_sample(np.arange(T), np.full(T, np.nan), k, seed=0, step=0)
    np.testing.assert_allclose(weight[chosen], T / k)


def test_tasks_without_validation_data_are_never_read() -> None:
    T = 80
    ids = np.arange(0, T, 2)  # odd tasks have no validation split
    est = np.where(np.arange(T) % 2 == 0, 1.0, np.nan)
    for step in range(20):
        chosen, _ = val_sample(ids, est, 8, seed=3, step=step)
        assert np.all(chosen % 2 == 0)


def test_estimate_of_the_worst_case_gradient_is_unbiased() -> None:
    T, k, d = 120, VAL_TASKS_PER_STEP, 5
    rng = np.random.default_rng(1)
    losses = rng.uniform(1.0, 2.5, T)
    _, q = smooth_max(losses, 0.5)
    grads = rng.normal(size=(T, d))
    exact = q @ grads
    steps = 4000
    estimates = np.zeros((steps, d))
    for step in range(steps):
        chosen, weight = val_sample(np.arange(T), losses, k, seed=2, step=step)
        estimates[step] = (q[chosen] * weight[chosen]) @ grads[chosen]
    stderr = estimates.std(axis=0) / np.sqrt(steps)
    # Statistical, not rounding: an unbiased mean of 4000 fixed-seed draws
    # lies within 4 standard errors (a biased one, off by its bias, does not).
    assert np.all(np.abs(estimates.mean(axis=0) - exact) < 4 * stderr)


def _shards(root, tasks: int, rows: int):
    """A prepared pool written directly (no Ray): random token ids per task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymix.data import PreparedPool

    rng = np.random.default_rng(0)
    names = tuple(f"t{i}" for i in range(tasks))
    stats: dict = {"train": {}, "val": {}, "test": {},
                   "shards": {"train": [[i] for i in range(tasks)], "val": [[i] for i in range(tasks)]}}
    for split in ("train", "val"):
        for i, t in enumerate(names):
            d = root / f"split={split}" / f"shard={i}"
            d.mkdir(parents=True)
            ids = [rng.integers(3, 50, size=int(rng.integers(8, 16))).tolist() for _ in range(rows)]
            pq.write_table(pa.table({"id": [f"{t}-{j}" for j in range(rows)],
                                     "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                                     "prompt_len": pa.array([4] * rows, type=pa.int32()),
                                     "status": ["ok"] * rows, "task_idx": pa.array([i] * rows, type=pa.int32())}),
                           d / "part-0.parquet")
            stats[split][t] = {"examples": rows, "tokens": sum(map(len, ids))}
    for t in names:
        stats["test"][t] = {"examples": 0, "tokens": 0}
    return PreparedPool(str(root), names, stats, True, 0.0)


def test_meta_step_on_a_large_pool_reads_only_the_sampled_tasks(tmp_path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raymix.config import AdaptConfig
    from raymix.policies.adapt.signal import MetaSignals

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64))
    T, k = 12, 4
    pool = _shards(tmp_path, T, rows=6)
    cfg = AdaptConfig(tasks_per_step=2, examples_per_task=2, val_examples_per_task=2)
    meta = MetaSignals(model, cfg, pool, 0, 1, seed=0, pad_id=0, device=torch.device("cpu"), distributed=False,
                       val_tasks=k)
    for _ in range(3):
        s = meta.compute(lookahead_lr=0.01)
        assert s["val_tasks_read"] == k
        read = np.asarray(s["meta_tokens"]) > 0
        aligned = np.isfinite(s["alignment"])
        assert aligned.sum() == 2 and read.sum() <= k + 2 and np.all(read[aligned])
        val = np.asarray(s["val_loss"])
        assert np.isfinite(val).sum() >= k  # read ones, and estimates kept from earlier steps
        assert np.all(np.asarray(s["q"])[~np.isfinite(val)] == 0)
    state = meta.state_dict()
    other = MetaSignals(model, cfg, pool, 0, 1, seed=0, pad_id=0, device=torch.device("cpu"), distributed=False,
                        val_tasks=k)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.val_estimate, meta.val_estimate)
    a, b = meta.compute(0.01), other.compute(0.01)
    # A resumed step reads and weighs the same: one process, the same model,
    # examples and kernels, so bit-identical (a wrong sample or weight is not).
    np.testing.assert_array_equal(a["alignment"], b["alignment"])
    # A pool no larger than the sample reads every task at every step.
    small = MetaSignals(model, cfg, pool, 0, 1, seed=0, pad_id=0, device=torch.device("cpu"), distributed=False,
                        val_tasks=T)
    assert small.compute(0.01)["val_tasks_read"] == T


def test_signal_share_cuts_a_large_pools_sample_to_the_interval(tmp_path) -> None:
    """policy.adapt.signal_share: on a pool larger than tasks_per_step a meta
    step reads about signal_share of the interval's examples (at least
    MIN_TASKS_PER_STEP tasks); a pool of at most tasks_per_step tasks reads
    every task whatever the interval."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raymix.config import AdaptConfig
    from raymix.policies.adapt.signal import MIN_TASKS_PER_STEP, MetaSignals, signal_cut

    cfg = AdaptConfig(tasks_per_step=8, examples_per_task=2, val_examples_per_task=2, signal_share=0.25)
    assert signal_cut(cfg, 48) == MIN_TASKS_PER_STEP  # floor(0.25 * 48 / 4) = 3, below the floor of 4
    assert signal_cut(cfg, 100) == 6  # floor(0.25 * 100 / 4)
    assert signal_cut(cfg, None) is None and signal_cut(AdaptConfig(signal_share=None), 100) is None

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64))
    T = 12
    pool = _shards(tmp_path, T, rows=6)

    def build(c, interval, val_tasks=8):
        return MetaSignals(model, c, pool, 0, 1, seed=0, pad_id=0, device=torch.device("cpu"), distributed=False,
                           val_tasks=val_tasks, interval_examples=interval)

    cut = build(cfg, 20)  # 0.25 * 20 / 4 = 1: the floor of four tasks
    s = cut.compute(0.01)
    assert cut.train_tasks == MIN_TASKS_PER_STEP and cut.val_tasks == MIN_TASKS_PER_STEP
    assert np.isfinite(s["alignment"]).sum() == MIN_TASKS_PER_STEP and s["val_tasks_read"] == MIN_TASKS_PER_STEP
    wide = build(cfg, 1000)  # the cut (62) is above tasks_per_step: tasks_per_step binds
    assert wide.train_tasks == 8 and wide.val_tasks == 8
    assert build(AdaptConfig(tasks_per_step=8, examples_per_task=2, val_examples_per_task=2, signal_share=None),
                 20).train_tasks == 8
    small = build(AdaptConfig(tasks_per_step=T, examples_per_task=2, val_examples_per_task=2), 20, val_tasks=T)
    s = small.compute(0.01)
    assert small.train_tasks == T and small.val_tasks is None
    assert np.isfinite(s["alignment"]).sum() == T and s["val_tasks_read"] == T


def _exact_signals(model, ref, cfg, T):
    """<g_val, g_i> by plain autograd, one task at a time, on the examples a
    MetaSignals built like ``ref`` reads (same streams, same positions)."""
    import torch

    from raymix.loss import token_nll
    from raymix.streams import collate

    params = ref.params

    def mean_nll(stream, n):
        nll, cnt = token_nll(model, collate([stream.next() for _ in range(n)], 0), torch.device("cpu"))
        return nll.sum() / cnt.sum()

    def flat(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    val = [mean_nll(ref.val[i], cfg.val_examples_per_task) for i in range(T)]
    _, q = smooth_max(np.array([v.item() for v in val]), cfg.tau)
    g_val = flat(sum(float(q[j]) * val[j] for j in range(T)))
    g_train = [flat(mean_nll(ref.train[i], cfg.examples_per_task)) for i in range(T)]
    exact = np.array([float(g @ g_val) for g in g_train])
    norms = np.array([float(g.norm() * g_val.norm()) for g in g_train])
    return exact, norms


def test_meta_signals_equal_exact_inner_products(tmp_path, monkeypatch) -> None:
    """Sketch off: MetaSignals' alignments equal <grad J, grad L_i> computed
    directly. Tolerance 1e-5 relative (to the largest alignment): the model is
    float64 but token_nll takes the cross-entropy in float32 (about 1e-7
    relative per element) and the batches are padded differently, so the two
    computations differ by rounding only; any slip in the algebra (a missing
    q weight, token count or rank share) is an O(1) error.
    Sketch on (a fresh hash per step): within 6 standard deviations of the
    CountSketch bound sqrt((|g_val|^2 |g_i|^2 + <g_val, g_i>^2) / k)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raymix.config import AdaptConfig
    from raymix.policies.adapt.signal import MetaSignals

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32,
                                         max_position_embeddings=64)).double()
    T = 5
    pool = _shards(tmp_path, T, rows=8)
    cpu = torch.device("cpu")
    cfg = AdaptConfig(examples_per_task=3, val_examples_per_task=4, sketch_above=None)

    def build(c):
        return MetaSignals(model, c, pool, 0, 1, seed=0, pad_id=0, device=cpu, distributed=False)

    meta, ref = build(cfg), build(cfg)
    got = np.asarray(meta.compute(0.01)["alignment"])
    exact, norms = _exact_signals(model, ref, cfg, T)
    assert not meta.sketched and np.all(np.isfinite(got)) and meta.forward_mode
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max(), (got, exact)

    # The meta step reads its examples in passes of META_BATCH (20 validation
    # and 15 training examples here fit one): in passes of 3, the same
    # alignments (same tolerance: only the padding differs).
    from raymix.policies.adapt import signal

    monkeypatch.setattr(signal, "META_BATCH", 3)
    got = np.asarray(build(cfg).compute(0.01)["alignment"])
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max(), (got, exact)
    monkeypatch.undo()

    # A model whose forward has no forward-mode derivative: one backward per
    # task instead, with a warning, and the same alignments (same tolerance).
    meta, ref = build(cfg), build(cfg)

    def no_forward_ad(*_):
        raise NotImplementedError("Trying to use forward AD with my_attention that does not support it")

    meta._along_forward = no_forward_ad
    with pytest.warns(UserWarning, match="no forward-mode derivative"):
        got = np.asarray(meta.compute(0.01)["alignment"])
    assert not meta.forward_mode
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max(), (got, exact)

    k = 64
    sk_cfg = AdaptConfig(examples_per_task=3, val_examples_per_task=4, sketch_above=0, sketch_dim=k)
    meta, ref = build(sk_cfg), build(sk_cfg)
    got = np.asarray(meta.compute(0.01)["alignment"])
    first_hash = meta.sketch.bucket.clone()
    exact, norms = _exact_signals(model, ref, sk_cfg, T)
    assert meta.sketched
    bound = np.sqrt((norms**2 + exact**2) / k)
    assert np.all(np.abs(got - exact) <= 6 * bound), (got, exact, bound)
    meta.compute(0.01)
    assert not torch.equal(first_hash, meta.sketch.bucket)  # redrawn at every meta step


def test_zero_tangents_reach_the_subsets_inputs_and_change_no_derivative() -> None:
    """The forward-mode pass gives the inputs of the subset's outermost
    modules (the last layer, the final norm) explicit zero tangents, so that
    no operation mixes a dual and a plain tensor (torch's slow zero-tensor
    path on CPU). Without the hook those inputs have no tangent; with it
    they carry zeros, and the logits' tangent is the same to 1e-12 relative
    (float64; adding exact zeros changes no value, only the order in which
    torch's kernels may sum)."""
    import torch
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    from raymix.gradients import outermost_modules, select_params, zero_tangents_into

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32,
                                         max_position_embeddings=64)).double()
    params = select_params(model, "last_block")
    assert outermost_modules(model, params) == [model.model.layers[1], model.model.norm]
    assert outermost_modules(model, list(model.parameters())) == [model]
    names = {id(p): n for n, p in model.named_parameters()}
    ids = torch.randint(0, 50, (3, 7))
    seen = {}

    def capture(_module, args, kwargs):
        seen["hidden"] = fwAD.unpack_dual(args[0]).tangent
        seen["cos"] = fwAD.unpack_dual(kwargs["position_embeddings"][0]).tangent

    def tangent(hooked: bool):
        with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level(), torch.no_grad():
            ctx = zero_tangents_into(outermost_modules(model, params)) if hooked else contextlib.nullcontext()
            with ctx:
                handle = model.model.layers[1].register_forward_pre_hook(capture, with_kwargs=True)
                try:
                    duals = {names[id(p)]: fwAD.make_dual(p.detach(), torch.ones_like(p)) for p in params}
                    logits = functional_call(model, duals, (), {"input_ids": ids}).logits
                finally:
                    handle.remove()
            return fwAD.unpack_dual(logits).tangent.clone()

    plain = tangent(False)
    assert seen["hidden"] is None and seen["cos"] is None
    hooked = tangent(True)
    assert seen["hidden"] is not None and not seen["hidden"].any() and not seen["cos"].any()
    assert torch.allclose(hooked, plain, rtol=1e-12, atol=0), (hooked - plain).abs().max()


def test_zero_tangents_keep_the_containers_a_module_is_given() -> None:
    """Tuples (named ones too), lists and non-tensors reach the module as they
    were given, their floating-point tensors with zero tangents."""
    from collections import namedtuple

    import torch
    import torch.autograd.forward_ad as fwAD

    from raymix.gradients import zero_tangents_into

    Pair = namedtuple("Pair", "cos sin")
    got = {}

    class Probe(torch.nn.Module):
        def forward(self, x, pair, rest, steps):
            got.update(x=x, pair=pair, rest=rest, steps=steps)
            return x

    probe = Probe()
    with fwAD.dual_level(), zero_tangents_into([probe]):
        probe(torch.ones(2), pair=Pair(torch.ones(2), torch.ones(2)), rest=[torch.ones(1), 3], steps=torch.arange(2))
        # Inside the dual level: tangents end with it.
        assert all(fwAD.unpack_dual(t).tangent is not None for t in (got["x"], *got["pair"], got["rest"][0]))
        assert fwAD.unpack_dual(got["steps"]).tangent is None  # integers carry no tangent
    assert type(got["pair"]) is Pair and isinstance(got["rest"], list) and got["rest"][1] == 3
