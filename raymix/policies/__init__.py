"""Mixing policies, registered by name (import registers them)."""

from raymix.policies import adapt, gradex, ideal, static  # noqa: F401  (import registers the policies)
from raymix.policies.base import (
    POLICIES,
    MixingPolicy,
    PoolInfo,
    Signals,
    build_policy,
    cap_mixture,
    normalise,
    policy_needs_meta,
    register_policy,
)

__all__ = [
    "POLICIES",
    "MixingPolicy",
    "PoolInfo",
    "Signals",
    "build_policy",
    "cap_mixture",
    "normalise",
    "policy_needs_meta",
    "register_policy",
]
