"""ADAPT: a learned task distribution updated by a first-order meta-gradient.

``policy.py``: the mixer-side policy (logits, the meta-gradient through the
softmax, the entropy bonus; pure NumPy). ``signal.py``: the worker-side
signal (validation losses and gradient alignments at each meta step; torch).
"""

from raymix.policies.adapt.policy import AdaptPolicy, entropy, smooth_max, softmax

__all__ = ["AdaptPolicy", "entropy", "smooth_max", "softmax"]
