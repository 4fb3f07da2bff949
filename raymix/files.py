"""Files raymix writes that another process or a later run reads back
(run records, sweep state, progress, scores): whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON in ``path``, written under ``<name>.tmp`` and renamed:
    a reader never sees a half-written file (a crash or a full disk leaves
    the previous one, or none). ``dumps``: :func:`json.dumps`'s options."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, **dumps))
    tmp.replace(path)
