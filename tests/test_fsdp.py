"""FSDP helpers (raymix.fsdp) on 2 CPU processes with the gloo backend,
against the same model trained unsharded in one process: one optimizer step
with gradient accumulation and clipping, the completion-only loss (the
output-layer hook), and the full state dicts a checkpoint holds, in the DDP
format and loadable by either parallelism."""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")


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


def _step(model, opt, rank: int, world: int, ranks, sharded: bool):
    """One optimizer step over 2 micro-batches of each rank in ``ranks``; the
    loss is normalised as the worker does (by the global count, here fixed)."""
    from raymix.loss import token_nll

    for r in ranks:
        for k in range(2):
            if sharded:
                model.set_requires_gradient_sync(k == 1)
            nll, _ = token_nll(model, _batch(r, k), torch.device("cpu"))
            # DDP/FSDP average gradients over ranks; the reference sums ranks, so divides.
            (nll.sum() / 50 / (1 if sharded else world)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norm = _step(model, opt, rank, world, [rank], sharded=True)
        # Copied as a checkpoint writes them (optimizer.state_dict(), like
        # this, refers to the live step counters).
        state, optim = copy.deepcopy((full_model_state(model), full_optimizer_state(model, opt, rank)))
        # Resume: a fresh sharded model loads the full state and takes the
        # next step exactly as the original does.
        both = copy.deepcopy([state, optim])  # the loaded optimizer goes on from these tensors
        dist.broadcast_object_list(both, src=0)
        again = shard_model(_tiny_llama(), torch.device("cpu"))
        again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
        load_full_state(again, again_opt, both[0], both[1])
        _step(model, opt, rank, world, [rank], sharded=True)
        _step(again, again_opt, rank, world, [rank], sharded=True)
        after, after_again = full_model_state(model), full_model_state(again)
        if rank == 0:
            torch.save({"norm": norm, "state": state, "optim": optim, "after": after,
                        "after_again": after_again}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_fsdp_step_and_state_match_unsharded(tmp_path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2)
    got = torch.load(out, weights_only=False)

    ref = _tiny_llama()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_norm = _step(ref, ref_opt, 0, 2, [0, 1], sharded=False)
    assert got["norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > 0.5  # clipping was active, so its sharded norm mattered

    # The DDP checkpoint format: the same keys, plain tensors, the same values.
    ref_state, ref_optim = ref.state_dict(), ref_opt.state_dict()
    assert got["state"].keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert type(got["state"][k]) is torch.Tensor
        torch.testing.assert_close(got["state"][k], v, atol=1e-6, rtol=1e-5)
    assert got["optim"]["state"].keys() == ref_optim["state"].keys()
    assert got["optim"]["param_groups"] == ref_optim["param_groups"]
    for i, st in ref_optim["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optim"]["state"][i][key], st[key], atol=1e-7, rtol=1e-4)

    # ...which an unsharded (DDP) run resumes from: it loads as it is.
    plain = _tiny_llama()
    plain.load_state_dict(got["state"])
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain_opt.load_state_dict(got["optim"])
    _step(plain, plain_opt, 0, 2, [0, 1], sharded=False)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(got["after"][k], v, atol=1e-6, rtol=1e-5)
    # The sharded resume took the same step as the uninterrupted run.
    for k, v in got["after"].items():
        torch.testing.assert_close(got["after_again"][k], v, atol=0, rtol=0)
