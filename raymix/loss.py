"""The training loss: summed NLL over completion tokens per example.

Every part of raymix that reads a loss (the training step, the curve and
final evaluations, ADAPT's meta step, IDEAL's and GradEx's per-example
gradients) calls :func:`token_nll`, so they all score the same thing.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _output_layer_sees(model, rows, cols):
    """Within the block, the model's output layer is applied to the hidden
    states at ``(rows, cols)`` only, as one row ``[1, N, hidden]``.

    Why: the loss reads logits at completion positions alone (often a tenth
    of a padded batch), and the output layer over the vocabulary is the
    largest matmul of small models and a large one of every model; skipping
    the other positions saves its forward, its backward and the
    cross-entropy over them. A pre-hook, rather than calling the decoder and
    the head separately, keeps the model's own forward (and so what follows
    the head, such as Gemma's logit soft-capping, and DDP's forward)."""
    head = getattr(model, "module", model).get_output_embeddings()

    def gather(_module, args):
        return (args[0][rows, cols].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def token_nll(model, batch, device):
    """Per example (sum of completion-token NLL, completion-token count): per
    row of a padded batch, per ``example_of`` index of a packed one
    (:mod:`raymix.packing`)."""
    import torch

    rows, nll_tok, mask = completion_token_nll(model, batch, device)
    if batch.get("example_of") is None:
        nll = torch.zeros(mask.shape[0], dtype=nll_tok.dtype, device=nll_tok.device).index_add(0, rows, nll_tok)
        return nll, mask.sum(dim=1).to(torch.float32)
    n = len(batch["lengths"])
    nll = torch.zeros(n, dtype=nll_tok.dtype, device=nll_tok.device).index_add(0, rows, nll_tok)
    return nll, torch.zeros(n, dtype=torch.float32, device=nll_tok.device).index_add(0, rows, torch.ones_like(
        rows, dtype=torch.float32))


def completion_token_nll(model, batch, device):
    """Per completion token: (its example: its row, or in a packed batch its
    ``example_of`` index; its NLL; the [rows, positions] mask of completion
    tokens), for losses that act on single tokens (DoReMi's per-token excess
    loss, clipped at zero before averaging)."""
    import torch.nn.functional as F

    input_ids = batch["input_ids"].to(device)
    shift_labels = batch["labels"].to(device)[:, 1:]
    mask = shift_labels != -100
    rows, cols = mask.nonzero(as_tuple=True)
    attn = batch["attention_mask"]  # 2D padding mask, 4D packed mask, or None (positions only)
    extra = {} if batch.get("position_ids") is None else {"position_ids": batch["position_ids"].to(device)}
    with _output_layer_sees(model, rows, cols):
        # use_cache=False: no key/value cache to fill, and Hugging Face's
        # mask builders (flex attention's block mask among them) read packed
        # rows' sequence starts from position_ids only when no cache is
        # given: with one, a row laid out for flex attention (positions, no
        # 4D mask) attended across its examples.
        logits = model(input_ids=input_ids, attention_mask=None if attn is None else attn.to(device),
                       use_cache=False, **extra).logits
    if tuple(logits.shape[:2]) != (1, len(rows)):
        raise RuntimeError(f"{type(getattr(model, 'module', model)).__name__}'s forward reshapes the output "
                           f"layer's result ({tuple(logits.shape)}): raymix cannot score completion tokens alone")
    nll_tok = F.cross_entropy(logits[0].float(), shift_labels[rows, cols], reduction="none")
    if batch.get("example_of") is not None:  # packed: a token's example is that of its label
        rows = batch["example_of"].to(device)[:, 1:][rows, cols]
    return rows, nll_tok, mask
