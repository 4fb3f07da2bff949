"""Online Data Mixing (ODM): a multi-armed bandit over tasks, rewarded by
training loss. Mixer-side only (``policy.py``): the per-task training loss of
each interval already reaches the mixer, so no worker-side signal is needed."""

from raymix.policies.odm.policy import OdmPolicy, exploration

__all__ = ["OdmPolicy", "exploration"]
