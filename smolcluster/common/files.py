"""Writing files that another process may read at any moment (server.json, summary.json, configs, ...)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write `data` to a temp file beside `path`, then rename it over `path`: a reader sees the old file
    or the whole new one, never a half-written one. `fsync` also makes it survive a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
