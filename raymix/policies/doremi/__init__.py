"""DoReMi: Group DRO over tasks on the excess loss over a reference model.

``policy.py``: the mixer-side exponentiated-gradient step on the task
weights (pure NumPy). ``signal.py``: the worker-side per-token excess loss
of the trained model over the frozen reference model (torch)."""

from raymix.policies.doremi.policy import DoremiPolicy, dro_step

__all__ = ["DoremiPolicy", "dro_step"]
