"""Packed micro-batches (``raymix.packing``): the packer places every example
once within its row length; a packed batch gives each example the NLL sum,
completion count and gradient that a padded batch gives it (on Llama and
Qwen3, under SDPA and eager attention); models packing does not support train
padded with the reason; and the step's layout keeps the drawn examples' task
indices in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymix.loss import completion_token_nll, token_nll
from raymix.packing import StepBatches, pack_rows, packed_batch, packing_unsupported, padded_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 97


def small_model(kind: str, attention: str):
    """A float32 decoder of width 32 with two blocks and grouped-query
    attention (4 heads, 2 key/value heads), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                  tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    model.config._attn_implementation = attention
    return model


def examples(n: int = 14, seed: int = 0, longest: int = 60):
    """Random (ids, prompt length) pairs: lengths 4..longest, prompts from 0
    (every token but the first scored) to all but one token."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, longest + 1))
        out.append((rng.integers(1, VOCAB, length), int(rng.integers(0, length - 1))))
    out.append((rng.integers(1, VOCAB, 20), 0))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_example_once_within_capacity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(v) for v in rng.integers(1, 129, 50)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(50))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 128
    # Longest first to the emptiest row needs a few rows more than the bound at most.
    assert -(-sum(lengths) // 128) <= len(rows) <= -(-sum(lengths) // 128) + 5
    # 16 examples of 18 tokens: 3 rows (the fewest) hold 6, 5, 5 (108 tokens,
    # padded to 112: 336 positions); 4 rows of 4 (72: 288 positions) compute fewer.
    assert [len(r) for r in pack_rows([18] * 16, 128)] == [4, 4, 4, 4]
    assert [len(r) for r in pack_rows([18] * 16, 128, tries=1)] == [6, 5, 5]
    assert len(pack_rows(lengths[:6], 10**6, min_rows=4)) >= 4  # a row for each micro-batch at least
    assert len(pack_rows([3, 3], 100, min_rows=5)) == 2  # never an empty row
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([129], 128)


def test_packed_batch_layout() -> None:
    ex = [(np.array([5, 6, 7]), 1), (np.array([8, 9]), 0), (np.array([10, 11, 12, 13]), 2)]
    batch = packed_batch(ex, [[0, 1], [2]], pad_id=0, mask_format="bool")
    assert batch["input_ids"][0, :5].tolist() == [5, 6, 7, 8, 9] and batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert batch["example_of"][0].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    # A second example's first token (prompt length 0) is no label: nothing
    # predicts it from its predecessor, as a padded row's shift drops it.
    assert batch["labels"][0, :5].tolist() == [-100, 6, 7, -100, 9]
    assert batch["labels"][1, :4].tolist() == [-100, -100, 12, 13]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 6].tolist() == [False] * 5 + [True, True, False]  # padding sees padding alone
    additive = packed_batch(ex, [[0, 1], [2]], 0, "additive")["attention_mask"]
    assert torch.equal(additive == 0, mask)
    assert packed_batch(ex, [[0, 1], [2]], 0, None)["attention_mask"] is None
    assert batch["lengths"].tolist() == [3, 2, 4]


def _packed_one_by_one(examples, rows, pad_id: int, multiple: int) -> dict:
    """The packed layout written example by example (what packed_batch
    computes at once over all tokens): the reference it is checked against."""
    fills = [sum(len(examples[i][0]) for i in row) for row in rows]
    width = -(-max(fills) // multiple) * multiple
    out = {k: torch.full((len(rows), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", -100), ("example_of", -1), ("position_ids", 0))}
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ids, plen = examples[i]
            t, end = torch.from_numpy(ids), start + len(ids)
            out["input_ids"][r, start:end] = t
            out["labels"][r, start + max(plen, 1):end] = t[max(plen, 1):]
            out["example_of"][r, start:end] = k
            out["position_ids"][r, start:end] = torch.arange(len(ids))
            start, k = end, k + 1
        out["position_ids"][r, start:] = torch.arange(width - start)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_packed_batch_equals_its_example_by_example_reference(seed: int) -> None:
    """Random examples (prompt lengths 0 to the whole example), rows from
    pack_rows, widths rounded to 1 and 8: every tensor equal."""
    rng = np.random.default_rng(seed)
    ex = []
    for _ in range(int(rng.integers(1, 60))):
        n = int(rng.integers(1, 40))
        ex.append((rng.integers(1, 500, size=n), int(rng.integers(0, n + 1))))
    for multiple in (1, 8):
        rows = pack_rows([len(ids) for ids, _ in ex], 64, min_rows=int(rng.integers(1, 4)), multiple=multiple)
        batch = packed_batch(ex, rows, 0, "bool", multiple)
        want = _packed_one_by_one(ex, rows, 0, multiple)
        for key, value in want.items():
            assert torch.equal(batch[key], value), (key, multiple)
        order = [i for row in rows for i in row]
        assert batch["lengths"].tolist() == [len(ex[i][0]) for i in order]
        segment = want["example_of"]
        allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(segment.shape[1], segment.shape[1],
                                                                            dtype=torch.bool).tril()
        assert torch.equal(batch["attention_mask"], allowed[:, None])


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_and_gradients_match_padded(kind: str, attention: str) -> None:
    model = small_model(kind, attention)
    ex = examples()
    padded = padded_batch(ex, 0)
    want_nll, want_cnt = token_nll(model, padded, "cpu")
    params = list(model.parameters())
    want_grad = torch.autograd.grad(want_nll.sum(), params)
    layout = StepBatches(model, 0, packing=True, pack_length=None, max_seq_len=64)
    assert layout.packed and layout.mode == "packed"
    # Two draws of a step; their task indices here are the examples' own numbers.
    micro = layout([(np.arange(7), ex[:7]), (np.arange(7, len(ex)), ex[7:])])
    assert len(micro) == 2 and all(b["input_ids"].shape[1] <= 64 for _, b in micro)
    got_nll, got_cnt = torch.zeros(len(ex)), torch.zeros(len(ex))
    got_grad = [torch.zeros_like(p) for p in params]
    for idx, batch in micro:
        assert batch["lengths"].tolist() == [len(ex[i][0]) for i in idx]
        nll, cnt = token_nll(model, batch, "cpu")
        got_nll[idx], got_cnt[idx] = nll.detach(), cnt
        for acc, g in zip(got_grad, torch.autograd.grad(nll.sum(), params)):
            acc += g
    assert torch.equal(got_cnt, want_cnt)
    positions = sum(b["input_ids"].numel() for _, b in micro)
    assert positions < padded["input_ids"].numel()
    # float32 throughout. The two layouts run the same per-position
    # arithmetic except the attention's reductions (softmax sum and the
    # weighted sum of values run over masked keys of other examples or of
    # padding, both contributing exact zeros, but in another blocking) and
    # the matmuls' blocking over a different number of rows: each logit may
    # move by a few eps32 (1.2e-7) times its O(1) magnitude; an example's NLL
    # sums <= 60 token NLLs of O(5), each moving by <= 2x its logits' error:
    # rtol 1e-5 (about 80 eps32) bounds it; leaking attention across
    # examples moves sums by O(0.1) (the padded path differs by 0.18 here
    # without the mask).
    assert torch.allclose(got_nll, want_nll.detach(), rtol=1e-5, atol=0)
    # Gradients: sums of the same per-token terms, so the same relative
    # error, taken against each tensor's largest element (elements cancel).
    for a, b in zip(got_grad, want_grad):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_leaking_attention_would_be_caught() -> None:
    """Without the block mask, packed examples see their row predecessors:
    the comparison above then fails (the check can fail)."""
    model = small_model("llama", "sdpa")
    ex = examples()
    want, _ = token_nll(model, padded_batch(ex, 0), "cpu")
    [(idx, batch)] = StepBatches(model, 0, True, None, 64)([(np.arange(len(ex)), ex)])
    batch["attention_mask"], batch["position_ids"] = None, None
    got = torch.zeros(len(ex))
    got[idx] = token_nll(model, batch, "cpu")[0].detach()
    assert not torch.allclose(got, want.detach(), rtol=1e-3, atol=0)


def test_completion_tokens_name_their_example() -> None:
    """DoReMi's per-token losses: in a packed batch each token's example is
    its ``example_of`` index, counted as ``token_nll`` counts."""
    model = small_model("llama", "sdpa")
    ex = examples()
    [(idx, batch)] = StepBatches(model, 0, True, None, 64)([(np.arange(len(ex)), ex)])
    owner, _, _ = completion_token_nll(model, batch, "cpu")
    _, cnt = token_nll(model, batch, "cpu")
    assert torch.equal(torch.bincount(owner, minlength=len(ex)).float(), cnt)


def test_unsupported_models_train_padded_with_the_reason() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert "model type 'gpt2'" in packing_unsupported(gpt2, 64)
    said = []
    layout = StepBatches(gpt2, 0, True, None, 64, log=said.append)
    assert not layout.packed and "gpt2" in layout.mode and "gpt2" in said[0]
    ex = examples(4)
    [(idx, batch)] = layout([(np.array([3, 1, 2, 0, 1]), ex)])
    assert idx.tolist() == [3, 1, 2, 0, 1] and batch["attention_mask"].shape == batch["input_ids"].shape
    model = small_model("llama", "paged|sdpa")  # generation's paged attention: no packed-row mask
    assert "paged|sdpa" in packing_unsupported(model, 64)
    model = small_model("llama", "sdpa")
    model.config.sliding_window = 32
    assert "sliding-window" in packing_unsupported(model, 64)
    off = StepBatches(small_model("llama", "sdpa"), 0, False, None, 64, log=said.append)
    assert not off.packed and off.mode == "padded (train.packing is false)" and len(said) == 1


def test_flash_attention_gets_positions_alone() -> None:
    """Under flash attention the model reads sequence starts from the
    restarting ``position_ids``: no 4D mask is built."""
    model = small_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    ex = examples(4)
    [(_, batch)] = StepBatches(model, 0, True, None, 64)([(np.arange(5), ex)])
    assert batch["attention_mask"] is None and int((batch["position_ids"] == 0).sum()) >= 5


def test_flash_attention_rows_are_sequences_it_separates() -> None:
    """Hugging Face's flash path reads sequence starts from ``position_ids``
    only for a batch of one row (``_is_packed_sequence``); with several rows
    it runs plain causal attention over each row, across its examples. So
    under flash attention a packed micro-batch is one flat row, and its
    examples, labels and positions are those of the rows it joins."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    ex = examples()
    model = small_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    draws = [(np.arange(7), ex[:7]), (np.arange(7, len(ex)), ex[7:])]
    flash = StepBatches(model, 0, True, None, 64, multiple=8)(draws)
    rows = StepBatches(small_model("llama", "sdpa"), 0, True, None, 64, multiple=8)(draws)
    assert len(flash) == 2
    for (idx, batch), (want_idx, want) in zip(flash, rows):
        assert batch["attention_mask"] is None and batch["input_ids"].shape[0] == 1
        assert _is_packed_sequence(batch["position_ids"], batch["input_ids"].shape[0])
        assert idx.tolist() == want_idx.tolist() and torch.equal(batch["lengths"], want["lengths"])
        for key in ("input_ids", "labels", "position_ids", "example_of"):
            assert torch.equal(batch[key], want[key].reshape(1, -1)), key
        # a token's sequence (a run of consecutive positions) holds one example's tokens alone
        starts = torch.cat([torch.tensor([True]), batch["position_ids"][0, 1:] != batch["position_ids"][0, :-1] + 1])
        owner = batch["example_of"][0]
        seq = starts.cumsum(0)
        for s in seq.unique():
            assert len(owner[seq == s].unique()) == 1


def test_pack_length_is_validated() -> None:
    from raymix.config import load_config
    from raymix.errors import RaymixError

    with pytest.raises(RaymixError, match="train.pack_length"):
        load_config(None, ["data.max_seq_len=128", "train.pack_length=64"])
    assert load_config(None, ["train.pack_length=512"]).train.pack_length == 512


def test_packed_widths_round_to_eight_on_cuda_only() -> None:
    """Rows are padded to their fullest fill, rounded up to 8 where tensor
    cores want it (CUDA) and not at all on CPU, where rounding only adds
    positions; the real tokens are the same either way."""
    from raymix.packing import row_multiple

    assert (row_multiple("cuda"), row_multiple("cpu")) == (8, 1)
    model = small_model("llama", "sdpa")
    ex = examples()
    draws = [(np.arange(len(ex)), ex)]
    [(_, cpu)] = StepBatches(model, 0, True, None, 64)(draws)  # the model is on CPU
    [(_, gpu_like)] = StepBatches(model, 0, True, None, 64, multiple=8)(draws)
    fullest = int((cpu["example_of"] >= 0).sum(1).max())
    assert fullest % 8 and cpu["input_ids"].shape[1] == fullest  # these examples leave a remainder
    assert gpu_like["input_ids"].shape[1] % 8 == 0 and gpu_like["input_ids"].shape[1] >= fullest
    assert int((cpu["labels"] != -100).sum()) == int((gpu_like["labels"] != -100).sum())
