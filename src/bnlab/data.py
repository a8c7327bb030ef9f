"""MNIST: find or download the four IDX files, verify them, parse them, split and batch them.

Where the files come from, first match wins:

1. ``data_dir`` passed in (the CLI's ``--data-dir``): must hold the files; nothing is downloaded.
2. ``$BNLAB_DATA_DIR``: the same, for offline machines and CI.
3. The cache, ``$XDG_CACHE_HOME/bnlab/mnist`` (default ``~/.cache/bnlab/mnist``): missing files
   are downloaded there, trying each mirror in turn.

Each file may be gzipped (``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``).
Every file is checked against its published MD5 before it is parsed, so corrupt or truncated data
is never trained on.

The split is the notebook's (TensorFlow's ``read_data_sets``): validation = the first 5,000
training images, train = the remaining 55,000, test = the 10,000 test images. Pixels are float32
in [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnlab.errors import DataError

ENV_DATA_DIR = "BNLAB_DATA_DIR"

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class IdxFile:
    name: str  # without ".gz"
    gz_md5: str
    raw_md5: str


TRAIN_IMAGES = IdxFile(
    "train-images-idx3-ubyte",
    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "6bbc9ace898e44ae57da46a324031adb",
)
TRAIN_LABELS = IdxFile(
    "train-labels-idx1-ubyte",
    "d53e105ee54ea40749a09fcbcd1e9432",
    "a25bea736e30d166cdddb491f175f624",
)
TEST_IMAGES = IdxFile(
    "t10k-images-idx3-ubyte",
    "9fb629c4189551a2d022fa330f9573f3",
    "2646ac647ad5339dbf082846283269ea",
)
TEST_LABELS = IdxFile(
    "t10k-labels-idx1-ubyte",
    "ec29112dd5afa0611ce80d1b7f02629c",
    "27ae3e4e09519cfbb04c329615203637",
)
MNIST_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

VALIDATION_SIZE = 5000

_IDX_DTYPES = {0x08: torch.uint8}  # MNIST only uses unsigned bytes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab" / "mnist"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _present(directory: Path, spec: IdxFile) -> Path | None:
    for candidate in (directory / f"{spec.name}.gz", directory / spec.name):
        if candidate.is_file():
            return candidate
    return None


def verify(path: Path, spec: IdxFile) -> None:
    """Raise DataError unless ``path`` has the published MD5 for its form (gzip or raw)."""
    expected = spec.gz_md5 if path.suffix == ".gz" else spec.raw_md5
    actual = _md5(path)
    if actual != expected:
        raise DataError(
            f"{path}: checksum mismatch (MD5 {actual}, expected {expected}); the file is corrupt "
            "or incomplete. Delete it and download it again (or copy an intact one)."
        )


def _download(spec: IdxFile, directory: Path, mirrors: Sequence[str], timeout: float) -> Path:
    target = directory / f"{spec.name}.gz"
    failures = []
    for mirror in mirrors:
        url = mirror + target.name
        print(f"bnlab: downloading {url}", file=sys.stderr)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out)
            if _md5(tmp) != spec.gz_md5:
                failures.append(f"{url}: checksum mismatch")
                continue
            tmp.replace(target)  # atomic: the cache never holds a half-written file
            return target
        except urllib.error.HTTPError as err:
            failures.append(f"{url}: HTTP {err.code} {err.reason}")
        except OSError as err:  # URLError and timeouts are OSErrors too
            failures.append(f"{url}: {getattr(err, 'reason', err)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {target.name} from any mirror ({'; '.join(failures)}). On an offline "
        f"machine copy the four MNIST files into a folder and pass --data-dir or set {ENV_DATA_DIR}."
    )


def fetch_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 60.0,
) -> dict[IdxFile, Path]:
    """Locate (or download into the cache) and verify the four MNIST files."""
    if data_dir is None and os.environ.get(ENV_DATA_DIR):
        data_dir, source = os.environ[ENV_DATA_DIR], f"${ENV_DATA_DIR}"
    else:
        source = "--data-dir"
    if data_dir is not None:
        directory, may_download = Path(data_dir).expanduser(), False
        if not directory.is_dir():
            raise DataError(
                f"MNIST folder {directory} (from {source}) does not exist; point it at a folder "
                "holding the four MNIST files, or leave it unset to download them into the cache."
            )
    else:
        directory, may_download = default_cache_dir(), True
        directory.mkdir(parents=True, exist_ok=True)

    paths = {spec: _present(directory, spec) for spec in MNIST_FILES}
    missing = [spec.name for spec, path in paths.items() if path is None]
    if missing and not may_download:
        raise DataError(
            f"MNIST files missing from {directory} (from {source}): "
            + ", ".join(f"{name}[.gz]" for name in missing)
            + ". Copy them there, or leave --data-dir and $BNLAB_DATA_DIR unset to download them."
        )
    for spec, path in paths.items():
        if path is None:
            paths[spec] = _download(spec, directory, mirrors, timeout)
        else:
            verify(path, spec)
    return paths  # type: ignore[return-value]


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Parse an IDX file (gzip or raw) into a uint8 tensor of the shape its header declares."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: not a complete gzip file ({err}); delete it and fetch it again.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex() or 'missing'}); "
            "is this an MNIST file?"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated or declares no dimensions.")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + _prod(shape)
    if len(raw) != expected:
        raise DataError(
            f"{path}: header declares shape {tuple(shape)} ({expected} bytes) but the file holds "
            f"{len(raw)} bytes; the file is truncated or corrupt."
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int | None) -> Split:
        """The first ``n`` samples (all for None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class MNIST:
    train: Split
    validation: Split
    test: Split

    def to(self, device: torch.device | str) -> MNIST:
        return MNIST(self.train.to(device), self.validation.to(device), self.test.to(device))


def _images(path: Path) -> torch.Tensor:
    images = read_idx(path)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{path}: expected images of shape (N, 28, 28), found {tuple(images.shape)}.")
    return images.unsqueeze(1).float().div_(255.0)


def _labels(path: Path, count: int) -> torch.Tensor:
    labels = read_idx(path)
    if labels.dim() != 1 or labels.shape[0] != count:
        raise DataError(f"{path}: expected {count} labels, found shape {tuple(labels.shape)}.")
    if int(labels.max()) > 9:
        raise DataError(f"{path}: labels must be digits 0-9, found {int(labels.max())}.")
    return labels.long()


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = VALIDATION_SIZE,
    mirrors: Sequence[str] = MIRRORS,
) -> MNIST:
    """Load MNIST split as the notebook does: validation = first ``validation_size`` train images."""
    paths = fetch_mnist(data_dir, mirrors=mirrors)
    train_images = _images(paths[TRAIN_IMAGES])
    train_labels = _labels(paths[TRAIN_LABELS], train_images.shape[0])
    test_images = _images(paths[TEST_IMAGES])
    test_labels = _labels(paths[TEST_LABELS], test_images.shape[0])
    if not 0 <= validation_size < train_images.shape[0]:
        raise DataError(f"validation_size must be in [0, {train_images.shape[0]}), got {validation_size}.")
    v = validation_size
    return MNIST(
        train=Split(train_images[v:], train_labels[v:]),
        validation=Split(train_images[:v], train_labels[:v]),
        test=Split(test_images, test_labels),
    )


class Batches(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Endless mini-batches, like TensorFlow's ``DataSet.next_batch(shuffle=True)``.

    The data is shuffled before the first epoch and again at each epoch boundary; a batch that
    crosses a boundary takes the rest of the old epoch followed by the start of the new one, so
    every example is seen exactly once per epoch. Seeded by ``seed`` alone (its own generator), so
    two runs with the same seed see the same batches in the same order.
    """

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs_completed = 0
        self._order = self._shuffle()
        self._position = 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(len(self.split), generator=self.generator).to(self.split.labels.device)

    def next_indices(self) -> torch.Tensor:
        n, start = len(self.split), self._position
        if start + self.batch_size <= n:
            self._position += self.batch_size
            return self._order[start : self._position]
        parts = [self._order[start:]]
        need = self.batch_size - (n - start)
        while need > 0:  # batch_size may exceed the split: take as many fresh epochs as needed
            self.epochs_completed += 1
            self._order = self._shuffle()
            take = min(need, n)
            parts.append(self._order[:take])
            need -= take
            self._position = take
        return torch.cat(parts)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.next_indices()
        return self.split.images[idx], self.split.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: with ``load_state_dict`` a resumed run draws exactly the batches it would have."""
        return {
            "generator": self.generator.get_state(),
            "order": self._order.cpu(),
            "position": self._position,
            "epochs_completed": self.epochs_completed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state["order"]
        if order.shape != (len(self.split),):
            raise ValueError(f"a batch order for {order.numel()} examples cannot resume a split of {len(self.split)}")
        self.generator.set_state(state["generator"])
        self._order = order.to(self.split.labels.device)
        self._position = int(state["position"])
        self.epochs_completed = int(state["epochs_completed"])


class ClassBatches(Batches):
    """Non-i.i.d. mini-batches: each from ``classes`` classes drawn at random, as Ioffe (2017) trained Batch
    Renormalization on batches of few classes.

    For each batch, ``classes`` distinct labels are drawn uniformly, and the batch takes ``batch_size`` samples
    split among them as evenly as they go (the first labels drawn get one more when it does not divide), the
    next ones of each label's own shuffled stream (reshuffled when it runs out, as ``Batches`` does per epoch),
    in a random order.
    Every sample of a label is seen once per pass over that label. Seeded by ``seed`` alone, and resumable
    (``state_dict``) as ``Batches`` is.
    """

    def __init__(self, split: Split, batch_size: int, seed: int, classes: int) -> None:
        # Batches' protocol (next_indices, state_dict), over per-label streams instead of one epoch order
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        labels = split.labels.cpu()
        present = torch.unique(labels).tolist()
        if not 1 <= classes <= len(present):
            raise ValueError(f"classes must be in [1, {len(present)}] (the labels present); got {classes}")
        self.split, self.batch_size, self.classes = split, batch_size, classes
        self.generator = torch.Generator().manual_seed(seed)
        self._members = [torch.nonzero(labels == c).flatten() for c in present]
        self._orders = [self._shuffled(label) for label in range(len(present))]
        self._positions = [0] * len(present)

    def _shuffled(self, label: int) -> torch.Tensor:
        members = self._members[label]
        return members[torch.randperm(len(members), generator=self.generator)]

    def _take(self, label: int, count: int) -> torch.Tensor:
        parts = []
        while count > 0:
            order, start = self._orders[label], self._positions[label]
            if start == len(order):  # this label's pass is over: a new order of it
                self._orders[label] = order = self._shuffled(label)
                self._positions[label] = start = 0
            take = min(count, len(order) - start)
            parts.append(order[start : start + take])
            self._positions[label] += take
            count -= take
        return torch.cat(parts)

    def next_indices(self) -> torch.Tensor:
        labels = torch.randperm(len(self._members), generator=self.generator)[: self.classes].tolist()
        share, extra = divmod(self.batch_size, self.classes)
        indices = torch.cat([self._take(label, share + (i < extra)) for i, label in enumerate(labels)])
        # in a random order, as a loader gives them: grouped by label, any split of the batch (ghost BN's
        # virtual batches, data-parallel shards) would hold one class
        return indices[torch.randperm(len(indices), generator=self.generator)].to(self.split.labels.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "orders": [order.clone() for order in self._orders],
            "positions": list(self._positions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        orders = state.get("orders")
        if orders is None or [len(o) for o in orders] != [len(m) for m in self._members]:
            raise ValueError("this batch order is not one of class batches over this split's labels")
        self.generator.set_state(state["generator"])
        self._orders = [order.clone() for order in orders]
        self._positions = [int(p) for p in state["positions"]]
