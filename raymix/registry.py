"""The policy registry: one entry per mixing policy, by name.

Each entry (:class:`PolicySpec`) names what the rest of raymix needs to know
about a policy: its mixer-side policy, its worker-side signal, whether it
runs under FSDP, its multi-run driver. The config checks, the training loop,
the driver, the CLI and the report read these fields; none of them tests a
policy's name. Policies register themselves when ``raymix.policies`` is
imported (``raymix/__init__.py`` does it, so every entry point sees them); a
policy defined elsewhere (a test, a user's module) registers the same way.

This module imports nothing from raymix at run time, so that the config (at
the bottom of the import graph) can check ``policy.name`` against it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    from raymix.config import PolicyConfig
    from raymix.policies.base import MixingPolicy, PoolInfo

PolicyFactory = Callable[["PolicyConfig", "PoolInfo"], "MixingPolicy"]
Ref = Union[str, Callable[..., Any]]
"""A callable, or its ``"module:attribute"`` path, imported only where it is
used: a worker-side signal needs torch, and the mixer actor, which builds
every policy, must not load it."""


@dataclass(frozen=True)
class PolicySpec:
    """Everything raymix needs to know about a policy, in one registry entry.

    The training loop, the driver, the config checks and the report read
    these fields; none of them tests a policy's name."""

    name: str
    factory: PolicyFactory
    """Builds the mixer-side policy (:class:`MixingPolicy`), inside the mixer actor."""
    signal: Optional[Ref] = None
    """Builds the worker-side signal (``raymix.policies.signal.WorkerSignal``)
    from a ``SignalContext``, on every training worker; None: the policy needs
    no work on the workers."""
    fsdp: bool = True
    """Whether the policy runs under ``runtime.parallelism=fsdp`` (a signal that
    needs the full model on every worker does not)."""
    driver: Optional[Ref] = None
    """A multi-run driver ``(cfg, output_dir, parent_run_id, resume) -> summary``
    that replaces the single run (IDEAL's rounds); None: one run."""
    static: bool = False
    """A fixed mixture (the report's baselines for effective tokens)."""
    describe: Optional[Ref] = None
    """``summary -> list[str]``: lines the CLI prints after a run (GradEx's scores)."""
    report_section: Optional[Ref] = None
    """``(df, table) -> list[str]``: Markdown lines the sweep report adds for this policy."""


POLICIES: dict[str, PolicySpec] = {}


def register_policy(name: str, *, signal: Optional[Ref] = None, fsdp: bool = True, driver: Optional[Ref] = None,
                    static: bool = False, describe: Optional[Ref] = None, report_section: Optional[Ref] = None
                    ) -> Callable[[PolicyFactory], PolicyFactory]:
    """Register ``factory`` under ``name`` (a decorator). A policy defined
    outside the package (a test, a user's module) registers itself the same
    way, and ``policy.name`` then accepts it."""

    def deco(factory: PolicyFactory) -> PolicyFactory:
        POLICIES[name] = PolicySpec(name, factory, signal=signal, fsdp=fsdp, driver=driver, static=static,
                                    describe=describe, report_section=report_section)
        return factory

    return deco


def policy_spec(name: str) -> PolicySpec:
    return POLICIES[name]


def build_policy(cfg: PolicyConfig, pool: PoolInfo) -> MixingPolicy:
    return POLICIES[cfg.name].factory(cfg, pool)


def resolve(ref: Ref) -> Callable[..., Any]:
    """The callable a :data:`Ref` names."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
