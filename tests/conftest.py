"""Test configuration.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
any kernel module is imported (triton picks the interpreter when a kernel is decorated), so it is
set here, before the test modules are collected.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    """Every test leaves torch's intra-op thread count as it found it (in-process training runs
    set ``train.threads``; kernel tests pin one thread)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Tiny shapes: with one thread no time is lost in OpenMP barriers on a loaded machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` for a whole module)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def nan_empty():
    """Fill floating ``torch.empty``/``empty_like``/``empty_permuted``/``new_empty`` results with
    NaN, so a kernel that skips a write to its output fails the test instead of passing on stale
    zeros (:func:`dcal.testing.poison_allocations`, which ``dcal.check`` uses too)."""
    from dcal.testing import poison_allocations

    with poison_allocations():
        yield


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            # the marker, not `"cuda" in item.keywords`: keywords hold every parent node's name,
            # so a checkout in a directory named "cuda" would skip the whole suite
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
