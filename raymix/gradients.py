"""Gradient helpers shared by the learned policies: the parameter subset a
meta-gradient is taken on (:func:`select_params`, :func:`gradients_only_on`,
used by ADAPT, IDEAL and GradEx), and per-example gradients on such a subset,
for influence (IDEAL) and first-order subset estimation (GradEx).

Both methods need, for every example n of a batch, the gradient of one
scalar per example (a loss, or a model output) with respect to a subset of
the parameters. A loop of one backward pass per example is exact but costs n
backward passes; for ``nn.Linear`` layers one backward pass suffices:

    y_t = W a_t + b  (t over the positions of one example)
    dℓ_n/dW = Σ_t g_{n,t} a_{n,t}ᵀ,   dℓ_n/db = Σ_t g_{n,t},   g_{n,t} = ∂ℓ_n/∂y_{n,t}

and since rows of a batch do not interact (no batch norm in causal LMs), the
gradient of Σ_n ℓ_n with respect to the layer output at row n is exactly
∂ℓ_n/∂y_n. Forward hooks record the layer inputs a, tensor hooks on the
outputs record g, and the per-example gradients are einsums of the two. The
same (a, g) pairs are the raw material of K-FAC's Kronecker factors.

Parameters of the subset that are not the weight/bias of an ``nn.Linear``
(norm scales, embeddings, a weight tied between an embedding and the output
layer), and the output layer itself (the loss applies it to completion
positions gathered from every row, :func:`raymix.loss.token_nll`), get
their per-example gradients from an exact loop of ``torch.autograd.grad``
calls over the examples of the batch (one retained graph, one backward pass
per example).

Per-example scalars come from a function ``fn(model, batch)`` returning either
a tensor of shape [n] or a pair ``(sums, counts)`` of shape [n] each (what
``raymix.loss.token_nll`` returns: summed completion-token NLL and the
completion-token count); a pair stands for the per-example mean
``sums / counts`` and the aggregate ``Σ sums / Σ counts``, and examples with a
zero count are excluded from per-example statistics.

Memory is bounded by the batch: nothing here holds per-example gradients of
more than one batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn


def select_params(model, subset: str):
    """The parameters meta-gradients are taken on (and only those): every
    parameter, the output layer (``head``), or the last decoder block and
    the final norm (``last_block``; not the output layer)."""
    named = list(model.named_parameters())
    if subset == "all":
        return [p for _, p in named]
    if subset == "head":
        head = model.get_output_embeddings()
        return [head.weight]
    layers = [n for n, _ in named if ".layers." in n]
    if not layers:
        return [p for _, p in named]
    last = max(int(n.split(".layers.")[1].split(".")[0]) for n in layers)
    prefix = f".layers.{last}."
    return [p for n, p in named if prefix in n or n.endswith("model.norm.weight")]


@contextlib.contextmanager
def gradients_only_on(model, params):
    """Within the block: gradients only for ``params`` (autograd stops before
    earlier layers) and the model in eval mode (no dropout); both restored after."""
    chosen = {id(p) for p in params}
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(id(p) in chosen)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
        model.train(was_training)


def outermost_modules(model: nn.Module, params) -> list[nn.Module]:
    """The largest modules all of whose parameters are in ``params`` (for
    ``last_block``: the last layer and the final norm), parents before none
    of their children."""
    chosen = {id(p) for p in params}
    kept: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():  # parents come before their children
        if any(k == "" or name.startswith(k + ".") for k, _ in kept):
            continue
        own = list(module.parameters())
        if own and all(id(p) in chosen for p in own):
            kept.append((name, module))
    return [m for _, m in kept]


@contextlib.contextmanager
def zero_tangents_into(modules: Sequence[nn.Module]):
    """Within the block (inside a ``torch.autograd.forward_ad.dual_level``):
    every floating-point tensor that enters one of ``modules`` without a
    tangent is given an explicit zero tangent.

    Why: when an operation meets a dual tensor and a plain one (the
    previous layer's output times a dual norm scale, rotary cos/sin times a
    dual query, a residual add), torch's forward AD stands in an efficient
    zero tensor for the missing tangent, and on CPU such operations run
    through Python reference implementations: 150-300 us each against
    about 14 us with two dual tensors (a [8, 40, 64] product, torch 2.13).
    A zero tangent adds exact zeros, so derivatives are unchanged. In
    ADAPT's forward-mode pass (llama-micro, one thread, a rank's share of
    2; medians of 12 calls alternated with and without) it took the pass from
    11.2 to 9.2 ms on a 1,000-task pool (one pass of 48 examples) and from
    45.7 to 42.8 ms on the embedded default (92 examples); three operations
    per layer still meet a Python scalar or an inner constant there."""
    import torch.autograd.forward_ad as fwAD

    def dual(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and fwAD.unpack_dual(x).tangent is None:
            return fwAD.make_dual(x, torch.zeros_like(x))
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple takes its fields as arguments
            return type(x)(*(dual(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(dual(v) for v in x)
        return x

    def hook(_module, args, kwargs):
        return tuple(dual(a) for a in args), {k: dual(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


ExampleFn = Callable[[nn.Module, Any], Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]]


class ParamSubset:
    """An ordered subset of a model's parameters and its flat layout.

    The flat vector of the subset concatenates each parameter flattened in
    row-major order (``tensor.reshape(-1)``), in the order of ``names``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        named = dict(model.named_parameters())
        missing = [n for n in names if n not in named]
        if missing:
            raise KeyError(f"no such parameters: {missing}")
        if len(set(names)) != len(names):
            raise ValueError("parameter names repeat")
        self.model = model
        self.names: list[str] = list(names)
        self.params: list[nn.Parameter] = [named[n] for n in self.names]
        self.shapes: list[torch.Size] = [p.shape for p in self.params]
        self.sizes: list[int] = [p.numel() for p in self.params]
        self.offsets: list[int] = []
        total = 0
        for s in self.sizes:
            self.offsets.append(total)
            total += s
        self.numel = total

    @classmethod
    def select(cls, model: nn.Module, subset: Union[str, Sequence[str]]) -> ParamSubset:
        """``"all"``, ``"last_block"`` or ``"head"`` (as :func:`select_params`
        chooses them), or an explicit list of parameter names."""
        if isinstance(subset, str):
            name_of = {id(p): n for n, p in model.named_parameters()}
            return cls(model, [name_of[id(p)] for p in select_params(model, subset)])
        return cls(model, list(subset))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def flatten(self, tensors: Sequence[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors (with ``batch_dims`` leading dims) into [..., numel]."""
        return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a [..., numel] tensor as per-parameter tensors [..., *shape]."""
        lead = flat.shape[:-1]
        return [flat[..., o : o + s].reshape(*lead, *shape)
                for o, s, shape in zip(self.offsets, self.sizes, self.shapes)]


def split_example_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(per-example values, sums, counts) of an ``fn`` output: a tensor [n] gives
    (values, None, None); a pair (sums, counts) gives (sums / max(counts, 1), sums, counts)."""
    if isinstance(out, (tuple, list)):
        sums, counts = out
        return sums / counts.clamp(min=1), sums, counts
    return out, None, None


def default_token_mask(batch: Any) -> torch.Tensor | None:
    """Valid positions of a batch: its ``attention_mask`` when it is a mapping that has one."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return None


@dataclass
class LinearLayer:
    """An ``nn.Linear`` whose weight (and maybe bias) is in the subset."""

    name: str
    module: nn.Linear
    weight_index: int
    bias_index: int | None  # the bias's index in the subset, None if the bias is absent or not in it
    calls: list[list[Any]] = field(default_factory=list)  # per forward call: [a, g]

    @property
    def augmented(self) -> bool:
        return self.bias_index is not None


def _shared_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


class PerExampleGrads:
    """Per-example gradients of ``fn``'s scalars on a :class:`ParamSubset`.

    ``linear_hooks=False`` computes every parameter by the exact loop (slower;
    a cross-check of the hook path).
    """

    def __init__(self, subset: ParamSubset, linear_hooks: bool = True):
        self.subset = subset
        self.model = subset.model
        index = {id(p): i for i, p in enumerate(subset.params)}
        shared = _shared_ids(self.model)
        # The output layer: raymix.loss.token_nll applies it to the
        # completion positions gathered into one row ([1, N, hidden]), so
        # its inputs are not per example: exact loop, tied or not.
        out_emb = getattr(self.model, "get_output_embeddings", lambda: None)()
        self.layers: list[LinearLayer] = []
        covered: set[int] = set()
        if linear_hooks:
            for name, module in self.model.named_modules():
                if not isinstance(module, nn.Linear) or id(module.weight) not in index:
                    continue
                if id(module.weight) in shared or module is out_emb:
                    continue  # tied (e.g. an output layer sharing the embedding), or the output layer: exact loop
                bias_index = None
                if module.bias is not None and id(module.bias) in index and id(module.bias) not in shared:
                    bias_index = index[id(module.bias)]
                self.layers.append(LinearLayer(name, module, index[id(module.weight)], bias_index))
                covered.add(index[id(module.weight)])
                if bias_index is not None:
                    covered.add(bias_index)
        self.rest: list[int] = [i for i in range(len(subset.params)) if i not in covered]

    # -- running ---------------------------------------------------------

    def _hook(self, layer: LinearLayer):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            entry: list[Any] = [inputs[0].detach(), None]
            layer.calls.append(entry)

            def grad_hook(grad, entry=entry):
                entry[1] = grad.detach()

            output.register_hook(grad_hook)

        return forward_hook

    def compute(self, batch: Any, fn: ExampleFn, rest: bool = True) -> PerExampleBatch:
        """Run ``fn`` on ``batch`` and backpropagate; ``rest=False`` skips the loop
        over the parameters outside the hooked layers (their gradients are then absent)."""
        model, params = self.model, self.subset.params
        handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        for layer in self.layers:
            layer.calls = []
        try:
            with gradients_only_on(model, params), torch.enable_grad():
                out = fn(model, batch)
                values, sums, counts = split_example_output(out)
                n = values.shape[0]
                rest_grads: dict[int, torch.Tensor] = {}
                if rest and self.rest:
                    targets = [params[i] for i in self.rest]
                    rows = []
                    for r in range(n):
                        g = torch.autograd.grad(values[r], targets, retain_graph=True, allow_unused=True)
                        rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, targets)])
                    for k, i in enumerate(self.rest):
                        rest_grads[i] = torch.stack([row[k] for row in rows]).detach()
                if self.layers:
                    weights = [layer.module.weight for layer in self.layers]
                    torch.autograd.grad(values.sum(), weights, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        calls = {}
        for li, layer in enumerate(self.layers):
            done = []
            for a, g in layer.calls:
                if g is None:
                    continue  # output did not reach the scalars
                if a.shape[0] != n or g.shape[0] != n:
                    raise ValueError(
                        f"{layer.name}: its input's first dimension ({a.shape[0]}) is not the batch ({n}); "
                        "leave this layer out of the subset or turn linear_hooks off")
                done.append((a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])))
            calls[li] = done
            layer.calls = []
        return PerExampleBatch(self, values.detach(), None if counts is None else counts.detach(),
                               None if sums is None else sums.detach(), calls, rest_grads)


@dataclass
class PerExampleBatch:
    """One batch's per-example values and the material of their gradients."""

    owner: PerExampleGrads
    values: torch.Tensor  # [n]
    counts: torch.Tensor | None  # [n] when fn gave (sums, counts)
    sums: torch.Tensor | None
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]  # layer -> [(a [n,T,in], g [n,T,out])]
    rest_grads: dict[int, torch.Tensor]  # subset index -> [n, *shape]

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """Examples that carry a gradient (a non-zero token count)."""
        if self.counts is None:
            return torch.ones(self.n, dtype=torch.bool, device=self.values.device)
        return self.counts > 0

    def augmented_inputs(self, li: int, a: torch.Tensor) -> torch.Tensor:
        """Layer inputs with a trailing 1 when the layer's bias is in the subset."""
        if self.owner.layers[li].augmented:
            return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a

    def layer_grad(self, li: int) -> torch.Tensor:
        """Per-example gradient of layer li's augmented weight [W | b]: [n, out, in(+1)]
        (float32 for half-precision models)."""
        total = None
        for a, g in self.calls[li]:
            if g.dtype in (torch.float16, torch.bfloat16):  # sum over positions in float32
                a, g = a.float(), g.float()
            part = torch.einsum("nto,nti->noi", g, self.augmented_inputs(li, a))
            total = part if total is None else total + part
        layer = self.owner.layers[li]
        if total is None:
            w = layer.module.weight
            cols = w.shape[1] + (1 if layer.augmented else 0)
            dt = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            total = torch.zeros(self.n, w.shape[0], cols, dtype=dt, device=w.device)
        return total

    def iter_grads(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(subset index, per-example gradient [n, *shape]) for every parameter
        of the subset, one at a time (a consumer may project and drop each)."""
        for li, layer in enumerate(self.owner.layers):
            full = self.layer_grad(li)
            w_cols = layer.module.weight.shape[1]
            yield layer.weight_index, full[..., :w_cols]
            if layer.bias_index is not None:
                yield layer.bias_index, full[..., w_cols]
        yield from self.rest_grads.items()

    def flat(self) -> torch.Tensor:
        """All per-example gradients as one [n, numel] tensor (small subsets only)."""
        sub = self.owner.subset
        parts: list[torch.Tensor | None] = [None] * len(sub.params)
        for i, g in self.iter_grads():
            parts[i] = g.reshape(self.n, -1)
        if any(p is None for p in parts):
            raise ValueError("some parameters have no per-example gradient (computed with rest=False)")
        return torch.cat(parts, dim=1)  # type: ignore[arg-type]


def aggregate_gradient(subset: ParamSubset, batches: Sequence[Any] | Iterator[Any], fn: ExampleFn) -> torch.Tensor:
    """Flat gradient of the aggregate loss over several batches.

    For ``fn`` returning (sums, counts) the aggregate is Σ sums / Σ counts
    (token-weighted mean NLL, as ADAPT's meta step uses); for a plain tensor it is
    the mean over all examples. Batches are accumulated, so the result equals the
    gradient of one big batch.
    """
    model, params = subset.model, subset.params
    total = torch.zeros(subset.numel, dtype=torch.float64)
    denom = 0.0
    with gradients_only_on(model, params), torch.enable_grad():
        for batch in batches:
            values, sums, counts = split_example_output(fn(model, batch))
            if sums is not None:
                numerator, denom = sums.sum(), denom + float(counts.sum())  # type: ignore[union-attr]
            else:
                numerator, denom = values.sum(), denom + values.shape[0]
            grads = torch.autograd.grad(numerator, params, allow_unused=True)
            total += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double().cpu()
                                for g, p in zip(grads, params)])
    if denom == 0:
        raise ValueError("no examples (or no completion tokens) in the batches")
    return (total / denom).to(torch.float64 if params[0].dtype == torch.float64 else torch.float32)


def lm_example_nll(device: Union[str, torch.device] = "cpu") -> ExampleFn:
    """``fn`` for causal-LM batches from ``raymix.streams.collate``: per-row
    (summed completion-token NLL, completion-token count), via ``token_nll``."""
    from raymix.loss import token_nll

    def fn(model, batch):
        return token_nll(model, batch, device)

    return fn
