"""The training step's kernels (``raymix.kernels``, ``train.attention`` and
``train.compile``): compiled forwards and the step's attention apply inside
the step alone and leave the model as it was; flex attention on packed rows
(Hugging Face's block mask from raymix's restarting positions) scores each
example as the padded batch does; flex attention is refused where torch
cannot train with it. Whole runs with compiled layers: tests/test_loop.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_packing import examples, small_model

from raymix.errors import RaymixError
from raymix.kernels import StepKernels, decoder_layers
from raymix.loss import token_nll
from raymix.packing import StepBatches, padded_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_compiled_forwards_apply_inside_the_step_only() -> None:
    from torch._dynamo.utils import counters

    model = small_model("qwen3", "sdpa")
    keys = list(model.state_dict())
    kernels = StepKernels(model, "sdpa", compile=True, device_type="cpu")
    layers = decoder_layers(model)
    assert len(layers) == 2 and kernels.active and kernels.mask_attention == "sdpa"
    [(_, batch)] = StepBatches(model, 0, True, None, 64)([(np.arange(15), examples())])
    want, _ = token_nll(model, batch, "cpu")
    counters.clear()
    with kernels():
        assert all("forward" in vars(layer) for layer in layers)  # the compiled forward shadows the class's
        got, _ = token_nll(model, batch, "cpu")
        got.sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled, not fell back
    assert all("forward" not in vars(layer) for layer in layers)
    assert list(model.state_dict()) == keys and model.config._attn_implementation == "sdpa"
    assert all(p.grad is not None for p in model.parameters())
    # Fused float32 element-wise chains and reductions in another order:
    # a few eps32 per operation on O(5) token NLLs summed over <= 60 tokens.
    assert torch.allclose(got.detach(), want.detach(), rtol=1e-5, atol=0)


def test_layers_and_later_models_of_one_shape_share_one_compiled_graph() -> None:
    """Each decoder layer's forward is compiled once per shape, not once per
    layer or per model: a second model of the same shape (the next trial of
    an in-process sweep) runs the graph already compiled, with no
    recompilation (torch stops recompiling a function after 8 and runs it
    eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        model = small_model("qwen3", "sdpa")
        [(_, batch)] = StepBatches(model, 0, True, None, 64)([(np.arange(15), examples())])
        with StepKernels(model, "sdpa", compile=True, device_type="cpu")():
            token_nll(model, batch, "cpu")[0].sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    assert not counters["recompiles"]


def test_plain_kernels_do_nothing() -> None:
    model = small_model("llama", "sdpa")
    kernels = StepKernels(model)
    assert not kernels.active
    with kernels():
        assert model.config._attn_implementation == "sdpa"


def test_flex_attention_on_packed_rows_scores_as_padded() -> None:
    """What ``train.attention=flex`` computes on a GPU: packed rows laid out
    for flex attention (positions only, no 4D mask), from which Hugging Face
    builds a block mask. Forward only: torch's flex attention has no CPU
    backward; its forward here runs the same mask, uncompiled (torch's
    reference implementation: its compiled CPU kernel needs AVX2 or wider,
    and what is checked is the mask, not the kernel)."""
    model = small_model("qwen3", "sdpa")
    ex = examples()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want, _ = token_nll(model, padded_batch(ex, 0), "cpu")
        [(idx, batch)] = StepBatches(model, 0, True, None, 64, attention="flex_attention")([(np.arange(len(ex)), ex)])
        assert batch["attention_mask"] is None and batch["input_ids"].shape[0] < len(ex)  # packed
        model.config._attn_implementation = "flex_attention"
        got = torch.zeros(len(ex))
        got[idx] = token_nll(model, batch, "cpu")[0]
    # As tests/test_packing.py's packed-against-padded comparison (float32,
    # masked keys contributing exact zeros in another blocking): rtol 1e-5.
    # A mask leaking across examples moves sums by O(0.1).
    assert torch.allclose(got, want, rtol=1e-5, atol=0)


def test_flex_attention_is_refused_where_torch_cannot_train_with_it() -> None:
    from raymix.config import load_config

    with pytest.raises(RaymixError, match=r"train.attention=flex needs a CUDA device"):
        StepKernels(small_model("llama", "sdpa"), "flex", device_type="cpu")
    with pytest.raises(RaymixError, match=r"train.attention=flex needs runtime.use_gpu=true"):
        load_config(None, ["train.attention=flex"])
    with pytest.raises(RaymixError, match=r"train.attention"):
        load_config(None, ["train.attention=flash"])
    cfg = load_config(None, ["train.attention=flex", "runtime.use_gpu=true", "train.compile=true"])
    assert cfg.train.attention == "flex" and cfg.train.compile


def test_kernels_leave_the_run_identity() -> None:
    """The same examples and loss up to floating-point order: sweep resume
    and reports treat a compiled or flex run as the same run."""
    from raymix.config import identity_hash, load_config

    base = load_config(None, ["runtime.use_gpu=true"])
    fast = load_config(None, ["runtime.use_gpu=true", "train.attention=flex", "train.compile=true"])
    assert identity_hash(base) == identity_hash(fast)
