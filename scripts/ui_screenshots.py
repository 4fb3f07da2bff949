"""Screenshots of the MLflow UI pages a user of a sweep opens first, taken in
headless Chromium: the experiment page and the sweep's parent run page.

    python scripts/ui_screenshots.py --store sqlite:///runs/smoke/mlflow.db \
        --experiment smoke --out runs/smoke/ui

Starts an MLflow server on the store (127.0.0.1, a free port, one worker;
its log in OUT/mlflow-ui.log), finds the experiment and its sweep parent run
(the run tagged ``raymix.sweep``), opens the addresses raymix prints
(:func:`raymix.tracking.ui_url`) in a fresh browser profile (the UI's
defaults, as a new user sees them), saves ``OUT/experiment.png`` and
``OUT/parent_run.png``, and stops the server. Needs a Chromium binary
(Debian: ``apt-get install chromium``). The UI is a JavaScript application:
Chromium renders it under a virtual time budget before the screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from raymix.errors import RaymixError
from raymix.tracking import ui_url
from raymix.tracking_server import TrackingServer

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise RaymixError(f"no Chromium found (looked for {', '.join(BROWSERS)}); on Debian: apt-get install chromium")


def screenshot(url: str, path: Path, size: str, budget_ms: int) -> Path:
    profile = tempfile.mkdtemp(prefix="raymix-chromium-")  # a fresh profile: the UI's defaults, no saved state
    try:
        cmd = [browser(), "--headless", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if r.returncode != 0 or not path.exists():
            raise RaymixError(f"chromium failed on {url} (exit {r.returncode}): {r.stderr[-2000:]}")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the MLflow backend store, e.g. sqlite:///runs/smoke/mlflow.db")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--window-size", default="1400,900")
    parser.add_argument("--virtual-time-budget", type=int, default=20000, help="ms of page time to render")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser()  # refuse before starting a server
    server = TrackingServer(args.store, out / "mlartifacts-unused", out / "mlflow-ui.log")
    try:
        uri = server.start()
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            raise RaymixError(f"--experiment: no experiment {args.experiment!r} in {args.store}")
        parents = client.search_runs([exp.experiment_id], f"tags.`raymix.sweep` = '{args.experiment}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        pages = {"experiment": ui_url(uri, exp.experiment_id)}
        if parents:
            pages["parent_run"] = ui_url(uri, exp.experiment_id, parents[0].info.run_id)
        for name, url in pages.items():
            path = screenshot(url, out / f"{name}.png", args.window_size, args.virtual_time_budget)
            print(f"[raymix] {url} -> {path}")
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    finally:
        server.stop()
        shutil.rmtree(out / "mlartifacts-unused", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
