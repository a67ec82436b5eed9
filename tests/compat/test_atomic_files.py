"""Files another process polls (server.json, summary.json, configs, ...) are written atomically."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

from smolcluster.common.files import write_atomic

PACKAGE = Path(__file__).resolve().parents[2] / "smolcluster"


def test_a_reader_never_sees_half_a_file(tmp_path: Path):
    path = tmp_path / "server.json"
    write_atomic(path, json.dumps({"n": -1}))
    stop, seen, broken = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["n"])
            except ValueError as e:  # a torn read
                broken.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(300):
            write_atomic(path, json.dumps({"n": n, "pad": "x" * 200_000}))
    finally:
        stop.set()
        t.join()
    assert not broken and len(seen) > 10 and seen == sorted(seen)
    assert json.loads(path.read_text())["n"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["server.json"]  # no temp file left behind


def test_the_package_writes_files_only_atomically():
    """Path.write_text/write_bytes truncate first: a process polling the file can read it empty or half done."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("write_text", "write_bytes"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == [], f"use smolcluster.common.files.write_atomic: {offenders}"
