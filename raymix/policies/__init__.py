"""Mixing policies, registered by name (import registers them)."""

from raymix.policies import static  # noqa: F401  (registers the static policies)
from raymix.policies.base import (
    POLICIES,
    MixingPolicy,
    PoolInfo,
    Signals,
    build_policy,
    cap_mixture,
    normalise,
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
    "register_policy",
]
