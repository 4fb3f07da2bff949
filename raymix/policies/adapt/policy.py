"""ADAPT: a learned task distribution updated by a first-order meta-gradient.

Logits phi give the mixture p = (1-eps) softmax(phi) + eps/T. Every K steps
the workers report, per task, the validation loss L_j and the alignment
<g_val, g_i> of the task's training gradient g_i with the gradient of the
smooth worst-case validation loss J = tau log sum_j exp(L_j/tau) (g_val =
sum_j q_j grad L_j, q = softmax(L/tau)). The one-step look-ahead
theta' = theta - eta sum_i p_i g_i gives dJ/dp_i ~ a_i = -eta <g_val, g_i>;
through the softmax, dJ/dphi_k = (1-eps) s_k (a_k - sum_i s_i a_i), s =
softmax(phi). The entropy bonus -lambda H(p) keeps p off the simplex corners.
phi takes a plain or Adam step on J - lambda H.

Pure: signals in, weights out; no Ray, no torch, no I/O.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from raymix.config import AdaptConfig, PolicyConfig
from raymix.policies.base import PoolInfo, Signals, register_policy


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


class AdaptPolicy:
    def __init__(self, cfg: AdaptConfig, pool: PoolInfo):
        self.cfg = cfg
        self.T = len(pool.tasks)
        if cfg.init == "proportional":
            n = np.maximum(pool.train_tokens.astype(np.float64), 1.0)
            self.phi = np.log(n) - np.log(n).mean()
        else:
            self.phi = np.zeros(self.T)
        self.m = np.zeros(self.T)
        self.v = np.zeros(self.T)
        self.t = 0
        self.alignment = np.zeros(self.T)  # last estimate per task
        self.last: dict = {}

    # -- the mixture ---------------------------------------------------------
    def probs(self, phi: Optional[np.ndarray] = None) -> np.ndarray:
        s = softmax(self.phi if phi is None else phi)
        return (1 - self.cfg.floor) * s + self.cfg.floor / self.T

    def initial_weights(self) -> np.ndarray:
        return self.probs()

    # -- the meta-gradient -----------------------------------------------------
    def meta_gradient(self, alignment: np.ndarray, eta: float) -> np.ndarray:
        """d(J - lambda H)/d phi from the alignments <g_val, g_i>."""
        eps = self.cfg.floor
        s = softmax(self.phi)
        p = (1 - eps) * s + eps / self.T
        a = -eta * alignment  # dJ/dp_i, first order
        grad_j = (1 - eps) * s * (a - (s * a).sum())
        h = -(np.log(np.clip(p, 1e-300, 1.0)) + 1.0)  # dH/dp_i
        grad_h = (1 - eps) * s * (h - (s * h).sum())
        return grad_j - self.cfg.entropy * grad_h

    def update(self, signals: Signals) -> Optional[np.ndarray]:
        if "alignment" not in signals.extra:
            return None
        align = np.asarray(signals.extra["alignment"], dtype=np.float64)
        seen = np.isfinite(align)
        self.alignment[seen] = align[seen]  # unsampled tasks keep their last estimate
        eta = float(self.cfg.lookahead_lr or signals.extra.get("lookahead_lr", 1.0))
        grad = self.meta_gradient(self.alignment, eta)
        self.t += 1
        if self.cfg.optimizer == "adam":
            b1, b2 = 0.9, 0.999
            self.m = b1 * self.m + (1 - b1) * grad
            self.v = b2 * self.v + (1 - b2) * grad**2
            m_hat = self.m / (1 - b1**self.t)
            v_hat = self.v / (1 - b2**self.t)
            self.phi = self.phi - self.cfg.lr * m_hat / (np.sqrt(v_hat) + 1e-12)
        else:
            self.phi = self.phi - self.cfg.lr * grad
        self.phi -= self.phi.mean()  # softmax is shift-invariant; keep phi centred
        p = self.probs()
        val = np.asarray(signals.extra.get("val_loss", np.full(self.T, np.nan)), dtype=np.float64)
        J = smooth_max(val[np.isfinite(val)], self.cfg.tau)[0] if np.isfinite(val).any() else float("nan")
        self.last = {"J": J, "entropy": entropy(p), "grad_norm": float(np.linalg.norm(grad))}
        return p

    def state_dict(self) -> dict:
        return {"phi": self.phi.tolist(), "m": self.m.tolist(), "v": self.v.tolist(), "t": self.t,
                "alignment": self.alignment.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.phi = np.asarray(state["phi"])
        self.m = np.asarray(state["m"])
        self.v = np.asarray(state["v"])
        self.t = int(state["t"])
        self.alignment = np.asarray(state["alignment"])


@register_policy("adapt", signal="raymix.policies.adapt.signal:AdaptSignal", fsdp=False)
def adapt(cfg: PolicyConfig, pool: PoolInfo) -> AdaptPolicy:
    return AdaptPolicy(cfg.adapt, pool)
