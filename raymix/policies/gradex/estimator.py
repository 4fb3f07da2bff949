"""First-order subset estimation (GradEx: Li, Zhang, Wang, Zhang, "Scalable
Fine-tuning from Multiple Data Sources: A First-Order Approximation
Approach", EMNLP Findings 2024).

Choosing auxiliary tasks for a target by fine-tuning on every candidate
subset is too slow; GradEx fine-tunes once on all tasks (the meta
initialisation θ0) and then estimates the model fine-tuned on any subset S
from θ0's outputs and gradients alone:

1. Linearise each example's output around θ0 (a first-order Taylor expansion):

       f(x; θ0 + Δ) ≈ f(x; θ0) + ∇f(x; θ0)ᵀ Δ.

2. Project the per-example gradients to d dimensions with a fixed seeded
   random matrix P ∈ R^{p×d} (entries ±1/√d or N(0, 1/d), so that
   E[P Pᵀ] = I and inner products are preserved, Johnson-Lindenstrauss):
   x̃ = Pᵀ ∇f(x; θ0) (:func:`project_gradients`, streamed: per batch of
   examples and per parameter, with P generated block by block from its seed,
   so neither P nor the p-dimensional gradients of all examples are ever held).

3. Fine-tuning on S becomes a d-dimensional generalised linear model with
   θ0's outputs as offsets (:func:`fit_linearised`):

       ŵ_S = argmin_w (1/|S|) Σ_{i∈S} ℓ(f_i + x̃_iᵀ w, y_i) + (λ/2)‖w‖²,

   logistic regression for ℓ(z, y) = log(1 + exp(-(2y-1) z)) (the paper's
   choice, on logits), ridge regression of the residual y - f on x̃ for
   ℓ = ½(z - y)². ``fit="gd"`` instead runs the same number of full-batch
   gradient steps, at the same learning rate, as the fine-tuning it stands
   for. Both depend on the gradients only through inner products x̃_iᵀx̃_j ≈
   ∇f_iᵀ∇f_j, so the projected fit predicts what the full p-dimensional
   linearised fit predicts.

4. The estimated fine-tuned target loss is the linearised model's loss on the
   target examples, with no training and no forward pass:
   L̂(S) = mean_t ℓ(f_t + x̃_tᵀ ŵ_S, y_t) (:class:`SubsetEstimator`).

5. Tasks are scored by the estimates of many random subsets (the mean
   estimated loss of the subsets that contain a task minus that of those that
   do not, :func:`task_scores`) and selected by a threshold on the score, or
   by greedy forward selection on the estimator (:func:`forward_selection`).

For causal LMs the per-example output is, as in the authors' code, the mean
over an example's completion tokens of the token logit log(p / (1 - p))
(:func:`lm_mean_logit`), with the logistic loss and label 1; L̂ is then the
mean of softplus(-f̂) over target examples, a surrogate of the target NLL.
Compare it with :func:`actual_loss` (the same quantity at fine-tuned
parameters) when measuring the estimation error on held-out subsets
(:func:`estimation_error`: relative error and Spearman rank correlation).

Deviation from the authors' code: their scripts map the fitted w back to
parameters (θ0 + P w, rescaled to a fixed norm) and evaluate the network
there; the linearised fit is only accurate in the projected (inner-product)
space, so this module evaluates the linearised model itself, which is what
the method's first-order estimate is. :func:`delta_parameters` still maps w
back for callers who want the authors' variant.

Over 500 lines on purpose: the whole estimator (projection, linearised fits,
scores, selection, error measures), pure and tested as one unit, next to the
derivation in this docstring.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, Union

import numpy as np
import torch
from numpy.typing import ArrayLike

from raymix.gradients import ExampleFn, ParamSubset, PerExampleGrads, split_example_output

Link = Literal["logistic", "squared"]

# ---------------------------------------------------------------------------
# The projection


class Projector:
    """A seeded random projection R^p -> R^d, generated in row blocks.

    Row block b (rows b·block_rows ... ) of P is drawn from a generator seeded
    by (seed, b), so any segment of a p-dimensional vector can be projected on
    its own (per parameter, per chunk of examples) and the results add up to
    the projection of the whole vector, whatever the chunking. Blocks are
    cached while they fit in ``cache_bytes``; beyond that they are regenerated
    when needed, and memory stays at one block. ``kind="identity"`` (d = p)
    keeps the gradients unprojected: the exact linearisation, for small subsets.
    """

    def __init__(self, dim: int, d: int, seed: int = 0,
                 kind: Literal["rademacher", "gaussian", "identity"] = "rademacher",
                 block_rows: int = 65536, cache_bytes: int = 256 << 20, dtype: torch.dtype = torch.float32):
        if kind not in ("rademacher", "gaussian", "identity"):
            raise ValueError(f"kind must be 'rademacher', 'gaussian' or 'identity', not {kind!r}")
        if dim < 1 or d < 1 or block_rows < 1:
            raise ValueError("dim, d and block_rows must be positive")
        if kind == "identity" and d != dim:
            raise ValueError("the identity projection needs d == dim")
        self.dim, self.d, self.seed, self.kind = dim, d, seed, kind
        self.block_rows, self.cache_bytes, self.dtype = block_rows, cache_bytes, dtype
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._cached = 0

    @property
    def key(self) -> tuple:
        return (self.dim, self.d, self.seed, self.kind, self.block_rows)

    def block(self, b: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        key = (b, str(device))
        if key in self._cache:
            return self._cache[key]
        rows = min(self.block_rows, self.dim - b * self.block_rows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "identity":
            m = torch.eye(self.d, dtype=self.dtype)[b * self.block_rows : b * self.block_rows + rows].to(device)
        elif self.kind == "rademacher":
            m = ((torch.randint(0, 2, (rows, self.d), generator=g).to(self.dtype) * 2 - 1)
                 / math.sqrt(self.d)).to(device)
        else:
            m = (torch.randn(rows, self.d, generator=g, dtype=self.dtype) / math.sqrt(self.d)).to(device)
        size = m.numel() * m.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[key] = m
            self._cached += size
        return m

    def project_segment(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """[n, L] coordinates offset..offset+L of p-dimensional vectors -> [n, d]."""
        n, length = x.shape
        if offset < 0 or offset + length > self.dim:
            raise ValueError("segment outside the projected dimension")
        out = torch.zeros(n, self.d, dtype=self.dtype, device=x.device)
        pos = offset
        while pos < offset + length:
            b = pos // self.block_rows
            start = b * self.block_rows
            stop = min(start + self.block_rows, offset + length)
            blk = self.block(b, x.device)
            out += x[:, pos - offset : stop - offset].to(self.dtype) @ blk[pos - start : stop - start]
            pos = stop
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, p] -> [n, d]."""
        return self.project_segment(x.reshape(x.shape[0], -1), 0)

    def back(self, w: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """P w: a d-vector mapped to the p-dimensional parameter space."""
        wt = torch.as_tensor(np.asarray(w), dtype=self.dtype)
        nblocks = -(-self.dim // self.block_rows)
        return torch.cat([self.block(b) @ wt for b in range(nblocks)])

    def matrix(self) -> torch.Tensor:
        """The whole p x d matrix (small p only: tests, debugging)."""
        nblocks = -(-self.dim // self.block_rows)
        return torch.cat([self.block(b) for b in range(nblocks)])


# ---------------------------------------------------------------------------
# Projected per-example gradients at θ0


@dataclass
class ProjectedGradients:
    """Per-example projected output gradients, outputs and labels at θ0."""

    features: np.ndarray  # [N, d] (the projector's dtype): Pᵀ ∇f(x_i; θ0)
    outputs: np.ndarray  # [N] f(x_i; θ0)
    labels: np.ndarray  # [N]
    groups: np.ndarray  # [N] task index of each example
    projector_key: tuple = field(default=())

    def __len__(self) -> int:
        return int(self.outputs.shape[0])

    def take(self, mask: np.ndarray) -> ProjectedGradients:
        return ProjectedGradients(self.features[mask], self.outputs[mask], self.labels[mask], self.groups[mask],
                                  self.projector_key)

    def in_groups(self, tasks: Iterable[int]) -> ProjectedGradients:
        return self.take(np.isin(self.groups, np.fromiter(tasks, dtype=np.int64)))


def project_gradients(
    subset: ParamSubset,
    batches: Iterable[tuple[Any, Sequence[int]]],
    output_fn: ExampleFn,
    projector: Projector,
    label_fn: Callable[[Any], Any] | None = None,
    linear_hooks: bool = True,
) -> ProjectedGradients:
    """Stream (batch, task index per example) pairs through the model at its
    current parameters θ0: outputs f(x; θ0) and projected gradients Pᵀ∇f(x; θ0).

    Memory: the per-example gradients of one batch and one linear layer at a
    time, plus those of the subset's other parameters (norm scales; an
    embedding, if the subset has one: prefer subsets without it on large
    vocabularies), plus one block of P (or the cached blocks); the outputs are
    [N, d]. ``output_fn`` gives a tensor [n] or a
    (sums, counts) pair (examples with a zero count are dropped, they carry no
    output); ``label_fn(batch)`` gives the labels (default: all 1, the LM case).
    """
    if projector.dim != subset.numel:
        raise ValueError(f"projector dimension {projector.dim} != subset size {subset.numel}")
    peg = PerExampleGrads(subset, linear_hooks=linear_hooks)
    feats, outs, labs, grps = [], [], [], []
    for batch, groups in batches:
        res = peg.compute(batch, output_fn)
        n = res.n
        acc = None
        for i, g in res.iter_grads():
            part = projector.project_segment(g.reshape(n, -1), subset.offsets[i])
            acc = part if acc is None else acc + part
        valid = res.valid.cpu().numpy()
        labels = np.ones(n) if label_fn is None else _as_numpy(label_fn(batch))
        feats.append(acc.detach().cpu().numpy()[valid])  # type: ignore[union-attr]
        outs.append(res.values.detach().cpu().double().numpy()[valid])
        labs.append(labels[valid])
        grps.append(np.asarray(groups, dtype=np.int64)[valid])
    if not feats:
        raise ValueError("no batches")
    return ProjectedGradients(np.concatenate(feats), np.concatenate(outs), np.concatenate(labs),
                              np.concatenate(grps), projector.key)


def _as_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def lm_mean_logit(device: Union[str, torch.device] = "cpu", max_prob: float = 1 - 1e-6) -> ExampleFn:
    """GradEx's output for causal-LM batches (``raymix.streams.collate``): per row,
    (Σ over completion tokens of logit(p_t) = log p_t - log(1 - p_t), token count),
    p_t the probability of the reference token (capped at ``max_prob``)."""

    def fn(model, batch):
        labels = batch["labels"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        target = labels[:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = logp.clamp(max=math.log(max_prob))
        logit = logp - torch.log1p(-torch.exp(logp))
        return (logit * mask).sum(dim=1), mask.sum(dim=1).to(logits.dtype)

    return fn


def delta_parameters(w: np.ndarray, projector: Projector, subset: ParamSubset) -> list[torch.Tensor]:
    """Δ = P w as per-parameter tensors (the authors' map back to θ0 + Δ)."""
    return subset.split(projector.back(w))


# ---------------------------------------------------------------------------
# The linearised fit


def link_loss(z: np.ndarray, y: np.ndarray, link: Link) -> np.ndarray:
    """Per-example loss of outputs z with labels y."""
    if link == "logistic":
        return np.logaddexp(0.0, -(2 * y - 1) * z)
    if link == "squared":
        return 0.5 * (z - y) ** 2
    raise ValueError(f"link must be 'logistic' or 'squared', not {link!r}")


def _link_grad(z: np.ndarray, y: np.ndarray, link: Link) -> tuple[np.ndarray, np.ndarray]:
    """(dℓ/dz, d²ℓ/dz²) per example."""
    if link == "logistic":
        s = 2 * y - 1
        p = 0.5 * (1 + np.tanh(0.5 * z))  # σ(z), stable
        sig_minus = np.where(s > 0, 1 - p, p)  # σ(-s z)
        return -s * sig_minus, p * (1 - p)
    return z - y, np.ones_like(z)


def _objective(X, f0, y, w, reg, link) -> float:
    return float(link_loss(f0 + X @ w, y, link).mean() + 0.5 * reg * (w @ w))


def fit_linearised(
    X: np.ndarray,
    f0: np.ndarray,
    y: np.ndarray,
    link: Link = "logistic",
    reg: float = 1e-3,
    fit: Literal["regularised", "gd"] = "regularised",
    lr: float | None = None,
    steps: int | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> np.ndarray:
    """ŵ for the linearised fine-tuning problem on features X [n, d], offsets f0, labels y.

    ``fit="regularised"``: the minimiser of (1/n) Σ ℓ(f0 + X w, y) + (λ/2)‖w‖²
    (λ = ``reg`` > 0 for the logistic link): closed form for ``squared`` (ridge on
    the residual y - f0), Newton's method with backtracking for ``logistic``.
    ``fit="gd"``: ``steps`` full-batch gradient steps of size ``lr`` from w = 0
    on the same objective (``reg`` then acts as weight decay toward θ0).
    """
    X = np.asarray(X, dtype=np.float64)
    f0 = np.asarray(f0, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    if n == 0:
        return np.zeros(d)
    if fit == "gd":
        if lr is None or steps is None:
            raise ValueError("fit='gd' needs lr and steps")
        w = np.zeros(d)
        for _ in range(steps):
            g1, _ = _link_grad(f0 + X @ w, y, link)
            w = w - lr * (X.T @ g1 / n + reg * w)
        return w
    if fit != "regularised":
        raise ValueError(f"fit must be 'regularised' or 'gd', not {fit!r}")
    if link == "squared":
        if reg > 0:
            return np.linalg.solve(X.T @ X / n + reg * np.eye(d), X.T @ (y - f0) / n)
        return np.linalg.lstsq(X, y - f0, rcond=None)[0]
    if reg <= 0:
        raise ValueError("the logistic fit needs reg > 0 (its minimiser may not exist otherwise)")
    w = np.zeros(d)
    obj = _objective(X, f0, y, w, reg, link)
    for _ in range(max_iter):
        g1, g2 = _link_grad(f0 + X @ w, y, link)
        grad = X.T @ g1 / n + reg * w
        if np.linalg.norm(grad) <= tol * max(1.0, float(np.linalg.norm(w))):
            break
        hess = (X.T * g2) @ X / n + reg * np.eye(d)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = w - t * step
            new = _objective(X, f0, y, cand, reg, link)
            if new <= obj - 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t *= 0.5
        w, obj = cand, new
    return w


def _blas_limit(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # installed with scikit-learn; without it BLAS keeps its threads
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


class SubsetEstimator:
    """Estimated fine-tuned target loss L̂(S) for subsets S of tasks.

    ``train``: projected gradients of the tasks' training examples (``groups``
    = task index); ``target``: those of the target examples (same projector).
    Each fit is a d-dimensional problem; ``estimate`` caches by subset.
    ``blas_threads`` caps numpy's BLAS threads during fits (these solves are
    small: one thread is fastest, and many threads spinning on a CPU shared
    with training workers can make them tens of times slower); None leaves
    BLAS alone.
    """

    def __init__(self, train: ProjectedGradients, target: ProjectedGradients, link: Link = "logistic",
                 reg: float = 1e-3, fit: Literal["regularised", "gd"] = "regularised",
                 lr: float | None = None, steps: int | None = None, blas_threads: int | None = 1):
        if train.projector_key != target.projector_key:
            raise ValueError("train and target were projected by different projectors")
        if fit == "regularised" and link == "logistic" and reg <= 0:
            raise ValueError("the logistic fit needs reg > 0")
        self.train, self.target = train, target
        self.link, self.reg, self.fit_kind, self.lr, self.steps = link, reg, fit, lr, steps
        self.blas_threads = blas_threads
        self._cache: dict[tuple[int, ...], float] = {}

    def fit(self, tasks: Iterable[int]) -> np.ndarray:
        part = self.train.in_groups(tasks)
        with _blas_limit(self.blas_threads):
            return fit_linearised(part.features, part.outputs, part.labels, self.link, self.reg, self.fit_kind,
                                  self.lr, self.steps)

    def target_outputs(self, w: np.ndarray) -> np.ndarray:
        """Linearised target outputs f_t + x̃_tᵀ w."""
        return self.target.outputs + self.target.features.astype(np.float64) @ w

    def target_losses(self, w: np.ndarray) -> np.ndarray:
        return link_loss(self.target_outputs(w), self.target.labels, self.link)

    def base_loss(self) -> float:
        """The target loss at θ0 (the empty subset)."""
        return float(link_loss(self.target.outputs, self.target.labels, self.link).mean())

    def estimate(self, tasks: Iterable[int]) -> float:
        key = tuple(sorted(set(int(t) for t in tasks)))
        if key not in self._cache:
            self._cache[key] = float(self.target_losses(self.fit(key)).mean()) if key else self.base_loss()
        return self._cache[key]

    def estimate_many(self, subsets: Sequence[Iterable[int]]) -> np.ndarray:
        return np.array([self.estimate(s) for s in subsets])


def actual_loss(subset: ParamSubset, batches: Iterable[Any], output_fn: ExampleFn,
                link: Link = "logistic", label_fn: Callable[[Any], Any] | None = None) -> float:
    """Mean link loss of the model at its current parameters (e.g. after
    fine-tuning on a subset): the quantity :class:`SubsetEstimator` estimates."""
    model = subset.model
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            for batch in batches:
                values, _, counts = split_example_output(output_fn(model, batch))
                z = values.double().cpu().numpy()
                keep = np.ones(len(z), bool) if counts is None else (counts > 0).cpu().numpy()
                y = np.ones(len(z)) if label_fn is None else _as_numpy(label_fn(batch))
                losses.append(link_loss(z, y, link)[keep])
    finally:
        model.train(was_training)
    return float(np.concatenate(losses).mean())


# ---------------------------------------------------------------------------
# Scores, selection, and the estimate's error


def sample_subsets(num_tasks: int, count: int, size: Union[int, float], seed: int = 0,
                   always: Sequence[int] = ()) -> list[tuple[int, ...]]:
    """``count`` distinct random subsets of ``size`` tasks (a fraction if < 1),
    each containing ``always`` (e.g. the target task itself)."""
    k = int(round(size * num_tasks)) if isinstance(size, float) and size < 1 else int(size)
    fixed = sorted(set(always))
    pool = [t for t in range(num_tasks) if t not in fixed]
    k_free = k - len(fixed)
    if not 0 <= k_free <= len(pool):
        raise ValueError("subset size out of range")
    possible = math.comb(len(pool), k_free)
    if count > possible:
        raise ValueError(f"only {possible} distinct subsets of that size")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < count:
        pick = tuple(sorted(fixed + [pool[i] for i in rng.choice(len(pool), k_free, replace=False)]))
        if pick not in seen:
            seen.add(pick)
            out.append(pick)
    return out


def task_scores(subsets: Sequence[Iterable[int]], losses: ArrayLike, num_tasks: int) -> np.ndarray:
    """score_j = mean L̂(S ∋ j) - mean L̂(S ∌ j): negative when the task helps
    the target (NaN where a task is in every subset or in none)."""
    member = np.zeros((len(subsets), num_tasks), dtype=bool)
    for r, s in enumerate(subsets):
        member[r, list(s)] = True
    loss = np.asarray(losses, dtype=np.float64)
    scores = np.full(num_tasks, np.nan)
    for j in range(num_tasks):
        inside, outside = loss[member[:, j]], loss[~member[:, j]]
        if inside.size and outside.size:
            scores[j] = inside.mean() - outside.mean()
    return scores


def threshold_selection(scores: np.ndarray, threshold: float = 0.0, max_tasks: int | None = None,
                        always: Sequence[int] = ()) -> list[int]:
    """Tasks whose score is below ``threshold`` (most helpful first), at most
    ``max_tasks`` of them, plus ``always``."""
    s = np.asarray(scores, dtype=np.float64)
    order = [int(j) for j in np.argsort(s, kind="stable") if np.isfinite(s[j]) and s[j] < threshold
             and j not in always]
    if max_tasks is not None:
        order = order[: max(0, max_tasks - len(always))]
    return list(always) + order


@dataclass
class ForwardSelection:
    selected: list[int]
    losses: list[float]  # estimated loss after each addition (losses[0]: the start set)


def forward_selection(estimate: Callable[[tuple[int, ...]], float], candidates: Sequence[int],
                      start: Sequence[int] = (), max_size: int | None = None, tol: float = 0.0) -> ForwardSelection:
    """Greedy forward selection: add the candidate that lowers the estimated
    loss most, while it lowers it by more than ``tol``."""
    chosen = list(start)
    current = estimate(tuple(sorted(chosen)))
    losses = [current]
    remaining = [c for c in candidates if c not in chosen]
    while remaining and (max_size is None or len(chosen) < max_size):
        trials = [(estimate(tuple(sorted(chosen + [c]))), c) for c in remaining]
        best, task = min(trials)
        if best >= current - tol:
            break
        chosen.append(task)
        remaining.remove(task)
        current = best
        losses.append(best)
    return ForwardSelection(chosen, losses)


def estimation_error(estimated: ArrayLike, actual: ArrayLike, base: float | None = None) -> dict[str, float]:
    """How well estimated fine-tuned losses match actually fine-tuned ones on
    held-out subsets: mean and max relative error |L̂ - L| / |L|, Spearman's rank
    correlation (and its p-value); with ``base`` (the loss at θ0) also the error
    relative to the change fine-tuning made, Σ|L̂ - L| / Σ|L - base| (how much of
    the movement away from θ0 the estimate gets wrong; a ratio of sums, stable
    when one subset barely moves the loss)."""
    from scipy.stats import spearmanr

    e = np.asarray(estimated, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError("estimated and actual must be equal-length, non-empty 1-d")
    rel = np.abs(e - a) / np.abs(a)
    out = {"relative_error": float(rel.mean()), "max_relative_error": float(rel.max()), "n": float(e.size)}
    if e.size >= 2 and np.ptp(e) > 0 and np.ptp(a) > 0:
        rho, p = spearmanr(e, a)
        out["spearman"], out["spearman_pvalue"] = float(rho), float(p)
    else:
        out["spearman"], out["spearman_pvalue"] = float("nan"), float("nan")
    if base is not None:
        moved = float(np.abs(a - base).sum())
        out["change_relative_error"] = float(np.abs(e - a).sum() / moved) if moved > 0 else float("nan")
    return out


def calibrate_reg(estimator: SubsetEstimator, subsets: Sequence[Iterable[int]], actual: ArrayLike,
                  grid: Sequence[float]) -> float:
    """The ``reg`` in ``grid`` whose estimates best match ``actual`` fine-tuned
    losses on calibration subsets (mean relative error); sets it on the estimator.
    Keep these subsets apart from the ones the error is reported on."""
    best, best_err = None, math.inf
    for reg in grid:
        estimator.reg, estimator._cache = reg, {}
        err = estimation_error(estimator.estimate_many(subsets), actual)["relative_error"]
        if err < best_err:
            best, best_err = reg, err
    estimator.reg, estimator._cache = float(best), {}  # type: ignore[arg-type]
    return float(best)  # type: ignore[arg-type]
