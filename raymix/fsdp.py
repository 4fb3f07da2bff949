"""FSDP on the training path (``runtime.parallelism=fsdp``).

PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) rather than Ray's
``prepare_model(parallel_strategy="fsdp")``: Ray's option wraps the model in
FSDP1 (``FullyShardedDataParallel``), which PyTorch keeps only for
compatibility, flattens parameters (so names, ``get_output_embeddings`` and
optimizer groups change) and has no per-layer composition; FSDP2 shards each
parameter as a DTensor in place, keeps the module tree and parameter names,
and runs on CPU with the gloo process group Ray Train sets up.

The checkpoint format is the DDP one (``model.state_dict()`` and an
``optimizer.state_dict()`` keyed by parameter index): full state dicts are
gathered to rank 0 on save and sharded again on load, so a checkpoint
written under either parallelism resumes under the other.
"""

from __future__ import annotations


def shard_model(model, device):
    """Shard ``model`` over the default process group, in place: each
    decoder layer (the classes the model names in ``_no_split_modules``, the
    same unit Hugging Face uses for device maps) as its own FSDP unit, so
    only one layer's full parameters exist at a time, then the root (the
    embeddings, final norm and output layer)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from raymix.kernels import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"runtime.parallelism=fsdp: {type(model).__name__} names no decoder layer class "
                           "(_no_split_modules) to shard by")
    model.to(device)
    # bf16 parameters in forward/backward on GPU (what autocast computes in
    # anyway), gradients reduced in float32; on CPU everything stays float32.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model, opt) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers them
    (group by group, parameter by parameter)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_model_state(model) -> dict:
    """The unsharded ``state_dict()`` on CPU, on rank 0 (empty elsewhere).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model, opt, rank: int) -> dict | None:
    """The optimizer state in ``optimizer.state_dict()``'s format (indexed
    by parameter) on rank 0, None elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if rank != 0:
        return None
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def load_full_state(model, opt, model_state: dict, optimizer_state: dict) -> None:
    """Shard a full (DDP-format) model and optimizer state into ``model``
    and ``opt``; every rank passes the whole state (each read the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # Copies: the setters replace the dicts' values with shards in place.
    set_model_state_dict(model, dict(model_state), options=_options())
    names = _param_names(model, opt)
    osd = {"state": {names[i]: dict(v) for i, v in optimizer_state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                            for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, opt, osd, options=_options())
