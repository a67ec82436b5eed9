"""WikiText-2 for the GPT: found in a folder, or downloaded once into ~/.cache/smolcluster/wikitext-2.

Where the splits come from, in order: `data.dir` in gpt_config.yaml, else $SMOLCLUSTER_TEXT_DIR, else the
cache (downloading wikitext-2-raw-v1 into it when it is empty). A folder holds the official files
(wiki.train.raw, wiki.valid.raw, wiki.test.raw, or the tokenized wiki.*.tokens) or PyTorch's example
names (train.txt, valid.txt, test.txt).

With a train split, the GPT trains on train and validates on valid. A folder without one (the CI's copy
of WikiText-2 holds only valid and test) trains on valid and evaluates on test, and the run says so in
its log, progress line and summary.
"""

from __future__ import annotations

import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from smolcluster.common.errors import DataError
from smolcluster.common.files import write_atomic
from smolcluster.core.training.data import download_then_read

TEXT_DIR_ENV = "SMOLCLUSTER_TEXT_DIR"
SPLIT_FILES = {
    "train": ("wiki.train.raw", "wiki.train.tokens", "train.txt"),
    "valid": ("wiki.valid.raw", "wiki.valid.tokens", "valid.txt", "validation.txt"),
    "test": ("wiki.test.raw", "wiki.test.tokens", "test.txt"),
}
# The dataset's own archive (Salesforce's bucket, and its author's mirror), then the Hugging Face copy
# (parquet files, read when pyarrow is installed).
ZIP_URLS = (
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
)
PARQUET_URL = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/wikitext-2-raw-v1/{split}-00000-of-00001.parquet"
PARQUET_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WikiText:
    folder: Path
    train_text: str
    eval_text: str
    train_split: str  # train, or valid when the folder has no train split
    eval_split: str  # valid, or test

    @property
    def offline_split(self) -> bool:
        return self.train_split != "train"

    def note(self) -> str:
        if self.offline_split:
            return f"no train split in {self.folder}: training on valid, evaluating on test"
        return f"training on train, validating on {self.eval_split} ({self.folder})"

    def info(self) -> dict:
        return {"dataset": "wikitext-2", "dir": str(self.folder), "train_split": self.train_split,
                "eval_split": self.eval_split, "note": self.note()}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "smolcluster" / "wikitext-2"


def resolve_text_dir(configured: str | None) -> Path | None:
    """data.dir, else $SMOLCLUSTER_TEXT_DIR, else None (the cache, downloading into it)."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get(TEXT_DIR_ENV)
    return Path(env).expanduser() if env else None


def find_splits(folder: Path) -> dict[str, Path]:
    """The split files present in `folder` (also in a wikitext-2-raw/ or wikitext-2/ inside it)."""
    found: dict[str, Path] = {}
    for base in (folder, folder / "wikitext-2-raw", folder / "wikitext-2"):
        for split, names in SPLIT_FILES.items():
            for name in names:
                if split not in found and (base / name).is_file():
                    found[split] = base / name
    return found


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start} is not UTF-8; WikiText files are UTF-8 - download them again") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _from_folder(folder: Path) -> WikiText | None:
    splits = find_splits(folder)
    if "train" in splits and ("valid" in splits or "test" in splits):
        eval_split = "valid" if "valid" in splits else "test"
        return WikiText(folder, _read(splits["train"]), _read(splits[eval_split]), "train", eval_split)
    if "valid" in splits and "test" in splits:
        return WikiText(folder, _read(splits["valid"]), _read(splits["test"]), "valid", "test")
    return None


def _download_zip(dest: Path, url: str, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {Path(n).name: n for n in z.namelist()}
        wanted = [SPLIT_FILES[s][0] for s in SPLIT_FILES]
        missing = [w for w in wanted if w not in members]
        if missing:
            raise DataError(f"{url}: the archive lacks {', '.join(missing)}")
        for name in wanted:
            write_atomic(dest / name, z.read(members[name]))


def _download_parquet(dest: Path, timeout: float) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("the Hugging Face copy is parquet, which needs pyarrow (pip install pyarrow)") from None
    for split, hf_split in PARQUET_SPLITS.items():
        with urllib.request.urlopen(PARQUET_URL.format(split=hf_split), timeout=timeout) as r:
            table = pq.read_table(io.BytesIO(r.read()))
        write_atomic(dest / SPLIT_FILES[split][0], "".join(table.column("text").to_pylist()))


def download_wikitext(dest: Path, urls: tuple[str, ...] = ZIP_URLS, timeout: float = DOWNLOAD_TIMEOUT_S,
                      parquet: bool = True) -> None:
    """wikitext-2-raw-v1 into `dest` (wiki.{train,valid,test}.raw), from the first source that answers."""
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            _download_zip(dest, url, timeout)
            return
        except Exception as e:
            errors.append(f"{url}: {type(e).__name__}: {e}")
    if parquet:
        try:
            _download_parquet(dest, timeout)
            return
        except Exception as e:
            errors.append(f"{PARQUET_URL.format(split='*')}: {type(e).__name__}: {e}")
    raise DataError("download failed: " + "; ".join(errors))


def load_wikitext(configured_dir: str | None, *, download: bool = True, cache_dir: Path | None = None,
                  downloader: Callable[[Path], None] | None = None) -> WikiText:
    """WikiText-2's splits (see the module docstring); DataError naming every place looked in and the fix."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    explicit = resolve_text_dir(configured_dir)
    looked = []
    for folder in ([explicit] if explicit else []) + [cache]:
        found = _from_folder(folder)
        if found is not None:
            return found
        have = sorted(find_splits(folder)) if folder.is_dir() else []
        looked.append(f"{folder} ({'missing' if not folder.is_dir() else 'holds ' + (', '.join(have) or 'no split')})")
        if explicit is not None and folder == explicit:
            break  # a folder the user named must hold the data: no silent download elsewhere
    problem = "download not tried"
    if download and explicit is None:
        found, problem = download_then_read(lambda: (downloader or download_wikitext)(cache), lambda: _from_folder(cache))
        if found is not None:
            return found
    raise DataError(
        f"WikiText-2 not found. Looked in: {'; '.join(looked)}. {problem}. Fix: put wiki.train.raw, "
        f"wiki.valid.raw and wiki.test.raw (or valid.txt and test.txt) in a folder and set data.dir in "
        f"gpt_config.yaml or {TEXT_DIR_ENV} to it, or run once with internet access to download it into {cache}."
    )
