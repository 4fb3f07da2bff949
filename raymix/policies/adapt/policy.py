"""ADAPT: a learned task distribution updated by a first-order meta-gradient.

Logits phi give the mixture p = (1-eps) s + eps/T, s = softmax(phi). Every K
steps the workers report, per task, the validation loss L_j and the alignment
x_i = <g_val, g_i> of the task's training gradient g_i with the gradient of
the smooth worst-case validation loss J = tau log sum_j exp(L_j/tau) (g_val =
sum_j q_j grad L_j, q = softmax(L/tau)).

The signal's scale (``normalise: std``, the default): a one-step look-ahead
theta' = theta - eta sum_i u_i g_i gives dJ/dp ~ -eta <g_val, d(sum u g)/dp>,
whose size follows the learning rate (and, under AdamW, a preconditioner the
look-ahead does not model), so a fixed entropy weight lambda would pull p
back to uniform as the learning rate decays. The alignments are therefore
centred and divided by their standard deviation across tasks: z_i =
(x_i - mean x)/std x. Only the ranking and relative spread of the tasks
remain, and lambda reads in those units whatever the learning rate,
optimizer, batch or parameter subset (``normalise: none`` keeps the raw
-eta x for comparison).

The Jacobian (``token_share``): the training loss is a mean over completion
tokens, so task i's share of an update is u_i = q_i l_i / sum_j q_j l_j (l:
completion tokens per example, q: the served weights), not p_i; dJ/dq_k =
-(l_k/S)(z_k - sum_i u_i z_i) with S = sum_j q_j l_j. It is evaluated at the
served, capped weights q the mixer sends (``Signals.served``), and passed
through the repetition cap: a capped task's served weight does not move with
its proposal, and the free tasks share what the capped ones leave
(:func:`cap_vjp`).

The update (``optimizer: eg``, the default): exponentiated gradient on s with
the entropy bonus, log s <- (1 - beta lambda) log s - beta (1-eps) dJ/dp + c,
i.e. the logits are a moving average of the fixed point log s = -(1-eps)
dJ/dp / lambda + c, reached geometrically under a constant signal.
``sgd``/``adam`` step on phi along d(J - lambda H)/dphi instead.

Pure: signals in, weights out; no Ray, no torch, no I/O.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.config import AdaptConfig, PolicyConfig
from raymix.policies.base import PoolInfo, Signals, register_policy, tokens_per_example


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def smooth_max(losses: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
    """J = tau log sum exp(L/tau) and its weights q = softmax(L/tau)."""
    z = losses / tau
    m = z.max()
    return float(tau * (m + np.log(np.exp(z - m).sum()))), softmax(z)


def entropy(p: np.ndarray) -> float:
    p = np.clip(p, 1e-300, 1.0)
    return float(-(p * np.log(p)).sum())


def kl_uniform(p: np.ndarray) -> float:
    """KL(p || uniform) = log T - H(p): 0 for the uniform mixture."""
    return float(np.log(len(p)) - entropy(np.asarray(p, dtype=np.float64)))


def standardise(x: np.ndarray) -> np.ndarray:
    """(x - mean)/std over the finite entries (NaN elsewhere); zeros when they
    do not vary (no information on which task is better)."""
    out = np.full(len(x), np.nan)
    ok = np.isfinite(x)
    if ok.sum() == 0:
        return out
    c = x[ok] - x[ok].mean()
    sd = c.std()
    out[ok] = c / sd if ok.sum() > 1 and sd > 1e-12 * max(1.0, np.abs(x[ok]).max()) else 0.0
    return out


def token_share_grad(signal: np.ndarray, served: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """dJ/dq for J's first-order change -sum_i u_i(q) signal_i, u_i = q_i l_i / sum_j q_j l_j
    (the share of task i in an update whose loss is a mean over completion tokens)."""
    S = float((served * lengths).sum())
    u = served * lengths / S
    return -(lengths / S) * (signal - (u * signal).sum())


def cap_vjp(grad_q: np.ndarray, proposed: np.ndarray, served: np.ndarray, capped: np.ndarray,
            per_example: Optional[np.ndarray] = None) -> np.ndarray:
    """dJ/dp from dJ/dq through the repetition cap (``raymix.policies.cap_weights``).

    The cap water-fills token shares: a capped task's share of the tokens is
    its remaining capacity over the remaining budget, whatever its proposal;
    the free tasks share the rest in proportion to p_j t_j (t: tokens per
    example, ``per_example``; None: 1). Served (per-example) weights are
    q_j = (a/Z) p_j for a free task and q_i = (s_i/t_i)/Z for a capped one,
    with a = (1 - S_C)/D, D = sum_F p_k t_k and Z normalising. Differentiating,
    for a free task k (with G = sum_m g_m q_m over all tasks, G_F and Q_F the
    free tasks' sums of g_j q_j and of q_j):

        dJ/dp_k = (Q_F/P_F) (g_k - G) - (t_k/D) (G_F - Q_F G),

    and 0 for a capped task. With t = 1 this is the water-filling of the
    weights themselves, q_j = Q_F p_j / P_F."""
    capped = np.asarray(capped, dtype=bool)
    free = ~capped
    if not capped.any() or not free.any():
        return grad_q if not capped.any() else np.zeros_like(grad_q)
    t = np.ones_like(grad_q) if per_example is None else np.asarray(per_example, dtype=np.float64)
    Q_F, P_F, D = float(served[free].sum()), float(proposed[free].sum()), float((proposed * t)[free].sum())
    G, G_F = float((grad_q * served).sum()), float((grad_q * served)[free].sum())
    out = np.zeros_like(grad_q)
    out[free] = (Q_F / P_F) * (grad_q[free] - G) - (t[free] / D) * (G_F - Q_F * G)
    return out


class AdaptPolicy:
    def __init__(self, cfg: AdaptConfig, pool: PoolInfo):
        self.cfg = cfg
        self.T = len(pool.tasks)
        self.per_example = tokens_per_example(pool)  # the cap plans in tokens (cap_vjp)
        if cfg.init == "proportional":
            n = np.maximum(pool.train_tokens.astype(np.float64), 1.0)
            self.phi = np.log(n) - np.log(n).mean()
        else:
            self.phi = np.zeros(self.T)
        self.m = np.zeros(self.T)
        self.v = np.zeros(self.T)
        self.t = 0
        self.alignment = np.zeros(self.T)  # last raw estimate per task
        self.signal = np.zeros(self.T)  # last normalised signal per task (stale entries decayed)
        self.last: dict = {}

    # -- the mixture ---------------------------------------------------------
    def probs(self, phi: Optional[np.ndarray] = None) -> np.ndarray:
        s = softmax(self.phi if phi is None else phi)
        return (1 - self.cfg.floor) * s + self.cfg.floor / self.T

    def initial_weights(self) -> np.ndarray:
        return self.probs()

    # -- the meta-gradient -----------------------------------------------------
    def phi_gradient(self, a: np.ndarray) -> np.ndarray:
        """d(J - lambda H)/d phi from a = dJ/dp."""
        eps = self.cfg.floor
        s = softmax(self.phi)
        p = (1 - eps) * s + eps / self.T
        grad_j = (1 - eps) * s * (a - (s * a).sum())
        h = -(np.log(np.clip(p, 1e-300, 1.0)) + 1.0)  # dH/dp_i
        grad_h = (1 - eps) * s * (h - (s * h).sum())
        return grad_j - self.cfg.entropy * grad_h

    def meta_gradient(self, alignment: np.ndarray, eta: float) -> np.ndarray:
        """d(J - lambda H)/d phi from raw alignments <g_val, g_i> and the
        look-ahead a_i = -eta <g_val, g_i> (p-share, uncapped)."""
        return self.phi_gradient(-eta * np.asarray(alignment, dtype=np.float64))

    def dj_dp(self, signal: np.ndarray, served: np.ndarray, capped: np.ndarray, lengths: np.ndarray
              ) -> np.ndarray:
        """dJ/dp (first order, up to a positive scale) from the per-task signal
        (larger: the task's gradient helps J more), at the served weights."""
        if self.cfg.token_share:
            grad_q = token_share_grad(signal, served, lengths)
        else:
            grad_q = -(signal - (served * signal).sum())
        return cap_vjp(grad_q, self.probs(), served, capped, self.per_example)

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        if "alignment" not in signals.extra:
            return None
        cfg, extra = self.cfg, signals.extra
        align = np.asarray(extra["alignment"], dtype=np.float64)
        fresh = np.isfinite(align)
        self.alignment[fresh] = align[fresh]  # unsampled tasks keep their last estimate
        if cfg.normalise == "std":
            self.signal[~fresh] *= cfg.stale_decay  # a stale estimate counts less at every step it is not refreshed
            self.signal[fresh] = standardise(align)[fresh]
        else:
            self.signal = float(cfg.lookahead_lr or extra.get("lookahead_lr", 1.0)) * self.alignment
        p = self.probs()
        served = p if signals.served is None else np.asarray(signals.served, dtype=np.float64)
        capped = np.zeros(self.T, bool) if signals.capped is None else np.asarray(signals.capped, dtype=bool)
        lengths = np.asarray(extra.get("completion_per_example", np.ones(self.T)), dtype=np.float64)
        lengths = np.where(np.isfinite(lengths) & (lengths > 0), lengths, 1.0)
        a = self.dj_dp(self.signal, served, capped, lengths)
        self.t += 1
        if cfg.optimizer == "eg":
            # Mirror descent on s with the entropy mirror map; the entropy
            # bonus makes it a moving average of the fixed point.
            log_s = self.phi - self.phi.max() - np.log(np.exp(self.phi - self.phi.max()).sum())
            self.phi = (1 - cfg.lr * cfg.entropy) * log_s - cfg.lr * (1 - cfg.floor) * a
            grad = a
        else:
            grad = self.phi_gradient(a)
            if cfg.optimizer == "adam":
                b1, b2 = 0.9, 0.999
                self.m = b1 * self.m + (1 - b1) * grad
                self.v = b2 * self.v + (1 - b2) * grad**2
                m_hat = self.m / (1 - b1**self.t)
                v_hat = self.v / (1 - b2**self.t)
                self.phi = self.phi - cfg.lr * m_hat / (np.sqrt(v_hat) + 1e-12)
            else:
                self.phi = self.phi - cfg.lr * grad
        self.phi -= self.phi.mean()  # softmax is shift-invariant; keep phi centred
        p = self.probs()
        val = np.asarray(extra.get("val_loss", np.full(self.T, np.nan)), dtype=np.float64)
        J = smooth_max(val[np.isfinite(val)], cfg.tau)[0] if np.isfinite(val).any() else float("nan")
        self.last = {"J": J, "entropy": entropy(p), "kl_uniform": kl_uniform(p),
                     "grad_norm": float(np.linalg.norm(grad))}
        return p

    def state_dict(self) -> dict:
        return {"phi": self.phi.tolist(), "m": self.m.tolist(), "v": self.v.tolist(), "t": self.t,
                "alignment": self.alignment.tolist(), "signal": self.signal.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.phi = np.asarray(state["phi"])
        self.m = np.asarray(state["m"])
        self.v = np.asarray(state["v"])
        self.t = int(state["t"])
        self.alignment = np.asarray(state["alignment"])
        self.signal = np.asarray(state.get("signal", np.zeros(self.T)))


@register_policy("adapt", signal="raymix.policies.adapt.signal:AdaptSignal", fsdp=False)
def adapt(cfg: PolicyConfig, pool: PoolInfo) -> AdaptPolicy:
    return AdaptPolicy(cfg.adapt, pool)
