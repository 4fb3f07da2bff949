"""Padding-free micro-batches: the examples of an optimizer step packed into
rows, each example attending to itself alone with positions restarting at 0.

The step draws the same examples either way (``train.micro_batch_size`` x
the accumulation per worker); only how they are laid out changes. Padded
(``train.packing: false``, or a model that packing does not support): one
example per row, right-padded to the micro-batch's longest. Packed: the
step's examples are spread over the fewest rows of at most
``train.pack_length`` tokens whose fills are balanced (longest first, each to
the emptiest row; of the first three row counts that fit, the one computing
fewest positions), so the rows of a micro-batch end close together and
little is padded. The rows are split
into as many micro-batches as the padded layout has (the accumulation), so
every rank runs the same number of forwards per step (FSDP's all-gathers
pair up) and a micro-batch holds about the real tokens of a padded one.

Within a row, example k's tokens carry ``example_of = k`` and ``position_ids``
0..len-1; the model sees a block-diagonal causal mask (a 4D boolean mask for
SDPA, an additive one for eager attention) or, under flash and flex
attention, the restarting ``position_ids`` alone (flash attention's varlen
path reads sequence starts from them, in a batch of one row only, so there a
micro-batch's rows are joined into one; for flex attention Hugging Face
builds a block mask from them per row, which skips the blocks no example
spans). Each
example's first token is never a label (as in a padded row, where the shift
drops it), so no example is scored on its predecessor's last token.
:func:`raymix.loss.token_nll` returns the per-example sums and counts either
way, in the order the examples were drawn.

Why not a library's collator (transformers' ``DataCollatorWithFlattening``):
it flattens one micro-batch into a single row for flash attention only; raymix
needs rows of bounded length that also run on CPU (eager/SDPA masks), and the
examples' task indices kept alongside for the per-task statistics.
"""

from __future__ import annotations

import heapq
import math
from typing import Optional, Sequence

import numpy as np

# Decoder-only families whose attention honours a passed 4D mask and whose
# rotary embeddings read ``position_ids`` (checked against transformers' code
# and by tests/test_packing.py for Llama and Qwen3). Others (sliding-window
# hybrids such as Gemma 2/3, whose local layers need their own masks; models
# with learned or ALiBi positions) train padded.
PACKING_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "olmo", "olmo2", "phi3", "gemma"})
_MASK_FORMATS = {"sdpa": "bool", "eager": "additive", "flash_attention_2": None, "flash_attention_3": None,
                 "flex_attention": None}
PAD_TO_MULTIPLE = 8  # as collate pads


def row_multiple(device_type: str) -> int:
    """What a packed micro-batch's width is rounded up to: 8 on CUDA, where
    tensor-core matmuls and the fused attention kernels want aligned
    sequence lengths; 1 elsewhere, where the rounding buys nothing and
    costs positions (on the embedded default's 16 examples of about 19
    tokens in rows of 128, the real-token share is about 0.95 rounded to 8
    and 0.98 unrounded)."""
    return PAD_TO_MULTIPLE if device_type == "cuda" else 1


def packing_unsupported(model, pack_length: int, attention: Optional[str] = None) -> Optional[str]:
    """Why ``model`` cannot train on packed rows (None: it can) with the
    ``attention`` implementation (default: the model's own)."""
    config = getattr(model, "module", model).config
    mtype = getattr(config, "model_type", None)
    if mtype not in PACKING_MODEL_TYPES:
        return f"model type {mtype!r} is not one packing is known to be exact for ({', '.join(sorted(PACKING_MODEL_TYPES))})"
    impl = attention or getattr(config, "_attn_implementation", None) or "eager"
    if impl not in _MASK_FORMATS:
        return f"attention implementation {impl!r} (packing supports {', '.join(_MASK_FORMATS)})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < pack_length:
        return f"sliding-window attention ({window} tokens) is shorter than a packed row ({pack_length})"
    return None


def pack_rows(lengths: Sequence[int], capacity: int, min_rows: int = 1, multiple: int = PAD_TO_MULTIPLE,
              tries: int = 3) -> list[list[int]]:
    """Example indices per row. For a row count R (from ceil(total /
    capacity), and at least ``min_rows`` when there are as many examples),
    examples are placed longest first, each into the emptiest row; R fits
    when every row stays within ``capacity``. Of the first ``tries`` counts
    that fit, the one computing the fewest positions (R x the fullest row
    rounded up to ``multiple``) wins: balanced fills mean the rows of a
    micro-batch, padded to the fullest, waste little."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = max(1, math.ceil(sum(lengths) / capacity), min(min_rows, len(lengths)))
    best, best_cost, fitted = None, None, 0
    while fitted < tries and rows <= max(1, len(lengths)):  # one example per row always fits
        members = _longest_first(lengths, order, rows, capacity)
        if members is not None:
            fitted += 1
            fullest = max(sum(lengths[i] for i in m) for m in members)
            cost = rows * -(-fullest // multiple) * multiple
            if best_cost is None or cost < best_cost:
                best, best_cost = members, cost
        rows += 1
    return [m for m in best if m]


def _longest_first(lengths: Sequence[int], order: list[int], rows: int, capacity: int) -> Optional[list[list[int]]]:
    """Examples in ``order`` each into the emptiest of ``rows`` rows; None when one overflows."""
    heap = [(0, r) for r in range(rows)]  # (fill, row)
    members: list[list[int]] = [[] for _ in range(rows)]
    for i in order:
        fill, r = heapq.heappop(heap)
        if fill + lengths[i] > capacity:
            return None
        members[r].append(i)
        heapq.heappush(heap, (fill + lengths[i], r))
    return members


def padded_batch(examples, pad_id: int) -> dict:
    """``collate``'s right-padded batch, with each example's length."""
    import torch

    from raymix.streams import collate

    batch = collate(examples, pad_id, PAD_TO_MULTIPLE)
    batch["lengths"] = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)
    return batch


def packed_batch(examples, rows: list[list[int]], pad_id: int, mask_format: Optional[str],
                 multiple: int = PAD_TO_MULTIPLE, mask_device=None) -> dict:
    """Rows of packed examples (``rows``: indices into ``examples``, which
    become the batch's example order 0..n-1 in row order), padded to the
    fullest row rounded up to ``multiple``; the keys of a padded batch plus ``position_ids`` and
    ``example_of``; ``attention_mask`` is the 4D mask for ``mask_format``
    (None: no mask, positions only), built on ``mask_device`` (default: the
    CPU). Why build it there: it is rows x width x width (33 MB per step at
    8 rows of 2,048), about 20 ms of host time on 2 CPU cores and a 33 MB
    host-to-device copy per step; on the model's GPU it is built from the
    130 kB of segment ids."""
    import torch

    # Vectorised over the tokens (one numpy pass, not a slice per example):
    # at GPU sizes (hundreds of examples per step) the per-example loop cost
    # more host time per step than the device's step has to hide it.
    order = [i for row in rows for i in row]
    lengths = np.fromiter((len(examples[i][0]) for i in order), dtype=np.int64, count=len(order))
    prompt = np.fromiter((max(examples[i][1], 1) for i in order), dtype=np.int64, count=len(order))
    row_of = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    fills = np.bincount(row_of, weights=lengths, minlength=len(rows)).astype(np.int64)
    width = int(-(-fills.max() // multiple) * multiple)
    n, total = len(rows), int(lengths.sum())
    ends = np.cumsum(lengths)  # in the flat token order
    starts = ends - lengths
    row_start = np.concatenate(([0], np.cumsum(fills)[:-1]))  # each row's first token in the flat order
    example = np.repeat(np.arange(len(order)), lengths)  # per token: its example k (row order)
    offset = np.arange(total) - starts[example]  # per token: its position within its example
    flat_pos = row_of[example] * width + (starts - row_start[row_of])[example] + offset
    ids = np.concatenate([examples[i][0] for i in order]).astype(np.int64, copy=False) if order else np.zeros(0, np.int64)

    input_ids = np.full(n * width, pad_id, dtype=np.int64)
    input_ids[flat_pos] = ids
    labels = np.full(n * width, -100, dtype=np.int64)
    scored = offset >= prompt[example]  # each example's first token is never a label
    labels[flat_pos[scored]] = ids[scored]
    example_of = np.full(n * width, -1, dtype=np.int64)
    example_of[flat_pos] = example
    # Padding is a sequence of its own (positions 0.., attending only to
    # itself): a fully masked query would give NaN in softmax and its backward.
    position_ids = (np.arange(width)[None, :] - fills[:, None]).reshape(-1)
    position_ids[flat_pos] = offset
    shape = (n, width)
    example_of_t = torch.from_numpy(example_of.reshape(shape))
    batch = {"input_ids": torch.from_numpy(input_ids.reshape(shape)), "labels": torch.from_numpy(labels.reshape(shape)),
             "position_ids": torch.from_numpy(position_ids.reshape(shape)), "example_of": example_of_t,
             "lengths": torch.from_numpy(lengths)}
    batch["attention_mask"] = (None if mask_format is None
                               else block_causal_mask(example_of_t.to(mask_device or "cpu"), mask_format))
    return batch


def block_causal_mask(segment, mask_format: str):
    """[rows, 1, L, L]: query q sees key k when both are in one segment and
    k <= q; boolean (True: attend) or additive (0 / the float32 minimum)."""
    import torch

    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    if mask_format == "bool":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=torch.float32, device=segment.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


class StepBatches:
    """Lays out each step's drawn examples as micro-batches, and counts real
    tokens against computed positions (the utilisation)."""

    def __init__(self, model, pad_id: int, packing: bool, pack_length: Optional[int], max_seq_len: int,
                 log=print, multiple: Optional[int] = None, attention: Optional[str] = None):
        """``attention``: the implementation the batches are computed with
        (:class:`raymix.kernels.StepKernels`); default: the model's own."""
        self.pad_id = pad_id
        self.device = next(model.parameters()).device  # where 4D masks are built
        # Packed widths round to row_multiple(the model's device) unless given.
        self.multiple = multiple or row_multiple(self.device.type)
        self.pack_length = pack_length or max_seq_len
        config = getattr(model, "module", model).config
        attention = attention or getattr(config, "_attn_implementation", None) or "eager"
        reason = packing_unsupported(model, self.pack_length, attention) if packing else "train.packing is false"
        self.packed = reason is None
        self.mode = "packed" if self.packed else f"padded ({reason})"
        if packing and not self.packed:
            log(f"[raymix] training on padded batches: {reason}")
        self.mask_format = _MASK_FORMATS.get(attention)
        # Hugging Face's flash path separates packed sequences by their
        # position_ids only in a batch of one row (with several, each row is
        # one causal sequence, across its examples): a micro-batch's rows
        # are joined into one (each row's padding restarts its positions).
        self.flatten = attention.startswith("flash_attention")

    def __call__(self, draws: list[tuple[np.ndarray, list]]) -> list[tuple[np.ndarray, dict]]:
        """``draws``: per micro-batch as drawn, (task indices, examples).
        Returns (task index per example, batch) per micro-batch to compute;
        each batch's examples in the order of its ``lengths`` and of
        ``token_nll``'s results."""
        if not self.packed:
            return [(idx, padded_batch(examples, self.pad_id)) for idx, examples in draws]
        tasks = np.concatenate([idx for idx, _ in draws])
        examples = [e for _, ex in draws for e in ex]
        rows = pack_rows([len(ids) for ids, _ in examples], self.pack_length, min_rows=len(draws),
                         multiple=self.multiple)
        rows.sort(key=lambda row: -sum(len(examples[i][0]) for i in row))  # like fills share a micro-batch
        out = []
        for part in np.array_split(np.arange(len(rows)), len(draws)):
            group = [rows[r] for r in part]
            order = [i for row in group for i in row]
            batch = packed_batch(examples, group, self.pad_id, self.mask_format, self.multiple, self.device)
            if self.flatten:
                for key in ("input_ids", "labels", "position_ids", "example_of"):
                    batch[key] = batch[key].reshape(1, -1)
            out.append((tasks[order], batch))
        return out
