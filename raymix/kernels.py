"""What the training step's forward and backward compute with
(``train.attention``, ``train.compile``): the model's own layers by default,
or flex attention and compiled decoder layers, for the step alone.

Why for the step alone: evaluation and the policies' signals (ADAPT's
forward-mode derivatives, IDEAL's and GradEx's per-example gradients) run
shapes, autograd modes and padded batches that neither torch's flex
attention (no CPU backward, no forward-mode AD) nor a compiled graph (a
recompilation per new mode) serve well, and they are a small share of a
run's time; the step is where the FLOPs are. So :class:`StepKernels` swaps
the attention implementation and the compiled forwards in on entering the
step and out on leaving it; what the model is, its parameters, state-dict
names and hooks (DDP's, FSDP2's), stays as it was.

Why these two: on one H200 the GPU check's Qwen3-0.6B shape spent 23% of
its GPU time in attention that computed every position of 2,048-token
packed rows whose examples span about 18 tokens, and most of the rest in the
unfused element-wise work of RMSNorm, rotary embeddings and SwiGLU
(README, GPU check). Flex attention's block mask skips the blocks that no
example spans; ``torch.compile`` of each decoder layer fuses the
element-wise chains (per layer, as torchtitan compiles its blocks, so the
output layer's pre-hook that gathers completion positions stays eager).
Both are torch's and Hugging Face's own (``attn_implementation=
"flex_attention"`` builds the block mask from packed rows' restarting
``position_ids``); raymix only decides where they apply.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from raymix.errors import RaymixError

# train.attention -> Hugging Face's attn_implementation (sdpa: the model's own)
ATTENTION = {"flex": "flex_attention"}


def decoder_layers(model) -> list:
    """The model's decoder layers: the classes it names in
    ``_no_split_modules`` (the same unit Hugging Face uses for device maps;
    what :mod:`raymix.fsdp` shards by and ``train.compile`` compiles)."""
    units = set(getattr(model, "_no_split_modules", None) or [])
    # By the class and its bases: FSDP2 makes a sharded layer an instance of
    # a subclass (FSDPQwen3DecoderLayer).
    return [m for m in model.modules() if any(c.__name__ in units for c in type(m).__mro__)]


def attention_unsupported(model, attention: str, device_type: str) -> Optional[str]:
    """Why the training step cannot use ``attention`` (None: it can)."""
    if attention == "sdpa":
        return None
    if device_type != "cuda":
        return ("needs a CUDA device: torch's flex attention has no backward on CPU "
                "(set runtime.use_gpu=true on a GPU machine, or train.attention=sdpa)")
    if not getattr(model, "_supports_flex_attn", False):
        return f"{type(model).__name__} does not support Hugging Face's flex_attention"
    return None


class StepKernels:
    """Enter around the training step's forward and backward (see the module's docstring)."""

    def __init__(self, model, attention: str = "sdpa", compile: bool = False, device_type: str = "cpu"):
        """``model``: the raw model (its own module, not DDP's wrapper)."""
        reason = attention_unsupported(model, attention, device_type)
        if reason:
            raise RaymixError(f"train.attention={attention} {reason}")
        self.config = model.config
        self.plain_attention = getattr(self.config, "_attn_implementation", None) or "eager"
        self.attention = ATTENTION.get(attention, self.plain_attention)
        self.compiled: list[tuple[object, object]] = []
        if compile:
            import torch

            layers = decoder_layers(model)
            if not layers:
                raise RaymixError(f"train.compile: {type(model).__name__} names no decoder layer class "
                                  "(_no_split_modules) to compile")
            # The forward, not the module's __call__: DDP's and FSDP2's hooks
            # (registered on the module) stay outside the compiled graph.
            self.compiled = [(layer, torch.compile(layer.forward)) for layer in layers]

    @property
    def active(self) -> bool:
        return bool(self.compiled) or self.attention != self.plain_attention

    @property
    def mask_attention(self) -> str:
        """The attention implementation the step's batches are laid out for
        (:class:`raymix.packing.StepBatches`)."""
        return self.attention

    @contextlib.contextmanager
    def __call__(self):
        if not self.active:
            yield
            return
        # Hugging Face reads config._attn_implementation at each forward (the
        # mask builder and every attention layer); the config is the model's own.
        self.config._attn_implementation = self.attention
        for layer, fn in self.compiled:
            layer.forward = fn  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            self.config._attn_implementation = self.plain_attention
            for layer, _ in self.compiled:
                del layer.forward
