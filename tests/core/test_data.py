"""MNIST loading, sharding and deterministic batches."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from smolcluster.core.training.data import (DATA_DIR_ENV, ImageSet, ShardLoader, TextData, evaluate, load_mnist,
                              resolve_data_dir, shard_indices)
from smolcluster.common.errors import DataError


@pytest.fixture(scope="module")
def train(mnist_dir: Path) -> ImageSet:
    return load_mnist("train", mnist_dir, download=False)


def _no_network(dest: Path, split: str) -> None:
    raise DataError("offline (test)")


def test_mnist_loads_gz_as_uint8(mnist_dir: Path, train: ImageSet) -> None:
    test = load_mnist("test", mnist_dir, download=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the famous first MNIST labels


def test_mnist_raw_idx_same_as_gz(mnist_dir: Path, tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(mnist_dir / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw = load_mnist("test", tmp_path, download=False)
    gz = load_mnist("test", mnist_dir, download=False)
    assert torch.equal(raw.images, gz.images) and torch.equal(raw.labels, gz.labels)


def _copy_test_split(mnist_dir: Path, dest: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, dest / name)


def test_truncated_file_gives_helpful_error(mnist_dir: Path, tmp_path: Path) -> None:
    _copy_test_split(mnist_dir, tmp_path)
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(16 + 1000)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(head)  # raw, cut short
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated.*download it again"):
        load_mnist("test", tmp_path, download=False)


def test_wrong_magic_and_garbage_gz(mnist_dir: Path, tmp_path: Path) -> None:
    _copy_test_split(mnist_dir, tmp_path)
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")  # labels posing as images
    with pytest.raises(DataError, match="bad magic number 0x00000801, expected 0x00000803"):
        load_mnist("test", tmp_path, download=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot"):
        load_mnist("test", tmp_path, download=False)


def test_missing_offline_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache lives under HOME
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_mnist("train", missing, downloader=_no_network)
    msg = str(e.value)
    assert str(missing) in msg
    assert str(tmp_path / "home" / ".cache" / "smolcluster" / "mnist") in msg
    assert "offline (test)" in msg and "SMOLCLUSTER_DATA_DIR" in msg and "nn_config.yaml" in msg


def test_download_path_fills_cache(mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing local: the downloader runs once into the cache, then the cache is used without it."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = []

    def fake_download(dest: Path, split: str) -> None:  # stands in for the network, copies real files
        calls.append(split)
        dest.mkdir(parents=True)
        _copy_test_split(mnist_dir, dest)

    cache = tmp_path / "cache"
    assert len(load_mnist("test", None, cache_dir=cache, downloader=fake_download)) == 10000
    assert len(load_mnist("test", None, cache_dir=cache, downloader=_no_network)) == 10000
    assert calls == ["test"]


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/explicit") == Path("/explicit")  # config wins over the env


def test_shards_disjoint_cover_and_seeded() -> None:
    n, k = 60000, 3
    shards = [shard_indices(n, k, s, seed=42) for s in range(k)]
    assert sum(len(s) for s in shards) == n
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(n))
    assert all(abs(len(s) - n // k) <= 1 for s in shards)
    assert torch.equal(shard_indices(n, k, 1, seed=42), shards[1])
    assert not torch.equal(shard_indices(n, k, 1, seed=43), shards[1])
    # frozen stream: these values must not change across numpy/torch versions or machines
    # (numpy's legacy RandomState), so independently started nodes on different machines agree
    assert shard_indices(10, 2, 0, seed=0).tolist() == [2, 5, 7, 8, 9]
    assert shard_indices(10, 2, 1, seed=0).tolist() == [0, 1, 3, 4, 6]
    with pytest.raises(DataError):
        shard_indices(n, k, k, seed=42)


def test_shard_loader_deterministic_and_resumable(train: ImageSet) -> None:
    idx = shard_indices(len(train), 4, 2, seed=1)
    a = ShardLoader(train, idx, batch_size=64, seed=7)
    assert a.steps_per_epoch == len(idx) // 64
    seq = [a.batch_at(s) for s in range(3)]
    late = a.batch_at(a.steps_per_epoch + 1)  # next epoch
    b = ShardLoader(train, idx, batch_size=64, seed=7)  # "resumed" process starts mid-run
    assert torch.equal(b.batch_at(a.steps_per_epoch + 1)[0], late[0])
    for s in (2, 0, 1):
        x, y = b.batch_at(s)
        assert torch.equal(x, seq[s][0]) and torch.equal(y, seq[s][1])
    x, y = seq[0]
    assert x.shape == (64, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5  # normalised
    # another epoch is another order; another seed another order
    assert not torch.equal(a.batch_at(0)[1], a.batch_at(a.steps_per_epoch)[1])
    assert not torch.equal(a.batch_at(0)[1], ShardLoader(train, idx, 64, seed=8).batch_at(0)[1])


def test_epoch_visits_each_shard_sample_once() -> None:
    # synthetic set whose pixels spell the sample index, so a batch tells which samples it holds
    n = 1000
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    data = ImageSet(images=images, labels=torch.zeros(n, dtype=torch.long))
    idx = shard_indices(n, 3, 0, seed=5)
    loader = ShardLoader(data, idx, batch_size=10, seed=3)

    def ids(step: int) -> list[int]:
        px = (loader.batch_at(step)[0][:, :2] * 0.3081 + 0.1307) * 255
        return (px[:, 0].round() + 256 * px[:, 1].round()).long().tolist()

    epoch = [i for s in range(loader.steps_per_epoch) for i in ids(s)]
    assert len(epoch) == len(set(epoch)) == loader.steps_per_epoch * 10  # drop last: no repeats
    assert set(epoch) <= set(idx.tolist())
    assert len(set(idx.tolist()) - set(epoch)) == len(idx) % 10


def test_shard_smaller_than_batch_is_clear(train: ImageSet) -> None:
    with pytest.raises(DataError, match="fewer than one batch"):
        ShardLoader(train, torch.arange(10), batch_size=32, seed=0)


def test_evaluate_untrained_is_chance(mnist_dir: Path) -> None:
    from smolcluster.core.training.config import ModelConfig
    from smolcluster.core.training.models import build_model

    test = load_mnist("test", mnist_dir, download=False)
    model = build_model(ModelConfig(), seed=0)
    loss, acc = evaluate(model, test)
    assert 2.0 < loss < 2.6 and 0.0 <= acc < 0.3
    assert model.training  # mode restored


def test_text_data_batches(tmp_path: Path) -> None:
    td = TextData.load(None, block_size=16)
    assert len(td.train) > 10000
    x, y = td.get_batch(3, 8, seed=1)
    assert x.shape == (8, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(td.get_batch(3, 8, seed=1)[0], x) and not torch.equal(td.get_batch(4, 8, seed=1)[0], x)
    (tmp_path / "t.txt").write_text("hello world " * 50)
    small = TextData.load(tmp_path / "t.txt", block_size=8)
    assert TextData.decode(small.get_batch(0, 1, seed=0)[0][0]) in ("hello world " * 3)
    with pytest.raises(DataError, match="cannot read text file"):
        TextData.load(tmp_path / "absent.txt", block_size=8)
