"""FSDP helpers (raymix.fsdp) on 2 CPU processes with the gloo backend,
against the same model trained unsharded in one process: one optimizer step
with gradient accumulation and clipping, the completion-only loss (the
output-layer hook), and the full state dicts a checkpoint holds, in the DDP
format and loadable by either parallelism.

Tolerances. The sharded and the unsharded step compute the same float32
gradients through different reductions (per-rank accumulation, then gloo's
reduce-scatter, against one process accumulating all four micro-batches;
kernels whose vector width, and so summation order, depends on the CPU), so
they agree only up to rounding. A gradient element is a sum of about
N = 80 token positions x 64 (the widest inner dimension) products, so its
rounding error is at most about sqrt(N) * eps32 times the magnitude of the
terms, which are bounded by the tensor's largest gradient G:
DELTA_G = 4 * sqrt(N) * eps32 * G per tensor (4: two computations, each
with its own error, and the clipping coefficient's). Every other tolerance
is DELTA_G carried through the operations that follow it (``_adam_tol``).
Where both sides run the same kernels on the same inputs in the same
processes (the sharded resume against the uninterrupted sharded run) the
result is bit-identical and compared exactly.
"""

from __future__ import annotations

import math
import socket

import pytest

torch = pytest.importorskip("torch")

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
TERMS = 80 * 64  # products summed into one gradient element (see the docstring)
LR, BETAS, ADAM_EPS = 1e-2, (0.9, 0.999), 1e-8


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _batch(rank: int, micro: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + micro)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: the loss reads completion tokens only
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _step(model, opt, rank: int, world: int, ranks, sharded: bool, grads: dict | None = None):
    """One optimizer step over 2 micro-batches of each rank in ``ranks``; the
    loss is normalised as the worker does (by the global count, here fixed).
    ``grads`` receives the full clipped gradients the step applied."""
    from raymix.loss import token_nll

    for r in ranks:
        for k in range(2):
            if sharded:
                model.set_requires_gradient_sync(k == 1)
            nll, _ = token_nll(model, _batch(r, k), torch.device("cpu"))
            # DDP/FSDP average gradients over ranks; the reference sums ranks, so divides.
            (nll.sum() / 50 / (1 if sharded else world)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    if grads is not None:  # a collective for sharded gradients: every rank gathers
        grads.update({n: _full(p.grad) for n, p in model.named_parameters()})
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(_full(norm))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import copy
    import os

    import torch.distributed as dist

    from raymix.fsdp import full_model_state, full_optimizer_state, load_full_state, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = shard_model(_tiny_llama(), torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        grads: dict = {}
        norm = _step(model, opt, rank, world, [rank], sharded=True, grads=grads)
        # Copied as a checkpoint writes them (optimizer.state_dict(), like
        # this, refers to the live step counters).
        state, optim = copy.deepcopy((full_model_state(model), full_optimizer_state(model, opt, rank)))
        # Resume: a fresh sharded model loads the full state and takes the
        # next step exactly as the original does.
        both = copy.deepcopy([state, optim])  # the loaded optimizer goes on from these tensors
        dist.broadcast_object_list(both, src=0)
        again = shard_model(_tiny_llama(), torch.device("cpu"))
        again_opt = torch.optim.AdamW(again.parameters(), lr=LR)
        load_full_state(again, again_opt, both[0], both[1])
        _step(model, opt, rank, world, [rank], sharded=True)
        _step(again, again_opt, rank, world, [rank], sharded=True)
        after, after_again = full_model_state(model), full_model_state(again)
        if rank == 0:
            from raymix.flops import ModelFlops

            torch.save({"norm": norm, "grads": grads, "state": state, "optim": optim, "after": after,
                        "after_again": after_again, "flops": ModelFlops.of(model)}, out)
    finally:
        dist.destroy_process_group()


def _delta_g(g: torch.Tensor) -> float:
    """Bound on the rounding difference of one gradient tensor between the
    two reduction orders (the module docstring)."""
    return 4 * math.sqrt(TERMS) * EPS32 * float(g.abs().max())


def _adam_tol(g, delta, m, v, step: int, param):
    """Per element: how far AdamW's parameter update can move when its
    gradient moves anywhere in [g - delta, g + delta] (from the same moments
    m, v of earlier steps), in float64, plus the float32 rounding of the
    update (a few eps of the parameter and of the step). Near g = 0 Adam's step is
    ill-conditioned (the first one is lr * g / (|g| + eps), i.e. lr * sign(g)),
    and the tolerance grows to the 2 * lr a sign flip moves; elsewhere it is
    a few eps of the parameter."""
    b1, b2 = BETAS
    g, m, v = g.double(), m.double(), v.double()

    def update(x):
        mh = (b1 * m + (1 - b1) * x) / (1 - b1**step)
        vh = (b2 * v + (1 - b2) * x * x) / (1 - b2**step)
        return mh / (vh.sqrt() + ADAM_EPS)

    u0 = update(g)
    # u is smooth in g with at most one extremum: its largest deviation over
    # the interval is at a sample point or between two (the factor 2).
    spread = torch.stack([(update(g + t * delta) - u0).abs() for t in torch.linspace(-1, 1, 65)]).amax(0)
    # Rounding: weight decay, the moments, sqrt, two divisions, the step
    # size and the final add each round to eps/2 of their result, on both sides.
    return (2 * LR * spread + 8 * EPS32 * (param.double().abs() + LR * u0.abs())).to(torch.float32)


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs()
    tol = tol.double().expand_as(err)
    bad = err > tol
    worst = int((err / tol.clamp_min(1e-300)).argmax())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst "
                           f"{float(err.reshape(-1)[worst]):.3g} against tolerance {float(tol.reshape(-1)[worst]):.3g}")


def _on_two_ranks(worker, tmp_path):
    """Runs ``worker(rank, 2, port, out)`` in two processes (gloo on a free
    local port) and returns what rank 0 saved to ``out``."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, port, out), nprocs=2)
    return torch.load(out, weights_only=False)


@pytest.mark.timeout(300)
def test_fsdp_step_and_state_match_unsharded(tmp_path) -> None:
    got = _on_two_ranks(_worker, tmp_path)

    ref = _tiny_llama()
    from raymix.flops import ModelFlops

    # The model FLOPs count whole parameters (DTensor shapes are global) and the tied embedding once.
    assert got["flops"] == ModelFlops.of(ref)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    ref_grads: dict = {}
    ref_norm = _step(ref, ref_opt, 0, 2, [0, 1], sharded=False, grads=ref_grads)
    # A norm's relative error is at most its elements' (DELTA_G / G) plus
    # the summation's over 20k squares (eps32 * log2(n) for a cascade sum).
    assert got["norm"] == pytest.approx(ref_norm, rel=4 * math.sqrt(TERMS) * EPS32 + 16 * EPS32)
    assert ref_norm > 0.5  # clipping was active, so its sharded norm mattered

    # The gradients FSDP reduced: the unsharded ones up to rounding.
    delta = {n: _delta_g(g) for n, g in ref_grads.items()}
    assert got["grads"].keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        _close(got["grads"][n], g, torch.tensor(delta[n]), f"grad {n}")

    # The DDP checkpoint format: the same keys, plain tensors, the same values.
    ref_state, ref_optim = ref.state_dict(), ref_opt.state_dict()
    names = [n for n, _ in ref.named_parameters()]  # optimizer.state_dict()'s indices
    # State keys without a parameter of their own (the tied lm_head.weight)
    # hold the parameter they are tied to.
    param_of = {k: next(n for n, p in ref.named_parameters() if p is t) for k, t in ref.state_dict(keep_vars=True).items()}
    assert got["state"].keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert type(got["state"][k]) is torch.Tensor
        n = param_of[k]
        zero = torch.zeros_like(ref_grads[n])
        tol = _adam_tol(ref_grads[n], delta[n], zero, zero, 1, init[n])
        _close(got["state"][k], v, tol, f"parameter {k} after one step")
    assert got["optim"]["state"].keys() == ref_optim["state"].keys()
    assert got["optim"]["param_groups"] == ref_optim["param_groups"]
    b1, b2 = BETAS
    for i, st in ref_optim["state"].items():
        d = delta[names[i]]
        # exp_avg = (1 - b1) * g: the gradient's bound, scaled (+1 rounding).
        _close(got["optim"]["state"][i]["exp_avg"], st["exp_avg"],
               torch.tensor((1 - b1) * d * (1 + EPS32)), f"exp_avg {names[i]}")
        # exp_avg_sq = (1 - b2) * g^2 is tiny and quadratic (its relative
        # error doubles the gradient's, unbounded where g is near 0): compare
        # its square root, sqrt(1 - b2) * |g|, linear in g again.
        _close(got["optim"]["state"][i]["exp_avg_sq"].sqrt(), st["exp_avg_sq"].sqrt(),
               torch.tensor(math.sqrt(1 - b2) * d * (1 + EPS32)), f"sqrt(exp_avg_sq) {names[i]}")

    # ...which an unsharded (DDP) run resumes from: it loads as it is, and
    # its next step differs from the sharded one by the second gradient's
    # rounding only, carried through Adam from the checkpoint's moments.
    plain = _tiny_llama()
    plain.load_state_dict(got["state"])
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=LR)
    plain_opt.load_state_dict(got["optim"])
    plain_grads: dict = {}
    _step(plain, plain_opt, 0, 2, [0, 1], sharded=False, grads=plain_grads)
    index = {n: i for i, n in enumerate(names)}
    for k, v in plain.state_dict().items():
        n = param_of[k]
        st = got["optim"]["state"][index[n]]
        tol = _adam_tol(plain_grads[n], _delta_g(plain_grads[n]), st["exp_avg"], st["exp_avg_sq"], 2,
                        got["state"][n])
        _close(got["after"][k], v, tol, f"parameter {k} after the resumed step")
    # The sharded resume took the same step as the uninterrupted run: same
    # processes, kernels, shards and inputs, so bit-identical.
    for k, v in got["after"].items():
        torch.testing.assert_close(got["after_again"][k], v, atol=0, rtol=0)


def _compiled_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from raymix.fsdp import shard_model
    from raymix.kernels import StepKernels

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        grads: dict = {}
        for name, compile in (("eager", False), ("compiled", True)):
            model = shard_model(_tiny_llama(), torch.device("cpu"))
            kernels = StepKernels(model, compile=compile)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            grads[name] = {}
            with kernels():
                _step(model, opt, rank, world, [rank], sharded=True, grads=grads[name])
        from torch._dynamo.utils import counters

        grads["graphs"] = counters["stats"]["unique_graphs"]  # the compiled step did compile
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_compiled_layers_under_fsdp_take_the_eager_step(tmp_path) -> None:
    """``train.compile`` under FSDP2: each sharded decoder layer's forward
    compiled, its all-gather and reduce-scatter hooks outside the graph; the
    step's gradients are the eager sharded step's up to the rounding of
    another reduction order (DELTA_G, the module docstring)."""
    got = _on_two_ranks(_compiled_worker, tmp_path)
    assert got["graphs"] >= 1 and got["eager"].keys() == got["compiled"].keys() and got["eager"]
    for n, g in got["eager"].items():
        _close(got["compiled"][n], g, torch.tensor(_delta_g(g)), f"grad {n}")
