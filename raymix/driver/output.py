"""A run's output folder: checked before anything is written (a finished
run is never overwritten, an unfinished one only continued with
``--resume``, a folder that cannot be written refused), its config.yaml,
and the run record (``run.json``) that ``--resume`` continues."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from raymix.config import RunConfig, identity_diff, identity_hash, load_config, to_yaml
from raymix.errors import RaymixError

RUN_FILE = "run.json"


def check_resumable(cfg: RunConfig, out: Path) -> dict:
    """The saved run record of ``out``, if ``cfg`` may continue it."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise RaymixError(f"--resume: {out} holds no run to resume (no {RUN_FILE})")
    try:
        saved = json.loads(run_file.read_text())
        saved["identity"], saved["mlflow_run_id"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RaymixError(f"--resume: {run_file} cannot be read ({type(e).__name__}: {e}); its run cannot be "
                          "continued: start it afresh in another --output") from None
    if saved["identity"] != identity_hash(cfg):
        diff = identity_diff(load_config(str(out / "config.yaml")), cfg)
        raise RaymixError(f"--resume: the config differs from the run in {out} in fields that change "
                          f"results: {'; '.join(diff)}" if diff else
                          f"--resume: the run in {out} was recorded by a raymix whose results differ for this "
                          f"config (its identity {saved['identity']}; since then e.g. the data split by "
                          "question): start it afresh in another --output")
    return saved


def prepare_output(cfg: RunConfig, output_dir: str | Path, resume: bool, continue_hint: str
                   ) -> tuple[Path, Optional[dict]]:
    """The run's folder, checked before anything is written (a finished run
    is never overwritten, an unfinished one only continued with --resume),
    with its config.yaml; and the saved run to continue, if resuming."""
    # Absolute: Ray workers do not share the driver's working directory.
    out = Path(output_dir).resolve()
    if (out / "summary.json").exists():
        raise RaymixError(
            f"--output {out} already holds a finished run (summary.json); choose another directory"
        )
    saved = check_resumable(cfg, out) if resume else None
    if not resume and (out / RUN_FILE).exists():
        raise RaymixError(f"--output {out} holds an unfinished run ({RUN_FILE}); pass --resume to continue "
                          f"{continue_hint}, or choose another directory")
    check_writable(out)
    if not resume:
        (out / "config.yaml").write_text(to_yaml(cfg))
    return out, saved


MIN_FREE_BYTES = 64 * 1024**2
"""Free space an output folder needs before a run starts: a checkpoint of
the embedded default is a few MiB, the pool cache and a larger model's far
more; under this, the run would fail at its first checkpoint instead. Kept low: CI machines
have had a few hundred MiB free."""


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written (a read-only or full
    filesystem) before anything trains, naming the flag; nothing is deleted."""
    import errno
    import shutil

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".raymix-write-probe"
        probe.write_text("raymix")
        probe.unlink()
    except OSError as e:
        why = {errno.EROFS: "a read-only filesystem", errno.ENOSPC: "a full filesystem",
               errno.EACCES: "not writable by this user", errno.EDQUOT: "over its disk quota"}.get(e.errno, str(e))
        raise RaymixError(f"--output {out} cannot be written ({why}: {e.strerror}); choose another directory") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise RaymixError(f"--output {out}: only {free / 1024**2:.0f} MiB free on its filesystem, under the "
                          f"{MIN_FREE_BYTES / 1024**2:.0f} MiB a run needs for its checkpoints; free some space "
                          "or choose another directory")
