"""Data: MNIST from IDX files, seeded disjoint shards, deterministic batches; token ids for GPT.

Memory: images stay uint8 (60k x 784 = 47 MB) and are normalised per batch, because every
simulated node is a process and a Pi has 4-8 GB (as float32 they would be 188 MB per process).

Determinism: shard membership and batch order use numpy's legacy RandomState, whose stream is
frozen across numpy versions and platforms, so a Mac, a Pi and a Windows box that compute their
shards independently still get disjoint shards.
"""

from __future__ import annotations

import gzip
import inspect
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from smolcluster.common.errors import DataError
from smolcluster.core.training.models import gpt_eval_sums

T = TypeVar("T")
DATA_DIR_ENV = "SMOLCLUSTER_DATA_DIR"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
DOWNLOAD_TIMEOUT_S = 10.0


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- MNIST files


def resolve_data_dir(config_data_dir: str | None) -> Path | None:
    """Explicit config value, else $SMOLCLUSTER_DATA_DIR, else None (download)."""
    if config_data_dir:
        return Path(config_data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "smolcluster" / "mnist"


def _find_idx(folder: Path, stem: str) -> Path | None:
    """The raw file if present, else the .gz; also look in torchvision's MNIST/raw layout."""
    for base in (folder, folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def _open_idx(path: Path) -> BinaryIO:
    """gzip or raw, decided by the gzip magic bytes rather than the file name."""
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def read_idx(path: Path, magic: int, expect_count: int | None = None) -> torch.Tensor:
    """Read one IDX file (uint8 payload) into a uint8 tensor, validating magic, dims and length."""
    ndim = magic & 0xFF
    try:
        with _open_idx(path) as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim:
                raise DataError(f"{path}: file is too short to hold an IDX header ({len(head)} bytes); "
                                "it is truncated or not an MNIST file - delete it and download it again")
            got_magic = struct.unpack(">I", head[:4])[0]
            if got_magic != magic:
                raise DataError(f"{path}: bad magic number 0x{got_magic:08x}, expected 0x{magic:08x} "
                                f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'} IDX file); "
                                "the file is corrupt or not the file its name says")
            dims = struct.unpack(f">{ndim}I", head[4:])
            if expect_count is not None and dims[0] != expect_count:
                raise DataError(f"{path}: holds {dims[0]} items, expected {expect_count}; use the official MNIST files")
            if ndim == 3 and dims[1:] != (28, 28):
                raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
            out = torch.empty(dims, dtype=torch.uint8)
            buf = out.numpy().reshape(-1)  # read straight into the tensor: one copy, no temp bytes
            view, n = memoryview(buf), 0
            while n < buf.size:  # 1 MiB chunks: gzip would otherwise build a full-size temp bytes object
                got = f.readinto(view[n:n + (1 << 20)])
                if not got:
                    break
                n += got
            if n != buf.size:
                raise DataError(f"{path}: truncated, got {n} of {buf.size} data bytes; delete it and download it again")
            if f.read(1):
                raise DataError(f"{path}: has trailing bytes after {buf.size} data bytes; the file is corrupt")
            return out
    except DataError:
        raise
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); delete it and download it again") from None
    except Exception as e:  # zlib.error from a damaged .gz
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e}); delete it and download it again") from None


def _read_split(folder: Path, split: str) -> ImageSet | None:
    img_stem, lbl_stem, count = MNIST_FILES[split]
    img_path, lbl_path = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        return None
    images = read_idx(img_path, IDX_IMAGES_MAGIC, count)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC, count).long()
    if int(labels.max()) > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9; the file is corrupt")
    return ImageSet(images=images, labels=labels)


def _download_urllib(dest: Path, split: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the two .gz files of a split from the first mirror that answers (atomic rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for stem in MNIST_FILES[split][:2]:
        if _find_idx(dest, stem):
            continue
        for mirror in MNIST_MIRRORS:
            url = mirror + stem + ".gz"
            tmp_name = None
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, \
                        tempfile.NamedTemporaryFile(dir=dest, delete=False, suffix=".part") as tmp:
                    tmp_name = tmp.name
                    shutil.copyfileobj(r, tmp)
                read_idx(Path(tmp_name), IDX_IMAGES_MAGIC if "images" in stem else IDX_LABELS_MAGIC)  # reject junk
                os.replace(tmp_name, dest / (stem + ".gz"))
                break
            except Exception as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                if tmp_name:
                    Path(tmp_name).unlink(missing_ok=True)
        else:
            raise DataError("download failed: " + "; ".join(errors))


def download_mnist(dest: Path, split: str) -> None:
    """torchvision's downloader when torchvision imports, else plain urllib. Raises on failure."""
    try:
        from torchvision.datasets import MNIST  # optional; not installed by default (memory, see README)
    except Exception:
        MNIST = None
    if MNIST is not None:
        try:
            MNIST(str(dest), train=(split == "train"), download=True)
            return
        except Exception:
            pass  # fall through to urllib, which reports every mirror it tried
    _download_urllib(dest, split)


def download_then_read(download: Callable[[], None], read: Callable[[], T | None]) -> tuple[T | None, str]:
    """Download into a cache, then read what it left: (the data, "") or (None, what went wrong)."""
    try:
        download()
        found = read()
        return (found, "") if found is not None else (None, "download finished but the files are not there")
    except DataError as e:
        return None, str(e)
    except Exception as e:
        return None, f"download failed: {type(e).__name__}: {e}"


def load_mnist(split: str, data_dir: str | Path | None, *, download: bool = True,
               cache_dir: Path | None = None,
               downloader: Callable[[Path, str], None] | None = None) -> ImageSet:
    """MNIST "train" (60k) or "test" (10k) as uint8 images and int64 labels.

    Looks in data_dir (else $SMOLCLUSTER_DATA_DIR), then the cache (~/.cache/smolcluster/mnist),
    then downloads into the cache. Raises DataError naming every place it looked.
    """
    if split not in MNIST_FILES:
        raise DataError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    looked: list[str] = []
    explicit = resolve_data_dir(str(data_dir) if data_dir is not None else None)
    for folder in ([explicit] if explicit else []) + [cache]:
        found = _read_split(folder, split)
        if found is not None:
            return found
        looked.append(f"{folder} ({'missing' if not folder.exists() else 'no ' + MNIST_FILES[split][0] + '[.gz]'})")
    problem = "not downloaded (download disabled)"
    if download:
        found, problem = download_then_read(lambda: (downloader or download_mnist)(cache, split), lambda: _read_split(cache, split))
        if found is not None:
            return found
    raise DataError(
        f"MNIST {split} set not found. Looked in: {'; '.join(looked)}. Download into {cache}: {problem}. "
        f"Fix: put the official IDX files (train-images-idx3-ubyte.gz etc.) in a folder and set data_dir "
        f"in nn_config.yaml or the {DATA_DIR_ENV} environment variable to it, or run once with internet access."
    )


# --------------------------------------------------------------------------- shards and batches


def _rng(*ints: int) -> np.random.RandomState:
    """RandomState from several ints (any sign, any size) via 32-bit words; frozen stream."""
    words = []
    for v in ints:
        v = int(v) & ((1 << 64) - 1)
        words += [v & 0xFFFFFFFF, v >> 32]
    return np.random.RandomState(words)


def shard_indices(n: int, num_shards: int, shard: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of one shard: shards are disjoint, seeded, and together cover 0..n-1."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} of {num_shards} does not exist; shards are numbered 0..num_shards-1")
    if n < num_shards:
        raise DataError(f"cannot split {n} samples into {num_shards} shards")
    perm = _rng(seed, 0x5AD).permutation(n)
    part = np.array_split(perm, num_shards)[shard]
    return torch.from_numpy(np.sort(part)).long()


def normalize_images(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float32 [B, 784], (x/255 - mean)/std."""
    x = x_uint8.reshape(x_uint8.shape[0], -1).float()
    return (x / 255.0 - MNIST_MEAN) / MNIST_STD


class ShardLoader:
    """Deterministic batches over one shard. batch_at(step) depends only on (seed, step): resumable."""

    def __init__(self, data: ImageSet, indices: torch.Tensor, batch_size: int, seed: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.indices = indices.long()
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(self.indices) // batch_size  # drop the last partial batch
        if self.steps_per_epoch == 0:
            raise DataError(f"shard has {len(self.indices)} samples, fewer than one batch of {batch_size}; "
                            "lower batch_size or use fewer ranks")
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one permutation per epoch, cached (int64 of the shard size)
            perm = torch.from_numpy(_rng(self.seed, epoch, 0xE90C).permutation(len(self.indices)))
            self._order = self.indices[perm]
            self._epoch = epoch
        assert self._order is not None
        return self._order

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        order = self._epoch_order(step // self.steps_per_epoch)
        pos = (step % self.steps_per_epoch) * self.batch_size
        idx = order[pos:pos + self.batch_size]
        # index_select: the same rows as images[idx], without advanced indexing's overhead (~5x slower here)
        return normalize_images(self.data.images.index_select(0, idx)), self.data.labels.index_select(0, idx)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageSet, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in 0..1) over the whole set; restores the model's train/eval mode.
    Small batches: the float copies of a 2,000-image batch raised a node's peak memory by ~40 MB."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, n = 0.0, 0, len(data)
    try:
        for i in range(0, n, batch_size):
            x = normalize_images(data.images[i:i + batch_size]).to(device)
            y = data.labels[i:i + batch_size].to(device)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)


# --------------------------------------------------------------------------- text (GPT)

# Pure-Python stdlib modules present on every platform: the default corpus needs no download.
# Their text differs between Python versions, so nodes of one run should share a corpus file
# (TextData.load(path)) when their Pythons differ.
DEFAULT_CORPUS_MODULES = ("textwrap", "string", "heapq", "bisect", "functools", "contextlib", "argparse", "dataclasses")


def default_corpus() -> bytes:
    import importlib

    parts = []
    for name in DEFAULT_CORPUS_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError, ImportError):
            continue  # e.g. a frozen/zip-only stdlib: skip that module
    if not parts:
        raise DataError("cannot build the default text corpus (no stdlib sources found); pass a text file path")
    return "\n\n".join(parts).encode("utf-8")


class TextData:
    """Token ids for a GPT: a train and a val part, deterministic batches by step.

    TextData(bytes, block_size) is byte-level text (vocab 256) split by position (the last val_fraction is
    val); TextData.from_tokens(train, val, block_size, vocab_size) takes ids a tokenizer made (wikitext-2)."""

    def __init__(self, data: bytes, block_size: int, val_fraction: float = 0.1):
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # uint8: 1 byte per char in memory
        n_val = int(len(ids) * val_fraction)
        self._set(ids[: len(ids) - n_val], ids[len(ids) - n_val:], block_size, 256, unit="bytes")

    @classmethod
    def from_tokens(cls, train: torch.Tensor, val: torch.Tensor, block_size: int, vocab_size: int) -> "TextData":
        data = cls.__new__(cls)
        data._set(train, val, block_size, vocab_size, unit="tokens")
        return data

    def _set(self, train: torch.Tensor, val: torch.Tensor, block_size: int, vocab_size: int, unit: str) -> None:
        self.train, self.val = train, val
        self.block_size, self.vocab_size = block_size, vocab_size
        for name, part in (("train", self.train), ("val", self.val)):
            if len(part) <= block_size + 1:
                raise DataError(f"text {name} split has {len(part)} {unit}, needs more than block_size+1 = {block_size + 1}")

    @classmethod
    def load(cls, path: str | Path | None, block_size: int, val_fraction: float = 0.1) -> "TextData":
        if path is None:
            return cls(default_corpus(), block_size, val_fraction)
        p = Path(path).expanduser()
        try:
            return cls(p.read_bytes(), block_size, val_fraction)
        except OSError as e:
            raise DataError(f"cannot read text file {p}: {e.strerror}; pass an existing text file") from None

    @staticmethod
    def encode(s: str) -> torch.Tensor:
        return torch.tensor(list(s.encode("utf-8")), dtype=torch.long)

    @staticmethod
    def decode(ids: torch.Tensor) -> str:
        return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")

    def get_batch(self, step: int, batch_size: int, seed: int, *, shard: int = 0, num_shards: int = 1,
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 [B, T]; y is x shifted by one. Shard k draws windows from its own contiguous slice."""
        src = self.train if split == "train" else self.val
        T = self.block_size
        lo = len(src) * shard // num_shards
        hi = len(src) * (shard + 1) // num_shards
        if hi - lo <= T + 1:
            raise DataError(f"text shard {shard}/{num_shards} has {hi - lo} bytes, needs more than {T + 1}")
        starts = torch.from_numpy(_rng(seed, step, shard).randint(lo, hi - T - 1, size=batch_size))
        offs = starts[:, None] + torch.arange(T + 1)
        win = src[offs].long()
        return win[:, :-1], win[:, 1:]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 32, max_batches: int | None = 20) -> tuple[float, float]:
        """(mean loss, next-token accuracy) on non-overlapping val windows, the same every call
        (the first max_batches batches of them; None: all of them)."""
        was_training = model.training
        model.eval()
        T = self.block_size
        n_win = (len(self.val) - 1) // T
        if max_batches is not None:
            n_win = min(n_win, batch_size * max_batches)
        total_loss, correct, count = 0.0, 0, 0
        try:
            for b in range(0, n_win, batch_size):
                starts = torch.arange(b, min(b + batch_size, n_win)) * T
                win = self.val[starts[:, None] + torch.arange(T + 1)].long().to(next(model.parameters()).device)
                loss_sum, right = gpt_eval_sums(model, win[:, :-1], win[:, 1:])
                total_loss += loss_sum
                correct += right
                count += win[:, 1:].numel()
        finally:
            model.train(was_training)
        return total_loss / max(count, 1), correct / max(count, 1)
