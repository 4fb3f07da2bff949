"""The pool cache's entries on disk, apart from what they hold: the format
version, the manifest (size and SHA-256 of every file), the check a cache
hit passes before a run reads it, and the removal of an entry that fails it.
``raymix.data`` writes the entries' contents and decides when to call these."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

SHARD_FORMAT_VERSION = 4
"""The shard cache's layout and metadata, recorded in each cache entry's
``manifest.json``; an entry with another (or no) version is rebuilt.
3: the manifest (format version, size and SHA-256 of every file) exists.
4: shard groups (``split=<s>/shard=<k>``, small tasks sharing files, a
``task_idx`` column in every file) instead of a directory per task."""


CACHE_KEY_VERSION = 2
"""Part of the cache key. The layout version that was here before the
manifest (2), kept so that entries written then are found, and rebuilt in
place with a message, rather than left behind on disk. Future format
changes bump SHARD_FORMAT_VERSION only."""
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_files(root: Path) -> list[str]:
    """The entry's files but the manifest; hidden ones (a network
    filesystem's, such as .nfs*) are neither recorded nor read as shards."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(root: Path) -> None:
    """``manifest.json``: the format version and every file's size and SHA-256."""
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)} for rel in _cache_files(root)}
    (root / MANIFEST).write_text(json.dumps({"format": SHARD_FORMAT_VERSION, "files": files}, indent=1))


def cache_problem(root: str | Path) -> str | None:
    """Why the shard cache entry ``root`` cannot be used (None if it can):
    written by an older raymix (format version), or a file missing, added,
    truncated or altered since it was written (size and SHA-256)."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return f"written by an older raymix (no {MANIFEST}, format < {SHARD_FORMAT_VERSION})"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e.__class__.__name__})"
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != SHARD_FORMAT_VERSION:
        return f"format version {fmt} in {MANIFEST}, this raymix writes {SHARD_FORMAT_VERSION}"
    files = manifest.get("files") or {}
    present = set(_cache_files(root))
    for rel in sorted(files):
        if rel not in present:
            return f"file {rel} is missing"
        size = (root / rel).stat().st_size
        if size != files[rel]["size"]:
            return f"file {rel} has {size} bytes, {files[rel]['size']} were written (truncated or damaged)"
        if _sha256(root / rel) != files[rel]["sha256"]:
            return f"file {rel} changed since it was written (SHA-256 mismatch)"
    extra = sorted(present - set(files))
    if extra:
        return f"file {extra[0]} was not written with the cache"
    return None


def discard(root: Path) -> None:
    """Move a bad cache entry aside (atomically: a reader sees it or not at
    all), then delete it. Another process may have done so already."""
    aside = root.parent / f".{root.name}.bad.{os.getpid()}.{time.time_ns()}"
    try:
        root.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
