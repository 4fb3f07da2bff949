"""Mixing policies, registered by name (import registers them).

One module per static family (``static.py``), one folder per learned policy
(``adapt/``, ``gradex/``, ``ideal/``, ``odm/``, ``doremi/``, ``aioli/``, ``regmix/``: its mixer-side policy, its worker-side
signal, its estimator). Importing this package loads the mixer-side parts
only (no torch): worker-side signals and drivers are named in the registry
by import path and loaded where they run.
"""

from raymix.policies import adapt, aioli, doremi, gradex, ideal, odm, regmix, static  # noqa: F401  (import registers the policies)
from raymix.policies.base import (
    POLICIES,
    MixingPolicy,
    PolicySpec,
    PoolInfo,
    Signals,
    build_policy,
    cap_mixture,
    cap_weights,
    example_weights,
    normalise,
    policy_spec,
    register_policy,
    resolve,
    token_shares,
    tokens_per_example,
)

__all__ = [
    "POLICIES",
    "MixingPolicy",
    "PolicySpec",
    "PoolInfo",
    "Signals",
    "build_policy",
    "cap_mixture",
    "cap_weights",
    "example_weights",
    "normalise",
    "policy_spec",
    "register_policy",
    "resolve",
    "token_shares",
    "tokens_per_example",
]
