"""Every Triton launch runs with the tensors' GPU current, not whichever GPU is current.

No GPU is needed: the launchers run on fake tensors placed on cuda:1 while "cuda:0" is current.
``torch.cuda.device`` is replaced by a recorder of the current device, and the kernel launch by a
recorder of the device current at that moment (instead of a launch). Without the guard in
``kernels/_device.py`` every launch would see cuda:0.
"""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dcal.kernels._device as dev
from dcal.kernels import na2d as K_na2d
from dcal.kernels import pwca as K_pwca
from dcal.kernels import rollout as K_rollout


class _Recorder:
    def __init__(self):
        self.current = [0]  # the process's current device: cuda:0
        self.launches = []

    def device_cls(self):
        rec = self

        class FakeDevice:
            def __init__(self, device):
                self.idx = torch.device(device).index if not isinstance(device, int) else device

            def __enter__(self):
                rec.current.append(self.idx)

            def __exit__(self, *exc):
                rec.current.pop()
                return False

        return FakeDevice

    def wrap(self, kernel):
        rec = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.launches.append((getattr(kernel, "__name__", repr(kernel)), rec.current[-1]))

                return run

        return Launch()


@pytest.fixture
def rec(monkeypatch):
    r = _Recorder()
    monkeypatch.setattr(dev, "_cuda_available", lambda: True)  # as on a machine with GPUs
    monkeypatch.setattr(torch.cuda, "device", r.device_cls())
    monkeypatch.setattr(K_pwca, "wrap_triton", r.wrap)
    monkeypatch.setattr(torch.library, "wrap_triton", r.wrap)  # na2d imports it at launch
    return r


def _fake(*shape, device="cuda:1", dtype=torch.float16):
    return torch.randn(*shape, device=device, dtype=dtype)


def _assert_all_on(rec, idx, at_least):
    assert len(rec.launches) >= at_least, rec.launches
    wrong = [(name, d) for name, d in rec.launches if d != idx]
    assert not wrong, f"launched with cuda:{wrong[0][1]} current for cuda:{idx} tensors: {wrong}"
    assert rec.current == [0], "the guard must restore the previous device"


def test_pwca_launches_on_the_tensors_device(rec):
    with FakeTensorMode():
        q, k1, v1, k2, v2 = (_fake(2, 3, 17, 32) for _ in range(5))
        out, lse = K_pwca.pwca_fwd(q, k1, v1, k2, v2, 0.2)
        K_pwca.pwca_bwd(torch.randn_like(out), None, q, k1, v1, k2, v2, out, lse, 0.2)
    _assert_all_on(rec, 1, 1 + 1 + 2 + 1)  # fwd; preprocess, dkdv x 2, dq


@pytest.mark.parametrize("rpb", [False, True])
def test_na2d_launches_on_the_tensors_device(rec, rpb):
    with FakeTensorMode():
        q, k, v = (_fake(1, 2, 9, 11, 32) for _ in range(3))
        bias = _fake(2, 5, 5, dtype=torch.float32) if rpb else None
        out, lse = K_na2d.na2d_fwd(q, k, v, bias, 3, "clamp", 0.2)
        K_na2d.na2d_bwd(torch.randn_like(out), q, k, v, bias, out, lse, 3, "clamp", 0.2)
    _assert_all_on(rec, 1, 1 + 3)  # fwd; delta, dq, dkdv


@pytest.mark.parametrize("with_lse", [False, True])
def test_rollout_launches_on_the_tensors_device(rec, with_lse):
    with FakeTensorMode():
        qs = [_fake(2, 3, 13, 32) for _ in range(3)]
        ks = [_fake(2, 3, 13, 32) for _ in range(3)]
        lses = [_fake(2, 3, 13, dtype=torch.float32) for _ in range(3)] if with_lse else None
        K_rollout.rollout_fwd(qs, ks, lses, 0.2, 0.5, wrap=rec.wrap)
    _assert_all_on(rec, 1, 3 if with_lse else 6)


def test_guard_is_a_no_op_without_a_gpu_or_for_cpu_tensors(monkeypatch):
    assert isinstance(dev.on_device_of(torch.zeros(1)), contextlib.nullcontext)
    monkeypatch.setattr(dev, "_cuda_available", lambda: False)
    with FakeTensorMode():
        t = _fake(1)
    assert isinstance(dev.on_device_of(t), contextlib.nullcontext)
