"""Model FLOPs of training steps, and model FLOPs utilisation (MFU).

MFU is the training FLOPs the model needs for the tokens it learns from,
per second, over the accelerator's peak: what a faster implementation of
the same work raises and what skipping work cannot. raymix's steps need
less than the usual per-token estimate (PaLM, appendix B: 6 N + 12 x
layers x heads x head size x row length) counts, in two places:

- the output layer (and its loss) runs at completion positions only
  (:mod:`raymix.loss`), so its 6 x vocabulary x hidden FLOPs are needed per
  completion token, not per token; the input embedding is a lookup (no
  matrix product);
- attention within a packed row is confined to each example (block-diagonal
  and causal): an example of n tokens needs n (n + 1) / 2 query-key pairs,
  each 4 x heads x head size FLOPs forward (scores and the weighted sum),
  3x that with the backward; not row length x row length.

So :class:`ModelFlops` counts 6 x (the other parameters) per token, 6 x the
output layer per completion token and 12 x layers x heads x head size per
causal query-key pair within an example, from counts the training step keeps
(:class:`raymix.loop.step.TrainStep`). Padding, packing slack and the masked
blocks of a row are not counted: computing them is a cost the layout pays,
which lowers MFU, as it should. :meth:`ModelFlops.palm_per_token` gives
the usual estimate for comparison with figures quoted that way.

Why not a FLOP counter (``torch.utils.flop_counter``, fvcore): they count
what the kernels run (masked attention blocks, padding and all, the hardware
FLOPs), which is the other figure; and they need a traced step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Dense bf16 peak FLOP/s by the device name's model (vendor data sheets;
# H100/H200 SXM figures: a PCIe H100 is 756e12, an NVL board 835e12). First
# match wins; a key matches where no letter or digit follows it in the name
# (an L40 is not an L4, nor an L40S an L40).
PEAK_BF16 = (("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
             ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12))


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device named ``device_name`` (as
    ``torch.cuda.get_device_name`` gives it); None for one not listed."""
    import re

    for key, flops in PEAK_BF16:
        if re.search(re.escape(key) + r"(?![A-Za-z0-9])", device_name):
            return flops
    return None


def device_peak_flops(device) -> Optional[float]:
    """The bf16 peak of a torch ``device`` (None on CPU and unlisted GPUs)."""
    import torch

    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class ModelFlops:
    body: int
    """Parameters applied at every position: all but the input embedding and the output layer."""
    output: int
    """The output layer's parameters (vocabulary x hidden), applied at completion positions."""
    parameters: int
    """Every parameter once (a tied embedding once): the N of 6 N."""
    layers: int
    attention_width: int
    """Heads x head size: a query-key pair's scores and weighted sum cost 4 x this, forward."""

    @classmethod
    def of(cls, model) -> ModelFlops:
        """From a Hugging Face causal LM (or one wrapped by DDP); parameters
        are counted by their full shapes, so FSDP's shards count whole. A
        model without the usual config fields (``num_attention_heads``,
        ``num_hidden_layers``) or embedding accessors gets no attention
        term, or its output layer counted with the rest: an undercount,
        never an error that would stop its run."""
        model = getattr(model, "module", model)
        config = model.config
        total = sum(p.numel() for p in model.parameters())  # a tied parameter once
        out_w, in_w = _weight(model, "get_output_embeddings"), _weight(model, "get_input_embeddings")
        tied = out_w is not None and (in_w is out_w or bool(getattr(config, "tie_word_embeddings", False)))
        if tied and in_w is not None and in_w is not out_w:  # tied by the config, two tensors: counted twice
            total -= in_w.numel()
        output = out_w.numel() if out_w is not None else 0
        lookup = 0 if tied or in_w is None else in_w.numel()  # tied: the one matrix is the output layer's
        heads = getattr(config, "num_attention_heads", None) or 0
        head = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else 0)
        return cls(body=total - output - lookup, output=output, parameters=total,
                   layers=getattr(config, "num_hidden_layers", None) or 0, attention_width=heads * head)

    @classmethod
    def from_config(cls, config) -> ModelFlops:
        """From a config alone: the model built on the meta device (no memory, no weights)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return cls.of(AutoModelForCausalLM.from_config(config))

    def required(self, tokens: float, completion_tokens: float, attention_pairs: float) -> float:
        """Training FLOPs (forward and backward) that ``tokens`` real tokens
        need, of which ``completion_tokens`` are scored, with
        ``attention_pairs`` causal query-key pairs within their examples."""
        return (6 * self.body * tokens + 6 * self.output * completion_tokens
                + 12 * self.layers * self.attention_width * attention_pairs)

    def palm_per_token(self, row_length: int) -> float:
        """The usual estimate per token: 6 N + 12 x layers x heads x head size x row length."""
        return 6 * self.parameters + 12 * self.layers * self.attention_width * row_length


def mfu(tokens_per_second: float, flops_per_token: float, peak: Optional[float], devices: int = 1
        ) -> Optional[float]:
    """Model FLOPs utilisation of ``devices`` accelerators of ``peak``
    FLOP/s each; None where the peak is unknown."""
    return tokens_per_second * flops_per_token / (peak * devices) if peak else None


def _weight(model, accessor: str):
    """The weight of the module ``model.<accessor>()`` returns, or None."""
    try:
        module = getattr(model, accessor)()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(module, "weight", None)


def causal_pairs(lengths) -> int:
    """Query-key pairs of causal attention within examples of ``lengths`` tokens."""
    import numpy as np

    n = np.asarray(lengths, dtype=np.int64)
    return int((n * (n + 1) // 2).sum())
