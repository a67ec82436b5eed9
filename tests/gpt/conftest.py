"""GPT tests: tiny models on the offline WikiText-2 split (valid + test, as CI has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from gpt_helpers import SHARED, TINY, deep_merge


@pytest.fixture
def wikitext_dir() -> Path:
    """The offline WikiText-2 folder: $SMOLCLUSTER_TEXT_DIR (CI sets it), else shared/ beside the checkout."""
    env = os.environ.get("SMOLCLUSTER_TEXT_DIR")
    folder = Path(env) if env else SHARED / "data" / "wikitext-2"
    if not (folder / "valid.txt").is_file():
        pytest.skip(f"no offline WikiText-2 at {folder} (set SMOLCLUSTER_TEXT_DIR)")
    return folder


@pytest.fixture
def tiny_config(tmp_path, wikitext_dir):
    """write(changes) -> path of a tiny GPT config (data.dir set to the offline split)."""
    def write(changes: dict | None = None, name: str = "gpt.yaml") -> Path:
        cfg = deep_merge(deep_merge(TINY, {"data": {"dir": str(wikitext_dir)}}), changes or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write
