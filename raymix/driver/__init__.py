"""The driver layer: what runs in the process that starts a run.

``setup.py`` prepares (Ray, pool, tokenizer, model, output folder, MLflow
run); ``single.py`` trains one run on a Ray Train worker group or in-process;
multi-run policies bring their own driver, named in their registry entry
(IDEAL's rounds: ``ideal.py``). :func:`run` picks the one a config needs.
Dependency direction: the CLI and the sweep call this layer; it calls the
training loop, the mixer and the policies; none of those call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from raymix.config import RunConfig
from raymix.driver.single import run_single
from raymix.registry import policy_spec, resolve


def run(cfg: RunConfig, output_dir: str | Path, parent_run_id: Optional[str] = None, resume: bool = False) -> dict:
    """One run of ``cfg`` (several, under one MLflow run, for a multi-run
    policy): train under the budget, evaluate, write ``summary.json``; return
    the summary. ``resume=True`` continues the unfinished run in ``output_dir``."""
    driver = policy_spec(cfg.policy.name).driver
    return (resolve(driver) if driver is not None else run_single)(cfg, output_dir, parent_run_id, resume)


__all__ = ["run", "run_single"]
