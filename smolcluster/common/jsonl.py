"""JSON-lines files other processes are still writing (metrics.jsonl, faults.jsonl).

A process killed mid-write leaves a torn last line, and a reader racing a writer sees a line
without its newline: such lines are skipped, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _records(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:  # torn, blank or not JSON
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every whole JSON object line of `path`, in file order ([] when the file does not exist)."""
    try:
        return _records(Path(path).read_bytes())
    except FileNotFoundError:
        return []


class JsonlFollower:
    """Reads what a growing JSON-lines file gained since the last call; a line still being written waits
    for the next call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        return _records(whole)
