"""``raymix.loss.token_nll`` applies the output layer at completion
positions only: same losses and gradients as the full logits, on a Llama and
on a Gemma-3 (whose forward soft-caps the logits after the output layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from raymix.loss import token_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_logits_nll(model, batch):
    """The reference: logits at every position, masked afterwards."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(labels.shape)
    mask = labels != -100
    return (nll * mask).sum(1), mask.sum(1).float()


def right_padded_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [9, 5, 12, 7], [6, 2, 10, 6]
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        ids[r, :n] = torch.randint(1, vocab, (n,), generator=g)
        att[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def tiny_gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=4, intermediate_size=12, max_position_embeddings=64,
                           final_logit_softcapping=0.5, pad_token_id=0)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).double()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3-softcap"])
def test_completion_positions_only_match_full_logits(build) -> None:
    model = build(37)
    batch = right_padded_batch(37)
    got, got_cnt = token_nll(model, batch, "cpu")
    want, want_cnt = full_logits_nll(model, batch)
    assert torch.equal(got_cnt, want_cnt) and got_cnt.tolist() == [3.0, 3.0, 2.0, 1.0]
    # The model is float64 but token_nll (and the reference, alike) takes the
    # cross entropy in float32: the two logit paths (the output layer on
    # completion positions only, or on all) agree to ~1e-16, and rounded to
    # float32 they may differ by one ulp (eps32 |z|) where a logit lies at a
    # rounding boundary. |d nll / d z| sums to at most 2 per token (3 per
    # row), logits are O(1): rtol 1e-6 (8 eps32). A wrong position is off by O(1).
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got.sum() / got_cnt.sum(), params)
    g_want = torch.autograd.grad(want.sum() / want_cnt.sum(), params)
    # The same ulp in the float32 softmax reaches every gradient element as
    # at most eps32 times the tensor's largest term: compare against the
    # tensor's scale (some elements cancel to ~0, where rtol means nothing).
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6 * float(b.abs().max())) for a, b in zip(g_got, g_want))
    # The hook is gone afterwards: a plain forward gives full logits again.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape[:2] == batch["input_ids"].shape


def test_softcapping_is_kept() -> None:
    """Gemma-3's cap is applied to what the output layer returns: a head
    called apart from the model's forward would score uncapped logits."""
    model = tiny_gemma3(37)
    batch = right_padded_batch(37, seed=1)
    capped, _ = token_nll(model, batch, "cpu")
    model.config.final_logit_softcapping = None
    uncapped, _ = token_nll(model, batch, "cpu")
    assert not torch.allclose(capped, uncapped)  # a cap of 0.5 moves NLLs by O(1), far beyond the defaults


def test_rows_without_completion_tokens() -> None:
    model = tiny_llama(37)
    batch = right_padded_batch(37)
    batch["labels"][1:] = -100
    nll, cnt = token_nll(model, batch, "cpu")
    assert cnt.tolist() == [3.0, 0.0, 0.0, 0.0] and nll[1:].eq(0).all() and nll[0] > 0
    batch["labels"][:] = -100
    nll, cnt = token_nll(model, batch, "cpu")
    assert cnt.sum() == 0 and nll.eq(0).all()
