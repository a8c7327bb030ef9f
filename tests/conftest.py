"""Shared fixtures. MNIST comes from $BNLAB_DATA_DIR (CI points it at the shared copy) or, on a
connected machine without it, is downloaded into the cache as the product would."""

from __future__ import annotations

import pytest
import torch

from bnlab import kernels
from bnlab.data import MNIST, Split, fetch_mnist, load_mnist


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Build the compiled kernels (once per machine) before any test, so no test's process pays or prints it."""
    kernels.available()


@pytest.fixture(scope="session")
def mnist_paths():
    return fetch_mnist()


@pytest.fixture(scope="session")
def mnist() -> MNIST:
    return load_mnist()


@pytest.fixture(scope="session")
def small_mnist(mnist: MNIST) -> MNIST:
    """A slice of the real data for quick training tests."""
    return MNIST(
        train=Split(mnist.train.images[:2048], mnist.train.labels[:2048]),
        validation=Split(mnist.validation.images[:256], mnist.validation.labels[:256]),
        test=Split(mnist.test.images[:256], mnist.test.labels[:256]),
    )


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests that change global torch state (threads, RNG) must not leak it into others."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
