"""Run configuration: frozen, typed dataclasses that round-trip to YAML.

A run is described by one :class:`RunConfig`. It is built from a YAML file (or
the embedded default) plus ``--set key=value`` overrides, validated once in
``__post_init__`` with errors that name the field to change, and logged
verbatim (flattened) as MLflow params.

Identity vs runtime: every section except ``runtime`` and ``tracking`` changes
the result and goes into :func:`identity_hash`; ``runtime`` (workers, CPUs,
threads) and ``tracking`` only change speed or where results are written,
except the worker count where it sets the global batch (``train.global_batch_tokens``
null, more than one worker).

Over 500 lines on purpose: it is the one reference of every field a user can
set (each with its docstring and its checks), read top to bottom; the README
points here, and the YAML round trip below serves all sections alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from raymix.config_regmix import RegmixConfig
from raymix.errors import RaymixError

SOURCE_KINDS = ("synthetic", "natural_instructions", "jsonl", "hf")


@dataclass(frozen=True)
class SourceConfig:
    """One task source of the pool."""

    kind: str = "synthetic"
    """One of ``synthetic``, ``natural_instructions``, ``jsonl``, ``hf``."""
    path: Optional[str] = None
    """File or directory (natural_instructions, jsonl), or dataset name/path (hf)."""
    scale: float = 8.0
    """synthetic: multiplies every task's size (the suite's one size dial). At
    8, the default pool holds about 560k examples and 10M tokens, so that 1%
    of it is enough training for the mixture to matter."""
    seed: int = 0
    """synthetic: the suite's generation seed; separate from the run's seed so
    that seeds of a run vary initialisation and sampling, not the data."""
    tasks: Optional[list[str]] = None
    """Keep only these task names (synthetic, natural_instructions)."""
    max_instances: Optional[int] = None
    """natural_instructions: read at most this many instances per task."""
    task_sizes: Optional[dict[str, int]] = None
    """Subsample tasks to these many records (any kind), e.g. to make sizes differ."""
    positive_examples: int = 0
    """natural_instructions: number of positive examples put in the prompt."""
    task: Optional[str] = None
    """jsonl / hf: task name when the rows do not carry one."""
    split: str = "train"
    """hf: which split of the dataset to read."""
    revision: Optional[str] = None
    """hf: the hub dataset's revision (branch, tag or commit). The shard cache
    is keyed on it: pin a commit, or a dataset changed on the hub keeps
    being read from the shards cut when it was first read."""
    prompt_column: str = "prompt"
    """hf: column holding the prompt."""
    completion_column: str = "completion"
    """hf: column holding the completion."""
    task_column: Optional[str] = None
    """hf: column holding the task name (one dataset, many tasks)."""
    id_column: Optional[str] = None
    """hf: column holding a stable instance id, which orders the split (null:
    the row number, so a reordered or filtered dataset splits otherwise)."""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise RaymixError(
                f"data.sources[].kind: unknown source kind {self.kind!r}; "
                f"choose one of {', '.join(SOURCE_KINDS)}{_suggest(self.kind, SOURCE_KINDS)}"
            )
        if self.kind != "synthetic" and not self.path:
            raise RaymixError(f"data.sources[].path is required for a {self.kind!r} source")
        if self.scale <= 0:
            raise RaymixError(f"data.sources[].scale must be > 0, got {self.scale}")
        if self.positive_examples < 0:
            raise RaymixError("data.sources[].positive_examples must be >= 0")
        if self.seed < 0:
            raise RaymixError(f"data.sources[].seed must be >= 0, got {self.seed}")
        if self.max_instances is not None and self.max_instances < 1:
            raise RaymixError(f"data.sources[].max_instances must be >= 1 or null, got {self.max_instances}")
        bad = {t: n for t, n in (self.task_sizes or {}).items() if n < 1}
        if bad:
            raise RaymixError(f"data.sources[].task_sizes: sizes must be >= 1, got {bad}")


@dataclass(frozen=True)
class DataConfig:
    """Where tasks come from and how they are split and tokenised."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    """Task sources; their tasks form the pool (names must be unique)."""
    val_fraction: float = 0.1
    """Share of each task's instances held out for validation (by instance id)."""
    test_fraction: float = 0.1
    """Share of each task's instances held out for exact-match testing."""
    max_val: int = 64
    """At most this many validation instances per task."""
    max_test: int = 64
    """At most this many test instances per task."""
    max_seq_len: int = 128
    """Tokens per example; longer prompts are cut from the left, examples whose
    completion alone does not fit are dropped (both counted and reported)."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """Prompt template: the tokenizer's chat template (``chat``), a plain
    ``prompt\\nAnswer:`` template (``plain``), or chat when available (``auto``)."""
    cache_dir: Optional[str] = None
    """Where tokenised shards and trained tokenizers are cached (default
    ``$RAYMIX_CACHE`` or ``~/.cache/raymix``). Runtime only: not identity."""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 0.5:
                raise RaymixError(f"data.{name} must be in [0, 0.5), got {v}")
        for name in ("max_val", "max_test"):
            if getattr(self, name) < 0:
                raise RaymixError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_seq_len < 16:
            raise RaymixError(f"data.max_seq_len must be >= 16, got {self.max_seq_len}")
        if not self.sources:
            raise RaymixError("data.sources is empty: give at least one task source")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a built-in Llama preset, or any Hugging Face causal LM."""

    preset: str = "llama-micro"
    """Built-in Llama-architecture preset (see ``raymix.models.PRESETS``),
    initialised from the seed; ignored when ``pretrained`` is set."""
    pretrained: Optional[str] = None
    """Hub id or local directory of a Hugging Face causal LM."""
    tokenizer: Optional[str] = None
    """Hub id or local directory of a tokenizer; default: ``pretrained``'s,
    or one trained locally on the pool's text for presets."""
    vocab_size: int = 2048
    """Vocabulary of the locally trained tokenizer (presets only)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise RaymixError(f"model.vocab_size must be >= 300, got {self.vocab_size}")


@dataclass(frozen=True)
class BudgetConfig:
    """The token budget: the main dial of a run."""

    fraction: Optional[float] = 0.01
    """Budget as a share of the pool's training tokens N (ignored if ``tokens``)."""
    tokens: Optional[int] = None
    """Absolute budget in training tokens."""
    max_epochs: float = 8.0
    """Repetition cap: no task is trained on more than this many times its size;
    mixture weight beyond the cap spills over to the other tasks."""

    def __post_init__(self) -> None:
        if self.tokens is None and self.fraction is None:
            raise RaymixError("budget: set budget.fraction or budget.tokens")
        if self.tokens is not None and self.tokens <= 0:
            raise RaymixError(f"budget.tokens must be > 0, got {self.tokens}")
        if self.tokens is None and self.fraction is not None and self.fraction <= 0:
            raise RaymixError(f"budget.fraction must be > 0, got {self.fraction}")
        if self.max_epochs <= 0:
            raise RaymixError(f"budget.max_epochs must be > 0, got {self.max_epochs}")


@dataclass(frozen=True)
class AdaptConfig:
    """ADAPT: task logits learned by a first-order meta-gradient of the smooth
    worst-case validation loss (see ``raymix.policies.adapt`` and the README's
    ADAPT section, which gives each default's reason)."""

    every_steps: int = 80
    """K: optimizer steps between meta updates (the interval a mixture is in force).
    80, not 20: a meta step reads T x (examples_per_task + val_examples_per_task)
    examples (552 on the embedded default), so at 20 the meta steps cost 1.38x
    uniform's wall time per training token (``raymix.bench meta_overhead``);
    that part falls as 1/K, and K = 80 was set from it for the 1.10x target
    (measured 1.04x and 1.06x). README, ADAPT: the test losses at both cadences."""
    meta_share: Optional[float] = None
    """A cap on the meta step's cost as a share of the training tokens: a
    meta update due every K steps is put off while the tokens read for
    signals so far exceed ``meta_share`` x the train tokens (a meta token
    costs less time than a train token: no update, backward through
    ``params`` only). Counted in tokens, not seconds, so the schedule is the
    same on any machine. None: every K steps."""
    warmup_steps: int = 20
    """Optimizer steps before the first meta update."""
    tau: float = 0.5
    """Temperature of J = tau * log sum_j exp(L_j^val / tau) (small: worst case)."""
    normalise: Literal["std", "none"] = "std"
    """Scale of the meta-signal. ``std``: the alignments <g_val, g_i> are
    divided by their standard deviation across tasks (after centring), so the
    signal is in units of "standard deviations of alignment" whatever the
    learning rate, optimizer or batch, and ``entropy`` is scale-free.
    ``none``: the raw first-order look-ahead a_i = -eta <g_val, g_i> (its scale
    falls with the learning rate; kept for comparison)."""
    entropy: float = 1.0
    """lambda: weight of the entropy bonus -lambda*H(p). With ``normalise: std``
    the fixed point under a constant signal is log(p_i/p_j) = (z_i - z_j)/lambda
    (z: the normalised alignment, token-share and cap Jacobians aside), so
    lambda=1 gives a task one standard deviation better e times the weight.
    lambda=0 collapses the mixture on the best task."""
    lr: float = 0.2
    """beta: step size on the logits. Under ``optimizer: eg`` the logits are an
    exponential moving average of the fixed point with weight beta*lambda per
    meta step (0.2: about 5 meta steps of memory); must satisfy beta*lambda < 1."""
    optimizer: Literal["eg", "sgd", "adam"] = "eg"
    """Update rule: ``eg`` exponentiated gradient (mirror descent on the
    simplex with the entropy mirror map: log s <- (1-beta lambda) log s -
    beta dJ/ds); ``sgd`` a plain step on phi; ``adam`` Adam on phi (its first
    step is about lr*sign(g) whatever the signal; an option only)."""
    floor: float = 0.05
    """epsilon: p = (1-eps) softmax(phi) + eps/T keeps every task sampled."""
    lookahead_lr: Optional[float] = None
    """eta of the look-ahead step with ``normalise: none``; default: the
    current training learning rate. Unused with ``normalise: std``."""
    init: Literal["uniform", "proportional"] = "uniform"
    """Initial mixture."""
    token_share: bool = True
    """Differentiate through the token share of the update: the loss is a mean
    over completion tokens, so task i's share of an update is
    p_i l_i / sum_j p_j l_j (l: completion tokens per example), not p_i."""
    tasks_per_step: Optional[int] = 64
    """Tasks whose training gradient (and validation loss) is refreshed per
    meta step: every task on pools of up to this many, a random subset on
    larger ones (None: every task always). Stale alignments decay by
    ``stale_decay`` per meta step."""
    signal_share: Optional[float] = 0.15
    """On pools larger than ``tasks_per_step``: the tasks read per meta step
    (for alignments, and for validation losses) are cut so that the step reads
    about this share of the examples trained on in the interval it follows
    (``every_steps`` x the global batch), but never fewer than
    ``raymix.policies.adapt.signal.MIN_TASKS_PER_STEP``. Without it, the
    signal at 64 tasks per step is 1,536 examples however small the batch:
    2.4 signal tokens per training token at 32 examples per step, where ADAPT's
    loop took 2x uniform's on a 1,000-task pool. Why 0.15: in whole runs a
    signal token cost about 0.6 of a training token (a full forward, the
    last block's backward, a forward-mode pass, and each step's fixed
    costs), so 0.15 keeps the meta steps near a tenth of the loop. None:
    ``tasks_per_step`` whatever the batch. Pools of at most
    ``tasks_per_step`` tasks (the embedded default) read every task at every
    step either way."""
    stale_decay: float = 0.5
    """On pools larger than ``tasks_per_step``: a task's normalised signal is
    multiplied by this at every meta step that does not refresh it."""
    examples_per_task: int = 8
    """Examples per task-gradient batch (their tokens go to meta_tokens), in
    total over the workers: each reads its share, so the signal does not
    depend on the worker count."""
    val_examples_per_task: int = 16
    """Validation examples per task per meta step, in total over the workers."""
    val_ema: float = 0.5
    """Weight of the past in the exponential moving average of each task's
    validation loss that sets the soft-max weights q = softmax(L/tau)
    (0: the last reading only)."""
    params: Literal["all", "last_block", "head"] = "last_block"
    """Parameter subset the gradients are taken on: all, the last transformer
    block plus the final norm (not the output layer), or the output layer
    only."""
    sketch_above: Optional[int] = 50_000_000
    """Inner products are exact (g_val all-reduced once, each example's
    derivative along it by forward-mode AD, T scalars all-reduced) on
    parameter subsets of at most this many parameters; above it g_val is
    CountSketched to ``sketch_dim`` dimensions before its all-reduce and the
    derivative is taken along S^T S g_val, with a hash redrawn at every meta
    step (None: always exact)."""
    sketch_dim: int = 16384
    """CountSketch size when the subset is above ``sketch_above``."""

    def __post_init__(self) -> None:
        for name in ("every_steps", "examples_per_task", "val_examples_per_task", "sketch_dim"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.adapt.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise RaymixError("policy.adapt.warmup_steps must be >= 0")
        if self.meta_share is not None and not self.meta_share > 0:
            raise RaymixError(f"policy.adapt.meta_share must be > 0 (or null: no cap), got {self.meta_share}")
        if self.tau <= 0 or self.lr <= 0:
            raise RaymixError("policy.adapt.tau and policy.adapt.lr must be > 0")
        if not 0 <= self.floor < 1:
            raise RaymixError(f"policy.adapt.floor must be in [0, 1), got {self.floor}")
        if self.entropy < 0:
            raise RaymixError("policy.adapt.entropy must be >= 0")
        if self.optimizer == "eg" and self.lr * self.entropy >= 1:
            raise RaymixError(f"policy.adapt.lr * policy.adapt.entropy must be < 1 with optimizer eg (got "
                              f"{self.lr} * {self.entropy}): the logits would overshoot their fixed point")
        if self.tasks_per_step is not None and self.tasks_per_step < 1:
            raise RaymixError("policy.adapt.tasks_per_step must be >= 1 or null")
        if self.signal_share is not None and not self.signal_share > 0:
            raise RaymixError(f"policy.adapt.signal_share must be > 0 (or null: no cut), got {self.signal_share}")
        if not 0 <= self.stale_decay <= 1 or not 0 <= self.val_ema < 1:
            raise RaymixError("policy.adapt.stale_decay must be in [0, 1] and policy.adapt.val_ema in [0, 1)")
        if self.sketch_above is not None and self.sketch_above < 0:
            raise RaymixError("policy.adapt.sketch_above must be >= 0 or null")


CURVATURES = ("identity", "diag_fisher", "kfac", "ekfac")


@dataclass(frozen=True)
class IdealConfig:
    """IDEAL: per-task volumes moved by influence scores between training
    rounds, each round retrained from the base model (see ``raymix.driver.ideal``)."""

    rounds: int = 2
    """R: training rounds; influence is scored after each of the first R-1."""
    m: float = 0.15
    """Step size: beta_j = -m * s_j / max_k |s_k|, n_j <- (1 + beta_j) n_j."""
    curvature: Literal["identity", "diag_fisher", "kfac", "ekfac"] = "ekfac"
    """H in s_j = -grad L_ref^T H^-1 grad L_j: identity, damped diagonal
    Fisher, or K-FAC / EK-FAC on the linear layers of ``params``."""
    damping: float = 0.1
    """lambda, relative to the mean eigenvalue of the undamped curvature
    (ignored by ``identity``)."""
    params: Literal["all", "last_block", "head"] = "last_block"
    """Parameter subset the gradients and the curvature are taken on."""
    examples_per_task: int = 32
    """Training examples per task for its gradient grad L_j (the same
    examples, all tasks together, fit the curvature). Their tokens go to
    meta_tokens."""
    reference_tasks: Optional[list[str]] = None
    """Tasks whose validation splits form the reference loss L_ref
    (null: every task of the pool)."""
    reference_examples_per_task: int = 32
    """At most this many validation examples per reference task (capped by
    ``data.max_val``)."""
    init: Literal["uniform", "proportional"] = "uniform"
    """Round 1's volumes: the budget split evenly, or in proportion to each
    task's training tokens."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise RaymixError(f"policy.ideal.rounds must be >= 1, got {self.rounds}")
        if not 0 < self.m < 1:
            raise RaymixError(f"policy.ideal.m must be in (0, 1), got {self.m}")
        if self.damping <= 0:
            raise RaymixError(f"policy.ideal.damping must be > 0, got {self.damping}")
        for name in ("examples_per_task", "reference_examples_per_task"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.ideal.{name} must be >= 1, got {getattr(self, name)}")
        if self.reference_tasks is not None and not self.reference_tasks:
            raise RaymixError("policy.ideal.reference_tasks must be null (all tasks) or a non-empty list")


@dataclass(frozen=True)
class GradexConfig:
    """GradEx (first-order subset estimation, see ``raymix.policies.gradex.estimator``): train on
    the uniform mixture for ``meta_share`` of the budget (the meta
    initialisation), estimate the fine-tuned target loss of random task
    subsets from projected per-example gradients, score and select tasks,
    then train on the selection for the rest of the budget."""

    meta_share: float = 0.3
    """Share of the budget's train tokens spent on the uniform mixture before
    the estimation (the meta initialisation)."""
    projection_dim: int = 256
    """d: dimensions the per-example gradients are randomly projected to."""
    params: Literal["all", "last_block", "head"] = "last_block"
    """Parameter subset the per-example gradients (and the verification
    fine-tuning) are taken on, as ``policy.adapt.params``."""
    examples_per_task: int = 16
    """Training examples per task whose gradients are projected (their tokens
    go to meta_tokens)."""
    target_examples_per_task: int = 8
    """Validation examples per target task (their tokens go to meta_tokens)."""
    target: Optional[list[str]] = None
    """Target tasks whose validation examples define the target loss; null:
    every task with validation data (the mean validation loss). Named target
    tasks are in every sampled subset and in the selection."""
    num_subsets: int = 64
    """M: random subsets whose fine-tuned target loss is estimated for scoring
    (fewer on pools with fewer distinct subsets than M + K: see
    ``raymix.policies.gradex.subset_counts``)."""
    subset_size: Union[int, float] = 0.5
    """Tasks per random subset: a share of the pool if below 1, else a count."""
    link: Literal["logistic", "squared"] = "logistic"
    """Loss of the linearised model on the per-example output (the mean
    completion-token logit): logistic, as the authors, or squared."""
    fit: Literal["gd", "regularised"] = "gd"
    """Linearised fit: ``gd`` takes the same full-batch gradient steps as the
    fine-tuning it stands for (``finetune_steps`` at ``finetune_lr``);
    ``regularised`` solves the ``reg``-regularised problem to optimality."""
    reg: float = 0.0
    """Weight decay toward the meta initialisation (``gd``), or the ridge /
    L2 penalty of the ``regularised`` fit (must then be > 0 for logistic)."""
    finetune_lr: float = 0.5
    """Step size of the fine-tuning the estimate stands for (plain gradient
    descent on the subset's examples, parameter subset ``params``)."""
    finetune_steps: int = 5
    """Full-batch gradient steps of that fine-tuning."""
    selection: Literal["threshold", "forward"] = "threshold"
    """``threshold``: tasks whose score is below ``threshold``; ``forward``:
    greedy forward selection on the estimator."""
    threshold: float = 0.0
    """threshold selection: keep tasks scoring below this (negative scores
    lower the estimated target loss)."""
    max_tasks: Optional[int] = None
    """At most this many selected tasks (null: no limit)."""
    min_tasks: int = 1
    """If the selection holds fewer tasks, the best-scored others fill it up."""
    mixture: Literal["uniform", "proportional"] = "uniform"
    """Phase-2 mixture over the selected tasks: equal weights, or by size."""
    verify_subsets: int = 4
    """K: held-out random subsets (apart from the M) actually fine-tuned from
    the meta initialisation to measure the estimate's error and speed-up; 0
    skips the check."""
    scores_only: bool = False
    """Stop after the estimation: print and record the task scores, skip the
    second training phase (and the lm-eval suite)."""
    seed: int = 0
    """Seed of the projection, the example sample and the random subsets."""

    def __post_init__(self) -> None:
        if not 0 < self.meta_share < 1:
            raise RaymixError(f"policy.gradex.meta_share must be in (0, 1), got {self.meta_share}")
        for name in ("projection_dim", "examples_per_task", "target_examples_per_task", "num_subsets",
                     "finetune_steps", "min_tasks"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.gradex.{name} must be >= 1, got {getattr(self, name)}")
        if self.verify_subsets < 0:
            raise RaymixError(f"policy.gradex.verify_subsets must be >= 0, got {self.verify_subsets}")
        if self.seed < 0:
            raise RaymixError(f"policy.gradex.seed must be >= 0, got {self.seed}")
        if self.subset_size <= 0 or (self.subset_size >= 1 and float(self.subset_size) != int(self.subset_size)):
            raise RaymixError("policy.gradex.subset_size must be a share in (0, 1) or a whole number of "
                              f"tasks, got {self.subset_size}")
        if self.finetune_lr <= 0:
            raise RaymixError(f"policy.gradex.finetune_lr must be > 0, got {self.finetune_lr}")
        if self.reg < 0:
            raise RaymixError(f"policy.gradex.reg must be >= 0, got {self.reg}")
        if self.fit == "regularised" and self.link == "logistic" and self.reg <= 0:
            raise RaymixError("policy.gradex.reg must be > 0 for fit=regularised with link=logistic "
                              "(the minimiser may not exist otherwise)")
        if self.max_tasks is not None and self.max_tasks < self.min_tasks:
            raise RaymixError(f"policy.gradex.max_tasks ({self.max_tasks}) must be >= policy.gradex.min_tasks "
                              f"({self.min_tasks}) or null")
        if self.target is not None and not self.target:
            raise RaymixError("policy.gradex.target is empty: give task names, or null for every task")


@dataclass(frozen=True)
class OdmConfig:
    """Online Data Mixing (Albalak et al. 2023, see ``raymix.policies.odm``):
    a multi-armed bandit over tasks whose reward is each task's training loss
    over the last interval between two reports to the mixer. Defaults from
    alon-albalak/online-data-mixing (cited per field)."""

    variant: Literal["smoothed_mean", "exp3"] = "smoothed_mean"
    """``smoothed_mean``: the README's (README.md:15) ``SmoothedMeanWeightUpdater``
    (megatron/data/data_sampling_utils.py:455, its ``group_update`` for mixed
    batches at :501), R_i <- a R_i + (1-a) exp(L_i), p = (1-K eps) R/sum R + eps;
    ``exp3``: ``Exp3WeightUpdater`` (:354, ``group_update`` :421), importance-
    weighted cumulative reward R_i += s L_i / p_i, p = (1-K eps) softmax(eps' R) + eps."""
    smoothing: float = 0.9
    """a of the smoothed mean (megatron/neox_arguments/neox_args.py:1042)."""
    reward_scale: float = 0.1
    """s: exp3's reward is the loss times this (data_sampling_utils.py:429,
    ``reward/10``, 'so that cumulative reward doesn't explode')."""
    warmup_share: float = 0.02
    """Share of the budget trained on the initial mixture before the first
    bandit update: the reference's 2,000 warm-up steps (scripts/train_1B_exp3.sh:7)
    of 100,000 (alon_configs/models/1B.yml:71). Losses seen during warm-up
    already feed the smoothed mean (so that the first update does not start
    from zero rewards)."""
    horizon_steps: Optional[int] = 100000
    """The bandit's step counter t, in eps_t = min(1/K, sqrt(ln K / (K t))),
    is the share of the budget spent times this: at the same share of training
    eps is what the reference's 100,000-iteration run (1B.yml:71) had, so a
    run of a few hundred steps is not near-uniform by construction (K=23,
    t=100 gives K eps = 0.85). null: t counts bandit updates, as the reference
    counts iterations (with ``train.sync_every=1`` the two agree)."""
    init: Literal["uniform", "proportional"] = "proportional"
    """Mixture during warm-up: the reference samples 'from the full dataset
    uniformly' (neox_args.py:1010), i.e. tasks in proportion to their size."""

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise RaymixError(f"policy.odm.smoothing must be in [0, 1), got {self.smoothing}")
        if self.reward_scale <= 0:
            raise RaymixError(f"policy.odm.reward_scale must be > 0, got {self.reward_scale}")
        if not 0 <= self.warmup_share < 1:
            raise RaymixError(f"policy.odm.warmup_share must be in [0, 1), got {self.warmup_share}")
        if self.horizon_steps is not None and self.horizon_steps < 1:
            raise RaymixError("policy.odm.horizon_steps must be >= 1 or null")


@dataclass(frozen=True)
class DoremiConfig:
    """DoReMi (Xie et al. 2023, see ``raymix.policies.doremi``): Group DRO over
    tasks on the excess loss of the trained model over a frozen reference
    model. Defaults from sangmichaelxie/doremi (cited per field)."""

    reference_model: Optional[str] = None
    """A prior raymix run's saved model directory (its ``summary.json``'s
    ``model_dir``), with the same tokenizer. null: the policy trains it first,
    as its own round 1, on the ``baseline`` mixture (``raymix.driver.doremi``)."""
    baseline: Literal["uniform", "proportional"] = "uniform"
    """The baseline mixture: the reference model's (round 1) and alpha's start
    (the reference starts alpha, and its running mean, at the baseline it
    samples from, doremi/train.py:270-272); raymix's baseline on the embedded
    default is uniform. ``proportional`` keeps small tasks' reference loss
    higher, which counters weights drifting to one-hot."""
    final_round: bool = True
    """Train a final run (round 3, from the base model) on the proxy's averaged
    weights, as DoReMi does; false: stop after the proxy run (round 2), whose
    ``doremi.weights`` a later ``policy.name=static`` run can use."""
    mode: Literal["sample"] = "sample"
    """``sample``: the run samples from the DRO weights alpha (with ``floor``).
    The reference instead samples from a fixed baseline and reweights the
    per-token loss by alpha (doremi/trainer.py:345-363); raymix's training
    step does not weight per-task losses, so that mode is not offered."""
    eta: float = 1.0
    """Step size of the exponentiated-gradient step on log alpha
    (scripts/runs/run_pile_doremi120M.sh:70, ``--reweight_eta 1.0``)."""
    smoothing: float = 1e-3
    """c: alpha <- (1-c) alpha + c/K after each step
    (run_pile_doremi120M.sh:71, ``--reweight_eps 1e-3``; trainer.py:259)."""
    floor: float = 0.05
    """The sampled mixture is (1-floor) alpha + floor/K, so that every task keeps
    being read (sample mode only; the reference reads every domain through its
    fixed baseline)."""
    every_steps: int = 2
    """Optimizer steps between DRO updates (the reference updates every step,
    trainer.py:297; raymix reads a separate batch per update, see below)."""
    warmup_steps: int = 0
    """Optimizer steps before the first update."""
    examples_per_task: int = 4
    """Training examples per task read at each update (in total over the
    workers) to compute the per-token excess loss, since the signal protocol
    does not hand the step's own batch to a signal; their tokens are
    ``meta_tokens`` (twice: the trained and the reference model read them)."""

    def __post_init__(self) -> None:
        if self.eta <= 0:
            raise RaymixError(f"policy.doremi.eta must be > 0, got {self.eta}")
        if not 0 <= self.smoothing < 1:
            raise RaymixError(f"policy.doremi.smoothing must be in [0, 1), got {self.smoothing}")
        if not 0 <= self.floor < 1:
            raise RaymixError(f"policy.doremi.floor must be in [0, 1), got {self.floor}")
        for name in ("every_steps", "examples_per_task"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.doremi.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise RaymixError("policy.doremi.warmup_steps must be >= 0")


@dataclass(frozen=True)
class AioliConfig:
    """Aioli (Chen et al. 2024, see ``raymix.policies.aioli``): a linear mixing
    law L_i(t+1) ~ L_i(t) - sum_j A_ij p_j estimated online from short probe
    segments on perturbed mixtures, then p <- p exp(eta sum_i A_ij). Defaults
    from HazyResearch/aioli's README example (README.md:45-60), the step counts
    turned into shares of the budget."""

    round_share: float = 0.05
    """Share of the budget per round (one estimate of A and one update of p):
    the reference's ``--update_steps 250`` of ``--max_steps 5000`` (README.md:58, :45)."""
    probe_steps: int = 4
    """Optimizer steps of each probe segment (``--lp_steps 4``, README.md:55)."""
    sweeps: int = 4
    """Sweeps over the probed tasks per round (``--lp_rounds 4``, README.md:54)."""
    one_hot_factor: float = 0.625
    """f: a probe mixture puts f on one task, the rest spread evenly over the
    other probed tasks (``--one_hot_factor 0.625``, README.md:59)."""
    eta: float = 0.2
    """Step size of p <- p exp(eta sum_i A_ij) (``--eta 0.2``, README.md:56)."""
    ema: Optional[float] = 0.1
    """A's moving average: A_ema <- (1-ema) A + ema A_ema, weights from p0
    (``--ema 0.1``, README.md:57; trainer/aioli_trainer.py:334-340); null: the
    multiplicative update p <- p exp(eta colsum A) round after round."""
    normalise: bool = True
    """Shift A to non-negative entries and scale to sum 1 (``--aioli_normalize_A``,
    README.md:60, 'always set'; aioli_trainer.py:324-330)."""
    tasks_per_round: Optional[int] = 4
    """Tasks probed per round (a uniform sample without replacement; null:
    every task, as the reference). A round costs sweeps x probe_steps x this
    many steps of probes; at K=23 the reference's all-task sweep would take
    368 steps per round. Unprobed tasks keep their weight; the probed ones
    share the weight they held."""
    val_examples_per_task: int = 8
    """Validation examples per task in the fixed probe set (in total over the
    workers), read before and after every probe segment (``meta_tokens``)."""
    init: Literal["uniform", "proportional"] = "uniform"
    """p0 (the reference starts from ones, aioli_trainer.py:231)."""
    seed: int = 0
    """Seed of the probed-task sample and the probe order."""

    def __post_init__(self) -> None:
        if not 0 < self.round_share <= 1:
            raise RaymixError(f"policy.aioli.round_share must be in (0, 1], got {self.round_share}")
        for name in ("probe_steps", "sweeps", "val_examples_per_task"):
            if getattr(self, name) < 1:
                raise RaymixError(f"policy.aioli.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.one_hot_factor <= 1:
            raise RaymixError(f"policy.aioli.one_hot_factor must be in (0, 1], got {self.one_hot_factor}")
        if self.eta <= 0:
            raise RaymixError(f"policy.aioli.eta must be > 0, got {self.eta}")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise RaymixError(f"policy.aioli.ema must be in [0, 1) or null, got {self.ema}")
        if self.tasks_per_round is not None and self.tasks_per_round < 2:
            raise RaymixError("policy.aioli.tasks_per_round must be >= 2 or null")
        if self.seed < 0:
            raise RaymixError(f"policy.aioli.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class PolicyConfig:
    """The mixing policy and its options (see ``raymix.policies``)."""

    name: str = "uniform"
    """Registered policy name: uniform, proportional, temperature, unimax, static, schedule, adapt, gradex, ideal,
    odm, doremi, aioli, regmix."""
    temperature: float = 2.0
    """temperature: p_i proportional to n_i^(1/temperature)."""
    unimax_epochs: float = 1.0
    """unimax: per-task epoch cap (UniMax's N); the rest is spread uniformly."""
    weights: Optional[dict[str, float]] = None
    """static: fixed weights per task (normalised; missing tasks get 0)."""
    schedule: Optional[list[Any]] = None
    """schedule: ``[[token_offset, {task: weight}], ...]``, e.g. a previous
    run's ``mixture_schedule``, replayed as is."""
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    """adapt: options of the learned policy."""
    gradex: GradexConfig = field(default_factory=GradexConfig)
    """gradex: options of first-order subset estimation (part of a run's
    identity only when ``name`` is gradex)."""
    ideal: IdealConfig = field(default_factory=IdealConfig)
    """ideal: options of the multi-round influence policy (part of the
    identity only when ``name`` is ``ideal``)."""
    odm: OdmConfig = field(default_factory=OdmConfig)
    """odm: options of Online Data Mixing (in the identity only when ``name`` is odm)."""
    doremi: DoremiConfig = field(default_factory=DoremiConfig)
    """doremi: options of DoReMi (in the identity only when ``name`` is doremi)."""
    aioli: AioliConfig = field(default_factory=AioliConfig)
    """aioli: options of Aioli (in the identity only when ``name`` is aioli)."""
    regmix: RegmixConfig = field(default_factory=RegmixConfig)
    """regmix: options of RegMix (``raymix.config_regmix``; in the identity only
    when ``name`` is regmix, without ``swarm_dir``)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise RaymixError(f"policy.temperature must be > 0, got {self.temperature}")
        if self.unimax_epochs <= 0:
            raise RaymixError(f"policy.unimax_epochs must be > 0, got {self.unimax_epochs}")


POLICY_OPTIONS = {"temperature": "temperature", "unimax_epochs": "unimax", "weights": "static",
                  "schedule": "schedule", "adapt": "adapt", "gradex": "gradex", "ideal": "ideal", "odm": "odm",
                  "doremi": "doremi", "aioli": "aioli", "regmix": "regmix"}
"""The policy that reads each option of :class:`PolicyConfig` (besides
``name``): every run records all of them, but only its own policy's options
say anything about it (reports label variants by them)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Steps, warm-up and decay derive from the budget."""

    micro_batch_size: int = 16
    """Examples per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-2
    """Peak learning rate (AdamW); the default suits the small presets."""
    warmup_fraction: float = 0.05
    """Share of the budget's tokens spent warming the learning rate up."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at ``lr * min_lr_ratio`` when the budget is spent."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    log_every: int = 10
    """Optimizer steps between metric logs."""
    sync_every: int = 10
    """Optimizer steps between reports to the mixer actor (ledger, losses) and
    mixture refreshes; the new mixture is applied one interval later so that
    fetching it never blocks a step."""
    global_batch_tokens: Optional[int] = None
    """Tokens (at ``data.max_seq_len`` per example) per optimizer step across
    all workers. When set, ``grad_accum`` is derived from it, the micro-batch
    and the worker count (see :func:`effective_grad_accum`), so a budget and
    a global batch mean the same on any hardware, and ``micro_batch_size`` /
    ``grad_accum`` leave the run's identity."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (Hugging Face models'
    ``gradient_checkpointing_enable``): less memory, about a third more compute."""
    packing: bool = True
    """Pack each step's examples into rows (each example attending to itself
    alone, positions restarting) instead of padding one example per row: the
    same examples and loss, up to floating-point order, on fewer computed
    positions. Models that packing does not support (see
    :mod:`raymix.packing`) train padded, with the reason logged."""
    pack_length: Optional[int] = None
    """Tokens per packed row (at least ``data.max_seq_len``); default:
    ``data.max_seq_len``. Longer rows mean fewer of them (less slack at the
    end of each) but a larger attention matrix per row."""
    attention: Literal["sdpa", "flex"] = "sdpa"
    """Attention in the training step's forward and backward. ``sdpa``:
    PyTorch's ``scaled_dot_product_attention`` (packed rows get a 4D
    block-diagonal mask: every position of a row is computed). ``flex``:
    torch's flex attention (Hugging Face's ``flex_attention``), whose block
    mask skips the blocks of a packed row that no example spans; CUDA only
    (torch has no flex attention backward on CPU). Evaluation and the
    policies' signals use the model's own attention either way
    (:mod:`raymix.kernels`)."""
    compile: bool = False
    """``torch.compile`` each decoder layer's forward for the training step:
    fuses the element-wise work of the norms, rotary embeddings and SwiGLU.
    The first steps pay the compilation (seconds on CPU, up to a minute per
    new shape on GPU); evaluation and the signals run the layers uncompiled."""
    checkpoint_tokens: Optional[int] = None
    """Train tokens between checkpoints (model, optimizer, RNG states, data
    positions, mixer state and ledger); default: ``checkpoint_fraction`` of
    the budget."""
    checkpoint_fraction: float = 0.1
    """Checkpoint every this share of the budget when ``checkpoint_tokens`` is
    unset; 0 disables periodic checkpoints. Also the cadence at which the
    training metrics reach MLflow (they are written once the checkpoint
    covering their steps is, so that a restart never logs a step twice):
    ten updates of the charts per run by default, one at the end with 0."""
    checkpoints_to_keep: int = 2
    """Most recent periodic checkpoints kept in Ray Train's storage."""

    def __post_init__(self) -> None:
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            raise RaymixError(f"train.global_batch_tokens must be >= 1 or null, got {self.global_batch_tokens}")
        if self.checkpoint_tokens is not None and self.checkpoint_tokens < 1:
            raise RaymixError(f"train.checkpoint_tokens must be >= 1 or null, got {self.checkpoint_tokens}")
        if not 0 <= self.checkpoint_fraction <= 1:
            raise RaymixError(f"train.checkpoint_fraction must be in [0, 1], got {self.checkpoint_fraction}")
        if self.checkpoints_to_keep < 1:
            raise RaymixError(f"train.checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")
        for name in ("micro_batch_size", "grad_accum", "log_every", "sync_every"):
            if getattr(self, name) < 1:
                raise RaymixError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise RaymixError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise RaymixError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RaymixError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class EvalConfig:
    """End-of-run evaluation on each task's val and test splits."""

    max_test_examples: int = 32
    """Greedy-generation exact match on at most this many test examples per task."""
    max_new_tokens: int = 24
    """Generation length cap for exact match."""
    batch_size: int = 64
    curve_points: int = 10
    """Validation-loss checkpoints during training, evenly spaced over the
    budget (0 disables); they give the loss-vs-tokens curves that effective
    tokens are read from. Their tokens are counted as meta_tokens."""
    curve_examples_per_task: int = 8
    """Validation (and test) examples per task at each curve point (a fixed subset)."""
    curve_max_examples: int = 1024
    """At most this many examples per split at each curve point, in all: above
    it each task gets ``max(1, curve_max_examples // tasks)`` (at least one:
    the worst-case curve needs every task), so a point costs about the same
    at 1,000 tasks as at 100 instead of growing with the task count. Under
    128 tasks at the defaults it changes nothing."""
    max_exact_match_prompts: int = 1024
    """The same bound for the final exact match: at most this many test
    prompts are generated in all, each task's ``max_test_examples`` lowered
    to ``max(1, max_exact_match_prompts // tasks)`` above it (32 tasks at the
    defaults). Losses on the validation and test splits read every example."""
    suite: Optional[str] = "auto"
    """lm-eval suite scored on the final checkpoint (``raymix/eval_suites``):
    ``auto`` is ``ood_embedded`` when every source is the synthetic suite and
    nothing otherwise; null disables it."""
    suite_limit: Optional[int] = None
    """Documents per suite task (default: the suite's own)."""
    ni_dir: Optional[str] = None
    """Task directory for the ``ni_heldout`` suite."""

    def __post_init__(self) -> None:
        for name in ("max_test_examples", "max_new_tokens", "batch_size", "curve_examples_per_task",
                     "curve_max_examples", "max_exact_match_prompts"):
            if getattr(self, name) < 1:
                raise RaymixError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_points < 0:
            raise RaymixError(f"eval.curve_points must be >= 0 (0 disables the curve), got {self.curve_points}")

    def curve_per_task(self, tasks: int) -> int:
        """Examples per task and split at each curve point for a pool of ``tasks`` tasks."""
        return min(self.curve_examples_per_task, max(1, self.curve_max_examples // max(1, tasks)))

    def exact_match_per_task(self, tasks: int) -> int:
        """Test prompts per task that the final exact match generates for."""
        return min(self.max_test_examples, max(1, self.max_exact_match_prompts // max(1, tasks)))


PARALLELISMS = ("ddp", "fsdp")


@dataclass(frozen=True)
class RuntimeConfig:
    """Resources. Not part of a run's identity: they change speed, not results
    (up to floating-point reduction order across workers), with one
    exception: with ``train.global_batch_tokens`` null, a step trains
    ``train.micro_batch_size`` x ``train.grad_accum`` examples per worker, so
    ``num_workers`` sets the global batch and counts in the identity
    (see :func:`identity_hash`; 0 and 1 train alike)."""

    num_workers: int = 2
    """Ray Train workers (DDP or FSDP: ``runtime.parallelism``). 0 is Ray Train's local mode: the training
    function runs in the calling process (no worker actors to start; no
    worker fault tolerance), which suits small runs on a laptop. A range
    ``[min, max]`` makes the run elastic (sets ``min_workers`` and this to max)."""
    min_workers: Optional[int] = None
    """Elastic training: Ray Train starts with as many workers as it can place
    between this and ``num_workers``, and after a worker is lost (a spot
    preemption) or capacity grows, restarts the group at the new size from the
    last checkpoint; the data positions are global, so the examples and the
    ledger carry over exactly. None: exactly ``num_workers``."""
    cpus_per_worker: float = 0.5
    """Fractional CPUs per worker leave room for Ray Data and the mixer
    (whole CPUs for every worker on a 2-CPU machine hang the data tasks)."""
    use_gpu: bool = False
    num_cpus: Optional[int] = None
    """CPUs for a local Ray instance (default: all); ignored when joining a cluster."""
    object_store_memory: int = 512 * 1024**2
    """Object-store bytes for a local Ray instance."""
    torch_threads: int = 1
    """Intra-op threads per worker."""
    data_concurrency: int = 4
    """At most this many tokenisation actors in Ray Data (capped at one per
    ``raymix.tokenizing.TOKENIZER_THREADS`` free CPUs: each actor runs that
    many calls at once, each encoding on its own thread)."""
    max_failures: int = 0
    """Training-worker failures (a killed process, a lost node) Ray Train
    recovers from by restarting the workers from the last checkpoint; -1 for
    no limit. 0 by default: a deterministic error should fail once, not N times."""
    train_poll_seconds: float = 0.25
    """How often Ray Train's controller polls its workers (Ray's
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default; raymix sets it for
    the controller of each run). A worker's ``ray.train.report`` waits until
    the controller has collected the previous report, so at Ray's default
    every checkpoint after the first cost up to 2 s, and starting and ending a
    worker group several polls: 25 s of a 41 s one-worker run on 2 cores. At
    0.25 s the controller makes a few more status calls per second per worker."""
    mixer_max_restarts: int = 3
    """Restarts of the mixer actor after its process dies; rank 0 then
    reloads the last checkpoint's mixer state and re-syncs the ledger."""
    parallelism: str = "ddp"
    """How workers share the model: ``ddp`` (each worker holds a full copy;
    gradients all-reduced) or ``fsdp`` (PyTorch FSDP2: parameters, gradients
    and optimizer state sharded over the workers, per decoder layer, for models
    whose training state does not fit one device). Same results either way,
    up to floating-point reduction order; needs ``runtime.num_workers >= 1``."""

    @staticmethod
    def _shorthand(data: dict, where: str) -> dict:
        """``num_workers: [min, max]`` is ``min_workers: min, num_workers: max``."""
        value = data.get("num_workers")
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise RaymixError(f"{where}.num_workers: expected an integer or a range [min, max] of two "
                                  f"integers, got {value!r}")
            if "min_workers" in data:
                raise RaymixError(f"{where}: give the elastic range either as num_workers: [min, max] or as "
                                  "min_workers, not both")
            data = {**data, "min_workers": value[0], "num_workers": value[1]}
        return data

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def __post_init__(self) -> None:
        if self.parallelism not in PARALLELISMS:
            raise RaymixError(f"runtime.parallelism must be one of {', '.join(PARALLELISMS)}, "
                              f"got {self.parallelism!r}{_suggest(self.parallelism, PARALLELISMS)}")
        if self.parallelism == "fsdp" and self.num_workers == 0:
            raise RaymixError("runtime.parallelism=fsdp shards the model over Ray Train workers: "
                              "it needs runtime.num_workers >= 1, got 0")
        if self.max_failures < -1:
            raise RaymixError(f"runtime.max_failures must be >= -1, got {self.max_failures}")
        if not self.train_poll_seconds > 0:
            raise RaymixError(f"runtime.train_poll_seconds must be > 0, got {self.train_poll_seconds}")
        if self.mixer_max_restarts < -1:
            raise RaymixError(f"runtime.mixer_max_restarts must be >= -1, got {self.mixer_max_restarts}")
        if self.num_workers < 0:
            raise RaymixError(f"runtime.num_workers must be >= 0 (0: Ray Train local mode), got {self.num_workers}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise RaymixError(f"runtime.num_workers=[{self.min_workers}, {self.num_workers}]: an elastic range "
                              "needs 1 <= min <= max")
        if self.elastic and self.max_failures == 0:
            # Ray Train resizes an elastic group by restarting it from the
            # last checkpoint: with no restarts allowed a lost worker fails the run.
            raise RaymixError(f"runtime.num_workers=[{self.min_workers}, {self.num_workers}] is elastic, which "
                              "recovers from a lost worker by a restart: set runtime.max_failures to N > 0 "
                              "(or -1, no limit)")
        if self.cpus_per_worker <= 0:
            raise RaymixError(f"runtime.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. Default: a SQLite store under the run's output directory;
    ``MLFLOW_TRACKING_URI`` or ``tracking_uri`` point it at a server."""

    tracking_uri: Optional[str] = None
    experiment: str = "raymix"
    run_name: Optional[str] = None
    per_task_metrics_max_tasks: int = 64
    """Up to this many tasks, every per-task number (mixture weight, training
    and curve loss, signal values, final losses) is its own MLflow metric;
    above it, each becomes a fixed set of ``tasks/...`` aggregates (worst,
    mean, quantiles; entropy and KL from uniform of the mixture) and the full
    per-task series are written as Parquet artifacts (``per_task/``), so a run
    of thousands of tasks stays readable (``raymix.metrics_view``)."""

    def __post_init__(self) -> None:
        if self.per_task_metrics_max_tasks < 0:
            raise RaymixError(f"tracking.per_task_metrics_max_tasks must be >= 0, got {self.per_task_metrics_max_tasks}")


@dataclass(frozen=True)
class RunConfig:
    """A whole run."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        from raymix.registry import POLICIES  # filled when raymix.policies is imported (raymix/__init__.py)

        if self.seed < 0:  # numpy's generators take non-negative seeds only
            raise RaymixError(f"seed must be >= 0, got {self.seed}")

        if self.policy.name not in POLICIES:
            raise RaymixError(
                f"policy.name: unknown policy {self.policy.name!r}; "
                f"choose one of {', '.join(sorted(POLICIES))}"
                f"{_suggest(self.policy.name, POLICIES)}"
            )
        if self.train.pack_length is not None and self.train.pack_length < self.data.max_seq_len:
            raise RaymixError(f"train.pack_length ({self.train.pack_length}) must be at least data.max_seq_len "
                              f"({self.data.max_seq_len}), the longest example, or null")
        if self.train.attention == "flex" and not self.runtime.use_gpu:
            raise RaymixError("train.attention=flex needs runtime.use_gpu=true: torch's flex attention has no "
                              "backward on CPU (use train.attention=sdpa there)")
        if self.runtime.elastic and self.train.global_batch_tokens is None:
            # An elastic group changes its worker count during the run; with
            # a per-worker batch the global batch (and the result) would change with it.
            raise RaymixError(f"runtime.num_workers=[{self.runtime.min_workers}, {self.runtime.num_workers}] is "
                              "elastic: set train.global_batch_tokens, so that a step trains the same global "
                              "batch whatever the worker count (with it null, a step trains "
                              "train.micro_batch_size x train.grad_accum examples per worker)")
        if self.runtime.parallelism == "fsdp" and not POLICIES[self.policy.name].fsdp:
            # A signal that runs a different number of forwards on each worker
            # (ADAPT's meta step, with autograd.grad on a parameter subset) or
            # on rank 0 alone (GradEx) is not correct when every forward is a
            # collective over all workers, as under FSDP (the registry says which).
            raise RaymixError(f"policy.name={self.policy.name} needs the full model on every worker: "
                              "use runtime.parallelism=ddp (runtime.parallelism=fsdp supports the "
                              "policies without a model-side meta step)")


# --------------------------------------------------------------------------
# Building from dicts / YAML with validation


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Coerce/verify ``value`` against annotation ``tp``; raise naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except RaymixError as e:
                errors.append(str(e))
        raise RaymixError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RaymixError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, args))}"
                f"{_suggest(value, map(str, args))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RaymixError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise RaymixError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise RaymixError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RaymixError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RaymixError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RaymixError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RaymixError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: Any, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, checking keys and types."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RaymixError(f"{where or 'config'}: expected a mapping, got {data!r}")
    if hasattr(cls, "_shorthand"):  # a section's shorthand forms, e.g. runtime.num_workers: [min, max]
        data = cls._shorthand(data, where or "config")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RaymixError(f"unknown config key {path!r}{_suggest(key, names)}")
        kwargs[key] = _check_type(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (YAML/JSON safe)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _merged(old: dict, new: dict, cls: Any) -> dict:
    """``new`` over ``old``, nested config sections merged key by key."""
    out = dict(old)
    hints = typing.get_type_hints(cls)
    for k, v in new.items():
        hint = hints.get(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and dataclasses.is_dataclass(hint):
            v = _merged(out[k], v, hint)
        out[k] = v
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    cls: Any = RunConfig
    for i, k in enumerate(keys):
        valid = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
        if valid is not None and k not in valid:
            prefix = ".".join(keys[:i])
            where = f"{prefix}.{k}" if prefix else k
            raise RaymixError(f"--set {dotted}: unknown config key {where!r}{_suggest(k, valid)}")
        hint = typing.get_type_hints(cls)[k] if dataclasses.is_dataclass(cls) else None
        if i == len(keys) - 1:
            # A mapping for a config section merges into what earlier overrides
            # set there (a space's base ``policy.adapt.every_steps: 5`` survives
            # its grid's ``policy: {name: adapt}``); any other value replaces.
            if isinstance(value, dict) and dataclasses.is_dataclass(hint) and isinstance(node.get(k), dict):
                value = _merged(node[k], value, hint)
            node[k] = value
            return
        cls = hint if hint is not None and dataclasses.is_dataclass(hint) else None
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, YAML-parsed value)."""
    if "=" not in item:
        raise RaymixError(f"--set {item!r}: expected key=value, e.g. --set policy.name=uniform")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RaymixError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The embedded default, or ``path``'s YAML, with ``key=value`` overrides on top."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RaymixError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RaymixError(f"config file {p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise RaymixError(f"config file {p}: top level must be a mapping")
    else:
        # RAYMIX_SET: key=value lines that change the embedded default (under the
        # command's own --set), e.g. a tiny pool for the README's blocks in tests.
        overrides = [*filter(None, map(str.strip, os.environ.get("RAYMIX_SET", "").splitlines())), *overrides]
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    try:
        return from_dict(RunConfig, tree)
    except RaymixError as e:
        raise RaymixError(f"{p}: {e}" if path is not None else str(e)) from None


SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "apikey", "credential", "credentials")


def is_secret_key(name: str) -> bool:
    """``hf_token``, ``api_key``, ``password`` are; ``tokenizer``, ``max_new_tokens`` are not."""
    return any(part in SECRET_WORDS for part in name.lower().replace("-", "_").split("_"))


def flatten(cfg: RunConfig) -> dict[str, str]:
    """``section.field -> str`` params for MLflow; fields named like secrets are left out.

    Values that are lists or mappings (sources, weights) are logged as one
    JSON string each, so task names inside them are never mistaken for keys.
    """
    out: dict[str, str] = {}
    for section, node in to_dict(cfg).items():
        items = node.items() if isinstance(node, dict) else [(None, node)]
        for name, value in items:
            key = f"{section}.{name}" if name is not None else section
            if is_secret_key(name or section):
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            out[key] = text[:6000]  # MLflow's param value limit
    return out


IDENTITY_SECTIONS = ("seed", "data", "model", "budget", "policy", "train", "eval")


_ADAPT_BLOCK_BEFORE_13 = {
    "every_steps": 20, "warmup_steps": 20, "tau": 0.5, "entropy": 0.01, "lr": 0.3, "optimizer": "adam",
    "floor": 0.05, "lookahead_lr": None, "init": "uniform", "tasks_per_step": 8, "examples_per_task": 8,
    "val_examples_per_task": 4, "params": "last_block", "sketch_dim": 256}


def identity_hash(cfg: RunConfig) -> str:
    """Hash of what changes the result (not runtime, tracking or cache paths;
    the worker count only where it sets the global batch)."""
    tree = {k: v for k, v in to_dict(cfg).items() if k in IDENTITY_SECTIONS}
    tree["data"].pop("cache_dir", None)
    # The split rule (raymix.tasks.records.assign_splits): by question since
    # it stopped putting copies of test questions in train. A pool with
    # repeated prompts (the embedded default) changed with it, so every
    # identity did: a sweep recorded before resumes by training again.
    tree["data"]["split_rule"] = "question"
    for src in tree["data"]["sources"]:
        for key in ("revision", "id_column"):
            if src.get(key) is None:
                src.pop(key, None)  # added later: unset, the identities stay as they were
    if tree["policy"].get("name") != "adapt":
        # ADAPT's block entered every policy's hash before it was popped for
        # the others; its defaults then changed (issue #13). The other
        # policies hash the block as it was, so their identities (sweep
        # resume, reports) stay what they were.
        tree["policy"]["adapt"] = dict(_ADAPT_BLOCK_BEFORE_13)
    else:
        if tree["policy"]["adapt"].get("meta_share") is None:
            tree["policy"]["adapt"].pop("meta_share", None)  # added later: off, it leaves ADAPT's identity as it was
        if tree["policy"]["adapt"].get("signal_share") == AdaptConfig.signal_share:
            # Added later. At its default it binds only on pools of more than
            # tasks_per_step tasks, so every smaller pool's ADAPT runs (sweep
            # resume, reports) keep the identities they were recorded under;
            # set otherwise, it counts. (A larger pool's ADAPT run recorded
            # before it read more tasks per meta step under the same identity.)
            tree["policy"]["adapt"].pop("signal_share")
    if tree["policy"].get("name") == "regmix":
        for key in ("swarm_dir", "concurrent_proxies"):  # where and when proxies train, not what they are
            tree["policy"]["regmix"].pop(key, None)
    for block in ("gradex", "ideal", "odm", "doremi", "aioli", "regmix"):
        if tree["policy"].get("name") != block:
            # Option blocks added after runs were recorded count only for
            # their own policy: the other policies' hashes (sweep and
            # --resume identities) stay as they were.
            tree["policy"].pop(block, None)
    for key in ("checkpoint_tokens", "checkpoint_fraction", "checkpoints_to_keep", "gradient_checkpointing",
                "packing", "pack_length", "attention", "compile"):
        # When to checkpoint, whether to recompute, how the step's examples
        # are laid out (padded or packed) and which kernels compute them do
        # not change the result: the same examples and loss, up to
        # floating-point order (as runtime.parallelism).
        tree["train"].pop(key, None)
    for key in ("curve_max_examples", "max_exact_match_prompts"):
        # Added later. At their defaults they bind only above 128 and 32
        # tasks, so every smaller pool's runs (sweep resume, reports) keep the
        # identities they were recorded under; set otherwise, they count. (A
        # larger pool's run recorded before them evaluated more examples per
        # task under the same identity.)
        if tree["eval"].get(key) == getattr(EvalConfig, key):
            tree["eval"].pop(key)
    if tree["train"].get("global_batch_tokens") is None:
        tree["train"].pop("global_batch_tokens", None)
        workers = data_parallel_workers(cfg)
        if workers > 1:
            # Without a global batch in tokens, a step trains micro_batch_size
            # x grad_accum examples on every worker: the worker count sets
            # the global batch, so it changes the result. One worker and
            # Ray Train's local mode train alike (bit for bit) and add
            # nothing, so their runs keep the identities they were recorded under.
            tree["train"]["data_parallel_workers"] = workers
    else:
        # The global batch fixes the result; how it is split is hardware.
        tree["train"].pop("micro_batch_size", None)
        tree["train"].pop("grad_accum", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def data_parallel_workers(cfg: RunConfig) -> int:
    """How many workers a step's examples are spread over: ``runtime.num_workers``,
    1 in Ray Train's local mode (0)."""
    return max(1, cfg.runtime.num_workers)


def identity_diff(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """``key: old -> new`` for each field of the identity's sections that
    differs, and the worker count where it sets the global batch."""
    a, b = flatten(saved), flatten(cfg)
    keys = sorted(k for k in set(a) | set(b)
                  if k.split(".")[0] in IDENTITY_SECTIONS and a.get(k) != b.get(k))
    out = [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys]
    workers = data_parallel_workers(saved), data_parallel_workers(cfg)
    if saved.train.global_batch_tokens is None and cfg.train.global_batch_tokens is None and workers[0] != workers[1]:
        out.append(f"runtime.num_workers: {saved.runtime.num_workers} -> {cfg.runtime.num_workers} (with "
                   "train.global_batch_tokens null a step trains train.micro_batch_size x train.grad_accum "
                   "examples per worker, so the worker count sets the global batch; a run that may move "
                   "between worker counts sets train.global_batch_tokens when it starts)")
    return out


def effective_grad_accum(cfg: RunConfig, world: Optional[int] = None) -> int:
    """Micro-batches per optimizer step: ``train.grad_accum``, or derived from
    ``train.global_batch_tokens`` as ceil(global / (micro-batch x workers x
    max_seq_len)), at least 1. ``world``: the workers the run has now (an
    elastic run's count varies); by default ``runtime.num_workers``."""
    if cfg.train.global_batch_tokens is None:
        return cfg.train.grad_accum
    workers = max(1, cfg.runtime.num_workers if world is None else world)
    per_micro = cfg.train.micro_batch_size * workers * cfg.data.max_seq_len
    return max(1, -(-cfg.train.global_batch_tokens // per_micro))
