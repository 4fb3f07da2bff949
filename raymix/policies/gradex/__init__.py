"""GradEx: first-order subset estimation (Li, Zhang, Wang, Zhang).

``policy.py``: the mixer-side policy (uniform, then the selected tasks; pure
NumPy). ``signal.py``: the worker-side step (estimate, score, select, verify;
torch). ``estimator.py``: the linearised fit in projected gradient space.
"""

from raymix.policies.gradex.policy import GradexPolicy, subset_counts, subset_tasks, target_indices

__all__ = ["GradexPolicy", "subset_counts", "subset_tasks", "target_indices"]
