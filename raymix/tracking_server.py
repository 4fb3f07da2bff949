"""A local MLflow tracking server for a sweep whose trials run concurrently.

Several processes writing one SQLite file hit "database is locked" (SQLite
locks the whole file per write; MLflow's client retries only briefly). A
sweep with more than one trial at a time therefore starts ``mlflow server``
on 127.0.0.1 (a free port), the only process that opens the SQLite file,
with a single server worker (MLflow's default of four would be four
processes on one file again); trials, the sweep driver and the report talk
HTTP to it. Artifacts are not proxied: every process of a local sweep runs
on this machine and writes them straight under the sweep's artifact folder,
the same layout as the plain file store, so ``mlflow ui`` on the SQLite file
finds them after the server is gone.

The server runs in its own session (Ctrl-C in the terminal reaches the
sweep, which then stops the server after marking its runs), logs to a file
in the sweep's folder, is stopped by :meth:`TrackingServer.stop` (its whole
process group), and gets SIGTERM from the kernel if the sweep's process dies
without stopping it (``PR_SET_PDEATHSIG``), so a killed sweep leaves no
server behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from raymix.errors import RaymixError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


try:
    # Resolved here, not in the child: after fork in a process with threads
    # (Ray's), the child must not take the dynamic loader's locks.
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM to the server when the process that started it dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TrackingServer:
    """``mlflow server`` owning ``backend_uri`` (a ``sqlite:///`` URI), new
    experiments' artifacts under ``artifact_root``, its output in ``log_path``."""

    def __init__(self, backend_uri: str, artifact_root: Path, log_path: Path, port: Optional[int] = None):
        self.backend_uri, self.artifact_root, self.log_path = backend_uri, Path(artifact_root), Path(log_path)
        self.port = port
        self.proc: Optional[subprocess.Popen] = None
        self.uri: Optional[str] = None

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_uri,
                "--default-artifact-root", self.artifact_root.resolve().as_uri(),
                "--no-serve-artifacts", "--host", HOST, "--port", str(port), "--workers", "1"]

    def start(self, timeout: float = 300.0) -> str:
        """Start the server and wait until ``/health`` answers; returns its URI.
        A fresh SQLite store runs its schema migrations first (about 12 s on
        2 cores, longer when busy). A port taken between choosing and binding
        it is retried on another."""
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port = self.port or free_port()
            with open(self.log_path, "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command(port))}\n")
                log.flush()
                # The server's environment must not point it at another server.
                # MLflow 3's job runner (GenAI scorers and judges, which raymix
                # does not use) would add eight processes on the same store.
                env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
                env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
                self.proc = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            uri = f"http://{HOST}:{port}"
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    break
                if _healthy(uri):
                    self.uri = uri
                    return uri
                time.sleep(0.5)
            tail = self.log_path.read_text(errors="replace")[-3000:]
            self.stop()
            if "address already in use" in tail.lower() and self.port is None and attempt < 2:
                continue
            why = "exited" if time.monotonic() - t0 < timeout else f"did not answer {uri}/health in {timeout:.0f} s"
            raise RaymixError(f"the sweep's MLflow server ({self.backend_uri}) {why}; its log {self.log_path} "
                              f"ends with:\n{tail}")
        raise AssertionError("unreachable")

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server and its workers (its process group): SIGTERM, then
        SIGKILL after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass

    def __enter__(self) -> TrackingServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_if_concurrent(store: str, folder: Path, concurrent: int, runs: int,
                        what: str) -> tuple[Optional[TrackingServer], str]:
    """The server a sweep's trials or a RegMix swarm's proxies log through:
    started in front of an SQLite ``store`` when more than one of ``runs``
    log at a time (only one process then opens the file), with its artifacts
    and log in ``folder``; otherwise none, and the store itself. The caller
    stops a returned server."""
    if not (store.startswith("sqlite:") and concurrent > 1 and runs > 1):
        return None, store
    server = TrackingServer(store, folder / "mlartifacts", folder / "mlflow-server.log")
    print(f"[raymix] {concurrent} {what} at a time: starting an MLflow server on {store} "
          f"(log {server.log_path})", flush=True)
    return server, server.start()
