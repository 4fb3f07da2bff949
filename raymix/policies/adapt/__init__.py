"""ADAPT: a learned task distribution updated by a first-order meta-gradient.

``policy.py``: the mixer-side policy (logits; the alignments standardised
across tasks, so the signal's scale does not follow the learning rate; the
token-share and repetition-cap Jacobians at the served weights; an
exponentiated-gradient update with the entropy bonus; pure NumPy).
``signal.py``: the worker-side signal (validation losses and exact gradient
alignments at each meta step; torch).
"""

from raymix.policies.adapt.policy import AdaptPolicy, entropy, smooth_max, softmax

__all__ = ["AdaptPolicy", "entropy", "smooth_max", "softmax"]
