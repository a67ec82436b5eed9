"""WikiText-2 offline and by download, and the tokenizers: GPT-2's BPE offline, else a trained one."""

from __future__ import annotations

import http.server
import io
import threading
import zipfile

import pytest

from smolcluster.common.errors import DataError
from smolcluster.core.training import tokenizer as tk
from smolcluster.core.training.wikitext import download_wikitext, load_wikitext


def test_offline_folder_without_train_trains_on_valid_and_evaluates_on_test(wikitext_dir):
    wiki = load_wikitext(str(wikitext_dir), download=False)
    assert (wiki.train_split, wiki.eval_split) == ("valid", "test")
    assert wiki.train_text == (wikitext_dir / "valid.txt").read_text() and wiki.eval_text == (wikitext_dir / "test.txt").read_text()
    assert "training on valid, evaluating on test" in wiki.note() and str(wikitext_dir) in wiki.note()


def test_env_var_names_the_folder(wikitext_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLCLUSTER_TEXT_DIR", str(wikitext_dir))
    assert load_wikitext(None, download=False, cache_dir=tmp_path / "cache").folder == wikitext_dir


def test_a_folder_with_train_trains_on_train(tmp_path):
    for name, text in (("wiki.train.raw", "a b c\n" * 50), ("wiki.valid.raw", "d e\n" * 30), ("wiki.test.raw", "f\n")):
        (tmp_path / name).write_text(text)
    wiki = load_wikitext(str(tmp_path), download=False)
    assert (wiki.train_split, wiki.eval_split, wiki.train_text) == ("train", "valid", "a b c\n" * 50)


def test_a_named_folder_without_the_data_is_an_error_not_a_download(tmp_path):
    (tmp_path / "valid.txt").write_text("only valid\n")
    called = []
    with pytest.raises(DataError) as e:
        load_wikitext(str(tmp_path), cache_dir=tmp_path / "cache", downloader=lambda d: called.append(d))
    assert not called
    msg = str(e.value)
    assert str(tmp_path) in msg and "holds valid" in msg and "SMOLCLUSTER_TEXT_DIR" in msg and "data.dir" in msg


def _zip_of_wikitext() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{split}.raw", f" = {split} = \n" + f"the {split} text .\n" * 40)
    return buf.getvalue()


@pytest.fixture
def http_zip():
    """A real HTTP server on loopback serving wikitext-2-raw-v1.zip (and 404 for anything else)."""
    body = _zip_of_wikitext()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.endswith("wikitext-2-raw-v1.zip"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_download_fills_the_cache_once(http_zip, tmp_path, monkeypatch):
    base, hits = http_zip
    monkeypatch.delenv("SMOLCLUSTER_TEXT_DIR", raising=False)
    cache = tmp_path / "cache"
    urls = (f"{base}/missing.zip", f"{base}/wikitext-2-raw-v1.zip")  # the first mirror fails, the second answers
    fetch = lambda dest: download_wikitext(dest, urls=urls, timeout=5, parquet=False)  # noqa: E731
    wiki = load_wikitext(None, cache_dir=cache, downloader=fetch)
    assert (wiki.train_split, wiki.eval_split) == ("train", "valid") and "the train text" in wiki.train_text
    assert sorted(p.name for p in cache.iterdir()) == ["wiki.test.raw", "wiki.train.raw", "wiki.valid.raw"]
    assert len(hits) == 2
    load_wikitext(None, cache_dir=cache, downloader=fetch)  # cached: no second download
    assert len(hits) == 2


def test_download_failure_names_every_source(tmp_path, http_zip, monkeypatch):
    base, _ = http_zip
    monkeypatch.delenv("SMOLCLUSTER_TEXT_DIR", raising=False)
    with pytest.raises(DataError) as e:
        load_wikitext(None, cache_dir=tmp_path / "c",
                      downloader=lambda d: download_wikitext(d, urls=(f"{base}/gone.zip",), timeout=5, parquet=False))
    assert "gone.zip" in str(e.value) and "404" in str(e.value) and "SMOLCLUSTER_TEXT_DIR" in str(e.value)


def test_gpt2_bpe_is_available_offline():
    tok = tk.load_tokenizer("openai-community/gpt2", train_text="", corpus="-", bpe_vocab_size=512, download=False)
    assert (tok.info.name, tok.vocab_size) == ("gpt2-bpe", 50257)
    assert tok.encode("Hello world").tolist() == [15496, 995]  # GPT-2's ids
    assert tok.decode(tok.encode(" = Homarus gammarus = \n")) == " = Homarus gammarus = \n"


def test_gpt2_files_with_a_wrong_hash_are_not_used(tmp_path):
    (tmp_path / "encoder.json").write_text('{"a": 0}')
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    tok = tk.load_tokenizer("gpt2", train_text="some text to train on\n" * 50, corpus="the test text", bpe_vocab_size=300,
                            data_dir=tmp_path, download=False, gpt2_places=lambda: [tmp_path])
    assert tok.info.name.startswith("bpe-") and "GPT-2's tokenizer files are not on this machine" in tok.info.note


def test_without_gpt2_files_a_bpe_is_trained_deterministically_and_cached(tmp_path, wikitext_dir):
    text = (wikitext_dir / "valid.txt").read_text()[:200_000]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    kw = dict(train_text=text, corpus="wikitext-2 valid", bpe_vocab_size=600, download=False, gpt2_places=lambda: [])
    a = tk.load_tokenizer("openai-community/gpt2", data_dir=a_dir, **kw)
    b = tk.load_tokenizer("openai-community/gpt2", data_dir=b_dir, **kw)
    assert a.info.name == "bpe-600" and a.vocab_size == 600 and "trained on wikitext-2 valid" in a.info.source
    assert "instead" in a.info.note
    sample = text[:5000]
    assert a.encode(sample).tolist() == b.encode(sample).tolist()  # trained twice, the same tokenizer
    assert len(a.encode(sample)) < len(sample.encode()) / 2  # it compresses: a real BPE, not bytes
    assert a.decode(a.encode(sample)) == sample
    cached = list(a_dir.glob("bpe-600-*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    tk.load_tokenizer("bpe", data_dir=a_dir, **kw)
    assert cached[0].stat().st_mtime_ns == stamp  # read back, not trained again


def test_byte_tokenizer_and_a_tokenizer_file(tmp_path):
    byte = tk.load_tokenizer("byte", train_text="", corpus="-", bpe_vocab_size=512)
    assert byte.vocab_size == 256 and byte.encode("hé").tolist() == list("hé".encode())
    trained = tk.train_bpe("hello world, hello there\n" * 30, 280)
    (tmp_path / "tokenizer.json").write_text(trained.to_str())
    from_file = tk.load_tokenizer(str(tmp_path / "tokenizer.json"), train_text="", corpus="-", bpe_vocab_size=512)
    assert from_file.vocab_size == trained.get_vocab_size() and from_file.info.source == str(tmp_path / "tokenizer.json")
    with pytest.raises(DataError) as e:
        tk.load_tokenizer("no/such/tokenizer", train_text="", corpus="-", bpe_vocab_size=512)
    assert "openai-community/gpt2" in str(e.value) and "bpe" in str(e.value)
