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
def nan_empty(monkeypatch):
    """Fill floating ``torch.empty``/``empty_like``/``empty_permuted``/``new_empty`` results with
    NaN, so a kernel that skips a write to its output fails the test instead of passing on stale
    zeros (``empty_permuted``: outputs laid out in their input's dim order)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_empty_permuted = torch.empty_permuted
    real_new_empty = torch.Tensor.new_empty

    def poison(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty_permuted", lambda *a, **k: poison(real_empty_permuted(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            # the marker, not `"cuda" in item.keywords`: keywords hold every parent node's name,
            # so a checkout in a directory named "cuda" would skip the whole suite
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
