"""IDEAL's influence scores and its volume step.

IDEAL (influence-guided data volumes) trains on per-task volumes n_j, then
scores each task j by the first-order effect of up-weighting it on a
reference (validation) loss. Up-weighting task j's loss by ε moves the
optimum by dθ/dε = -H⁻¹ ∇L_j(θ) (the classical influence function), so the
reference loss changes at the rate

    s_j = -∇L_ref(θ)ᵀ H⁻¹ ∇L_j(θ).

s_j < 0: more of task j lowers the reference loss (helpful); s_j > 0: harmful.
The volume step (:func:`ideal_volumes`) is β_j = -m·s_j / max_k |s_k|,
n_j ← (1 + β_j)·n_j, renormalised to the budget; training then restarts from
the base model on the new volumes.

H is approximated on a parameter subset by one of (:func:`fit_curvature`):

``identity``
    H = I: s_j is minus the gradient inner product (TracIn-like).
``diag_fisher``
    damped diagonal empirical Fisher, H ≈ diag(F) + λI with
    F_pp = (1/N) Σ_n (∂ℓ_n/∂θ_p)² over per-example gradients.
``kfac``
    K-FAC on the ``nn.Linear`` layers of the subset. For a layer y = W a + b
    with per-position inputs a and output gradients g = ∂ℓ_n/∂y, the
    Fisher block of the weight, flattened row-major as ``W.reshape(-1)``, is
    approximated by the Kronecker product

        F_W ≈ G ⊗ A,  A = (1/M) Σ_{tokens} ā āᵀ,  G = (1/N) Σ_{n,t} g gᵀ,

    with ā = [a; 1] when the layer's bias is in the subset (the bias is the
    last column of the augmented weight [W | b], whose row-major flattening
    the Kronecker product indexes), M the number of valid (non-padding)
    positions and N the number of examples. (With the column-major ``vec``
    of the K-FAC papers the same matrix is written A ⊗ G.) Damping is added
    to the Kronecker product itself, not to each factor: with eigen-
    decompositions A = Q_A Λ_A Q_Aᵀ and G = Q_G Λ_G Q_Gᵀ,

        (G ⊗ A + λI)⁻¹ vec(V) = vec(Q_G [(Q_Gᵀ V Q_A) ⊘ (λ_G λ_Aᵀ + λ)] Q_Aᵀ),

    which is the exact inverse of the damped Kronecker product.
``ekfac``
    EK-FAC (George et al., 2018): the same eigenbasis, with the eigenvalues
    λ_G,i λ_A,j replaced by the second moments of per-example gradients
    projected on it, Λ_ij = (1/N) Σ_n (Q_Gᵀ dW̄_n Q_A)_ij², i.e. the diagonal
    of the empirical Fisher in the Kronecker eigenbasis; inverse
    (Q_G⊗Q_A) diag(1 / (Λ + λ)) (Q_G⊗Q_A)ᵀ.

For K-FAC/EK-FAC, subset parameters that are not the weight/bias of a
hooked ``nn.Linear`` (norm scales, the output layer, tied or not) get the damped
diagonal Fisher: H is block-diagonal, Kronecker blocks per layer plus a
diagonal block for the rest.

Per-example losses are ℓ_n = (summed completion-token NLL) / (completion
tokens) for LM batches (``fn`` returning ``token_nll``'s pair), so all three
approximations estimate the same empirical Fisher (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ, and a
damping λ means the same thing for each. ``damping_mode="relative"`` (the
default) sets λ = damping × (mean diagonal entry of the undamped
approximation), which makes the default insensitive to the loss scale.

The public reference implementation of IDEAL multiplies the gradient by the
EK-FAC eigenvalues where the inverse-Hessian-vector product divides by them;
this module divides (the influence function needs H⁻¹).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch

from raymix.gradients import (
    ExampleFn,
    ParamSubset,
    PerExampleGrads,
    aggregate_gradient,
    default_token_mask,
)

Method = Literal["identity", "diag_fisher", "kfac", "ekfac"]
METHODS: tuple[str, ...] = ("identity", "diag_fisher", "kfac", "ekfac")


# ---------------------------------------------------------------------------
# Curvature approximations: each solves (H + λI) x = v on the flat subset layout


@dataclass
class IdentityCurvature:
    """H = I (no damping: s_j = -⟨∇L_ref, ∇L_j⟩)."""

    kind: str = "identity"
    damping: float = 0.0

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return v.clone()


@dataclass
class DiagFisher:
    """(diag(F) + λI)⁻¹ with F_pp = (1/N) Σ_n g_{n,p}²."""

    diag: torch.Tensor  # [numel]
    damping: float  # absolute λ
    kind: str = "diag_fisher"

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        d = self.diag.to(device=v.device, dtype=v.dtype)
        return v / (d + self.damping)


@dataclass
class KroneckerBlock:
    """One ``nn.Linear`` layer's factors, on its augmented weight [W | b] (out × in(+1))."""

    name: str
    weight_offset: int
    out_features: int
    in_features: int
    bias_offset: int | None
    A: torch.Tensor  # (in(+1)) x (in(+1)), input second moment
    G: torch.Tensor  # out x out, output-gradient second moment
    eig_A: torch.Tensor
    vec_A: torch.Tensor  # columns: eigenvectors of A
    eig_G: torch.Tensor
    vec_G: torch.Tensor
    ekfac: torch.Tensor | None = None  # out x in(+1): corrected eigenvalues (EK-FAC)

    @property
    def cols(self) -> int:
        return self.in_features + (1 if self.bias_offset is not None else 0)

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the block in the Kronecker eigenbasis, laid out out × in(+1)."""
        if self.ekfac is not None:
            return self.ekfac
        return self.eig_G[:, None] * self.eig_A[None, :]

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """[k, numel] -> [k, out, in(+1)]."""
        o, i = self.out_features, self.in_features
        w = v[:, self.weight_offset : self.weight_offset + o * i].reshape(-1, o, i)
        if self.bias_offset is None:
            return w
        b = v[:, self.bias_offset : self.bias_offset + o]
        return torch.cat([w, b.unsqueeze(-1)], dim=-1)

    def scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        o, i = self.out_features, self.in_features
        out[:, self.weight_offset : self.weight_offset + o * i] = x[..., :i].reshape(-1, o * i)
        if self.bias_offset is not None:
            out[:, self.bias_offset : self.bias_offset + o] = x[..., i]


@dataclass
class KroneckerCurvature:
    """Block-diagonal K-FAC / EK-FAC: a Kronecker block per linear layer, damped
    diagonal Fisher on ``rest`` (the subset's other parameters)."""

    blocks: list[KroneckerBlock]
    rest: list[tuple[int, int]]  # (offset, size) of each non-linear parameter in the flat layout
    rest_diag: list[torch.Tensor]  # per rest parameter, its diagonal Fisher (flat)
    damping: float  # absolute λ
    kind: str = "kfac"

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        squeeze = v.dim() == 1
        vv = v.unsqueeze(0) if squeeze else v
        out = torch.empty_like(vv)
        for blk in self.blocks:
            dt = vv.dtype
            qg, qa = blk.vec_G.to(device=vv.device, dtype=dt), blk.vec_A.to(device=vv.device, dtype=dt)
            x = blk.gather(vv)
            y = qg.transpose(0, 1) @ x @ qa  # coordinates in the Kronecker eigenbasis
            y = y / (blk.eigenvalues().to(device=vv.device, dtype=dt) + self.damping)
            blk.scatter(out, qg @ y @ qa.transpose(0, 1))
        for (off, size), d in zip(self.rest, self.rest_diag):
            out[:, off : off + size] = vv[:, off : off + size] / (d.to(device=vv.device, dtype=vv.dtype) + self.damping)
        return out[0] if squeeze else out


Curvature = Union[IdentityCurvature, DiagFisher, KroneckerCurvature]


# ---------------------------------------------------------------------------
# Fitting


def _factor_dtype(subset: ParamSubset, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if subset.params[0].dtype == torch.float64 else torch.float32


def _token_weights(a: torch.Tensor, batch: Any, valid: torch.Tensor, token_mask) -> torch.Tensor:
    """[n, T] weights of a layer call's positions: valid tokens of valid examples."""
    n, T = a.shape[0], a.shape[1]
    mask = token_mask(batch) if token_mask is not None else None
    w = torch.ones(n, T, dtype=torch.bool, device=a.device)
    if mask is not None and mask.shape == (n, T):
        w = mask.to(a.device).bool()
    return w & valid.to(a.device)[:, None]


def _resolve_damping(damping: float, mode: str, trace: float, numel: int) -> float:
    if mode == "absolute":
        return float(damping)
    if mode == "relative":
        return float(damping) * (trace / max(numel, 1))
    raise ValueError(f"damping_mode must be 'absolute' or 'relative', not {mode!r}")


def fit_curvature(
    subset: ParamSubset,
    batches: Sequence[Any],
    fn: ExampleFn,
    method: Method = "kfac",
    damping: float = 0.1,
    damping_mode: Literal["relative", "absolute"] = "relative",
    token_mask=default_token_mask,
    dtype: torch.dtype | None = None,
) -> Curvature:
    """Fit H on ``batches`` (a re-iterable sequence: EK-FAC reads it twice).

    ``fn(model, batch)`` gives per-example losses (a tensor [n], or token_nll's
    (sums, counts) pair). ``token_mask(batch)`` gives the valid positions [n, T]
    that count in K-FAC's input factor A (default: the batch's attention mask).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method == "identity":
        return IdentityCurvature()
    fdt = _factor_dtype(subset, dtype)
    if method == "diag_fisher":
        peg = PerExampleGrads(subset)
        diag = torch.zeros(subset.numel, dtype=fdt)
        N = 0
        for batch in batches:
            res = peg.compute(batch, fn)
            valid = res.valid
            N += int(valid.sum())
            for i, g in res.iter_grads():
                off, size = subset.offsets[i], subset.sizes[i]
                sq = (g[valid].reshape(-1, size).to(fdt) ** 2).sum(0)
                diag[off : off + size] += sq.cpu()
        if N == 0:
            raise ValueError("no examples with a gradient in the curvature batches")
        diag /= N
        lam = _resolve_damping(damping, damping_mode, float(diag.sum()), subset.numel)
        return DiagFisher(diag, lam)

    peg = PerExampleGrads(subset)
    L = len(peg.layers)
    A: list[torch.Tensor | None] = [None] * L
    G: list[torch.Tensor | None] = [None] * L
    tokens = [0] * L
    rest_diag = {i: torch.zeros(subset.sizes[i], dtype=fdt) for i in peg.rest}
    N = 0
    for batch in batches:
        res = peg.compute(batch, fn)
        valid = res.valid
        N += int(valid.sum())
        for li in range(L):
            for a, g in res.calls[li]:
                w = _token_weights(a, batch, valid, token_mask)
                abar = res.augmented_inputs(li, a).to(fdt)[w]  # [m, in(+1)]
                gg = g.to(fdt).reshape(-1, g.shape[-1])
                a_cov = abar.transpose(0, 1) @ abar  # accumulated where the model runs
                g_cov = gg.transpose(0, 1) @ gg
                prev_a, prev_g = A[li], G[li]
                A[li] = a_cov if prev_a is None else prev_a + a_cov
                G[li] = g_cov if prev_g is None else prev_g + g_cov
                tokens[li] += int(w.sum())
        for i, g in res.rest_grads.items():
            rest_diag[i] += (g[valid].reshape(-1, subset.sizes[i]).to(fdt) ** 2).sum(0).cpu()
    if N == 0:
        raise ValueError("no examples with a gradient in the curvature batches")
    blocks: list[KroneckerBlock] = []
    for li, layer in enumerate(peg.layers):
        w = layer.module.weight
        o, i = w.shape
        cols = i + (1 if layer.augmented else 0)
        dev = w.device  # factors and their eigendecompositions stay where the model runs
        acc_a, acc_g = A[li], G[li]
        Ai = acc_a / max(tokens[li], 1) if acc_a is not None else torch.zeros(cols, cols, dtype=fdt, device=dev)
        Gi = acc_g / N if acc_g is not None else torch.zeros(o, o, dtype=fdt, device=dev)
        ea, qa = torch.linalg.eigh(Ai)
        eg, qg = torch.linalg.eigh(Gi)
        blocks.append(KroneckerBlock(
            name=layer.name, weight_offset=subset.offsets[layer.weight_index], out_features=o, in_features=i,
            bias_offset=None if layer.bias_index is None else subset.offsets[layer.bias_index],
            A=Ai, G=Gi, eig_A=ea.clamp(min=0), vec_A=qa, eig_G=eg.clamp(min=0), vec_G=qg))
    if method == "ekfac" and blocks:
        sums = [torch.zeros(b.out_features, b.cols, dtype=fdt, device=b.A.device) for b in blocks]
        for batch in batches:
            res = peg.compute(batch, fn, rest=False)
            valid = res.valid
            for li, blk in enumerate(blocks):
                rot = None
                for a, g in res.calls[li]:
                    gp = g.to(fdt) @ blk.vec_G.to(g.device)
                    ap = res.augmented_inputs(li, a).to(fdt) @ blk.vec_A.to(a.device)
                    part = torch.einsum("nto,nti->noi", gp, ap)  # Q_Gᵀ dW̄_n Q_A, summed over calls
                    rot = part if rot is None else rot + part
                if rot is not None:
                    sums[li] += (rot[valid.to(rot.device)] ** 2).sum(0).to(sums[li].device)
        for blk, s in zip(blocks, sums):
            blk.ekfac = s / N
    rest = [(subset.offsets[i], subset.sizes[i]) for i in peg.rest]
    rdiag = [rest_diag[i] / N for i in peg.rest]
    trace = sum(float(b.eigenvalues().sum()) for b in blocks) + sum(float(d.sum()) for d in rdiag)
    lam = _resolve_damping(damping, damping_mode, trace, subset.numel)
    return KroneckerCurvature(blocks, rest, rdiag, lam, kind=method)


# ---------------------------------------------------------------------------
# Scores and the volume step


def influence_scores(ref_grad: torch.Tensor, task_grads: torch.Tensor, curvature: Curvature) -> np.ndarray:
    """s_j = -∇L_refᵀ H⁻¹ ∇L_j for every row j of ``task_grads`` [T, numel].

    H is symmetric, so one solve, x = H⁻¹ ∇L_ref, serves every task: s = -G x.
    """
    x = curvature.solve(ref_grad.reshape(-1))
    tg = task_grads.to(dtype=x.dtype, device=x.device)
    return (-(tg @ x)).detach().cpu().double().numpy()


@dataclass
class InfluenceResult:
    scores: np.ndarray  # [T]
    ref_grad: torch.Tensor  # [numel]
    task_grads: torch.Tensor  # [T, numel]
    curvature: Curvature


def ideal_influence(
    model,
    subset: Union[str, Sequence[str], ParamSubset],
    ref_batches: Sequence[Any],
    task_batches: Sequence[Sequence[Any]],
    curvature_batches: Sequence[Any],
    fn: ExampleFn,
    method: Method = "kfac",
    damping: float = 0.1,
    damping_mode: Literal["relative", "absolute"] = "relative",
    token_mask=default_token_mask,
) -> InfluenceResult:
    """IDEAL scores at the model's current parameters.

    ``ref_batches``: batches of the reference (validation) set; ``task_batches[j]``:
    batches of task j's training data; ``curvature_batches``: the data H is fitted
    on (typically training batches of the current mixture). ``fn`` as in
    :func:`fit_curvature` (``raymix.gradients.lm_example_nll()`` for LM batches).
    """
    sub = subset if isinstance(subset, ParamSubset) else ParamSubset.select(model, subset)
    curvature = fit_curvature(sub, curvature_batches, fn, method, damping, damping_mode, token_mask)
    ref = aggregate_gradient(sub, ref_batches, fn)
    tasks = torch.stack([aggregate_gradient(sub, b, fn) for b in task_batches])
    return InfluenceResult(influence_scores(ref, tasks, curvature), ref, tasks, curvature)


def ideal_step(scores: np.ndarray, m: float = 0.15) -> np.ndarray:
    """β_j = -m·s_j / max_k |s_k| (zeros when every score is zero)."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("influence scores must be finite")
    top = np.max(np.abs(s)) if s.size else 0.0
    if top == 0:
        return np.zeros_like(s)
    return -m * s / top


def ideal_volumes(
    volumes: np.ndarray,
    scores: np.ndarray,
    m: float = 0.15,
    budget: float | None = None,
    integer: bool = False,
) -> np.ndarray:
    """IDEAL's volume update: n_j ← (1 + β_j)·n_j, renormalised so Σ n = budget.

    ``budget`` defaults to the current total Σ n_j. With 0 < m < 1 every
    volume stays positive, and the ratio new/old is a decreasing function of
    s_j (ties equal), so the volume moves toward helpful tasks (s < 0).
    ``integer=True`` rounds by largest remainders, keeping the exact total
    (for example counts or token counts).
    """
    n = np.asarray(volumes, dtype=np.float64)
    if n.shape != np.shape(scores):
        raise ValueError("volumes and scores differ in shape")
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError("volumes must be finite and non-negative")
    if not 0 <= m < 1:
        raise ValueError("m must be in [0, 1)")
    total = float(n.sum()) if budget is None else float(budget)
    new = (1.0 + ideal_step(scores, m)) * n
    if new.sum() <= 0:
        raise ValueError("all volumes are zero")
    new *= total / new.sum()
    if not integer:
        return new
    if abs(total - round(total)) > 1e-9:
        raise ValueError("integer volumes need an integer budget")
    floor = np.floor(new)
    short = int(round(total - floor.sum()))
    order = np.argsort(-(new - floor), kind="stable")
    floor[order[:short]] += 1
    return floor.astype(np.int64)
