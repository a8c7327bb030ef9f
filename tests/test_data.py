"""MNIST: split, checksums, clear errors for missing/corrupt/truncated/malformed files, downloads."""

from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from bnlab import data
from bnlab.errors import DataError


@pytest.fixture
def mnist_copy(tmp_path, mnist_paths) -> Path:
    """A writable copy of the four files, to damage."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for path in mnist_paths.values():
        shutil.copy(path, folder / path.name)
        (folder / path.name).chmod(0o644)
    return folder


def test_split_sizes_types_and_order(mnist, mnist_paths):
    assert (len(mnist.train), len(mnist.validation), len(mnist.test)) == (55000, 5000, 10000)
    for split in (mnist.train, mnist.validation, mnist.test):
        assert split.images.dtype == torch.float32 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        assert split.images.min() >= 0.0 and split.images.max() == 1.0
        assert set(split.labels.unique().tolist()) == set(range(10))
    raw_labels = data.read_idx(mnist_paths[data.TRAIN_LABELS])
    assert torch.equal(mnist.validation.labels, raw_labels[:5000].long())  # validation = first 5,000
    assert torch.equal(mnist.train.labels, raw_labels[5000:].long())
    assert mnist.train.labels[:5].tolist() != mnist.validation.labels[:5].tolist()


def test_shared_files_pass_their_checksums(mnist_paths):
    for spec, path in mnist_paths.items():
        data.verify(path, spec)


def test_raw_uncompressed_files_are_accepted(tmp_path, mnist_paths):
    for spec, path in mnist_paths.items():
        with gzip.open(path) as src, open(tmp_path / spec.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    loaded = data.load_mnist(tmp_path)
    assert len(loaded.train) == 55000


def test_missing_files_are_named_with_the_fix(mnist_copy):
    (mnist_copy / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing .*t10k-labels-idx1-ubyte\[\.gz\].*--data-dir"):
        data.load_mnist(mnist_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")


def test_corrupted_file_fails_its_checksum(mnist_copy):
    path = mnist_copy / "train-labels-idx1-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: checksum mismatch"):
        data.load_mnist(mnist_copy)


def test_truncated_gzip_is_caught_before_training(mnist_copy):
    path = mnist_copy / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: checksum mismatch"):
        data.load_mnist(mnist_copy)
    with pytest.raises(DataError, match="not a complete gzip file"):
        data.read_idx(path)  # the parser alone also refuses it


def _idx(magic: bytes, dims: list[int], payload: bytes) -> bytes:
    return magic + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def test_idx_parser_checks_magic_and_shape(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(_idx(b"\x00\x00\x08\x03", [2, 2, 3], bytes(range(12))))
    assert data.read_idx(good).tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(_idx(b"\x50\x4b\x03\x04", [2], bytes(2)))
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(bad_magic)
    wrong_type = tmp_path / "floats"
    wrong_type.write_bytes(_idx(b"\x00\x00\x0d\x01", [1], bytes(4)))
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes"):
        data.read_idx(wrong_type)
    short = tmp_path / "short"
    short.write_bytes(_idx(b"\x00\x00\x08\x03", [2, 28, 28], bytes(100)))
    with pytest.raises(DataError, match=r"declares shape \(2, 28, 28\).*truncated"):
        data.read_idx(short)


def test_images_of_the_wrong_shape_are_refused(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(_idx(b"\x00\x00\x08\x03", [2, 32, 32], bytes(2 * 32 * 32)))
    with pytest.raises(DataError, match=r"expected images of shape \(N, 28, 28\)"):
        data._images(path)


def test_env_var_points_at_a_folder(monkeypatch, mnist_copy, tmp_path):
    monkeypatch.setenv(data.ENV_DATA_DIR, str(mnist_copy))
    assert data.fetch_mnist()[data.TEST_LABELS].parent == mnist_copy
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"from \$BNLAB_DATA_DIR"):
        data.fetch_mnist()
    assert data.fetch_mnist(mnist_copy)[data.TEST_LABELS].parent == mnist_copy  # the flag wins


class _Server:
    """A local HTTP server with two mirrors: /broken/ answers 404, /good/ serves the files."""

    def __init__(self, root: Path) -> None:
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_tries_the_next_mirror_verifies_and_caches(tmp_path, monkeypatch, mnist_paths):
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    (root / "corrupt").mkdir()
    for path in mnist_paths.values():
        shutil.copy(path, root / "good" / path.name)
        (root / "corrupt" / path.name).write_bytes(b"not mnist")
    server = _Server(root)
    try:
        monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        mirrors = [server.url + "broken/", server.url + "corrupt/", server.url + "good/"]
        paths = data.fetch_mnist(mirrors=mirrors)
        cache = tmp_path / "cache" / "bnlab" / "mnist"
        assert all(p.parent == cache for p in paths.values())
        assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in mnist_paths.values())
        # cached: a second call downloads nothing, even with no working mirror
        assert data.fetch_mnist(mirrors=[server.url + "broken/"]) == paths
        (cache / "train-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(DataError, match=r"could not download train-labels-idx1-ubyte\.gz.*404.*checksum"):
            data.fetch_mnist(mirrors=[server.url + "broken/", server.url + "corrupt/"])
        assert not any(p.name.endswith(".part") for p in cache.iterdir())  # no half-written files left
    finally:
        server.close()


def test_batches_are_seeded_reshuffled_and_cover_each_epoch():
    split = data.Split(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    a, b = data.Batches(split, 4, seed=0), data.Batches(split, 4, seed=0)
    first = [next(a)[1].tolist() for _ in range(5)]
    assert first == [next(b)[1].tolist() for _ in range(5)]
    assert first != [next(data.Batches(split, 4, seed=1))[1].tolist() for _ in range(5)]
    flat = [
        label for batch in first for label in batch
    ]  # 20 labels = exactly two epochs, the third batch crossing the boundary
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled for the second epoch
    big = data.Batches(split, 25, seed=0)  # larger than the split: spans several epochs
    labels = next(big)[1]
    assert labels.shape == (25,) and sorted(labels[:10].tolist()) == list(range(10))
