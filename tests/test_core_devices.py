"""Device handling of the TensorFlow-free core that needs no GPU to check:
CuPy arrays on a device other than the current one take that device's stream
and get their outputs allocated there (a stand-in CuPy module records what is
asked of it), and preload() says clearly why it cannot run without a driver."""

import sys
import types

import numpy as np
import pytest

from fused_masked_mae import _core, core


class _FakeCupy:
    """The parts of CuPy core.py uses: Device (a context manager that makes it
    current), cuda.get_current_stream() (per device) and empty() (on the
    current device)."""

    def __init__(self):
        self.current = 0
        fake = self

        class Device:
            def __init__(self, id):
                self.id = id

            def __enter__(self):
                self.previous = fake.current
                fake.current = self.id
                return self

            def __exit__(self, *exc):
                fake.current = self.previous

        class Stream:
            def __init__(self, device):
                self.ptr = 0x1000 + device

        class Array:
            def __init__(self, shape, dtype, device):
                self.shape, self.dtype, self.device = tuple(shape), np.dtype(dtype), Device(device)

            @property
            def __cuda_array_interface__(self):
                # As CuPy does: the stream is the *current* device's.
                return {"data": (0xdead0000 + 0x100 * self.device.id, False), "shape": self.shape,
                        "typestr": self.dtype.str, "strides": None, "version": 3,
                        "stream": fake.cuda.get_current_stream().ptr}

        Array.__module__ = "cupy._core.core"
        self.Device, self.Array = Device, Array
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: Stream(fake.current),
                                          Device=Device)

    def empty(self, shape, dtype=None):
        return self.Array(shape, dtype, self.current)


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _FakeCupy()
    module = types.ModuleType("cupy")
    module.cuda = fake.cuda
    module.empty = fake.empty
    monkeypatch.setitem(sys.modules, "cupy", module)
    return fake


def test_cupy_array_on_another_device_uses_that_devices_stream_and_memory(fake_cupy):
    fake_cupy.current = 0
    array = fake_cupy.Array((4, 7), np.float32, device=1)
    wrapped = core._DeviceArray(array, "y_pred")
    assert wrapped.device == ("cuda", 1)
    assert wrapped.stream == 0x1001  # device 1's stream, not the current device's 0x1000
    out = wrapped.empty((4,))
    assert out.device.id == 1 and out.dtype == np.float32 and out.shape == (4,)
    assert fake_cupy.current == 0  # the current device is left as it was


def test_cupy_array_on_the_current_device(fake_cupy):
    fake_cupy.current = 2
    wrapped = core._DeviceArray(fake_cupy.Array((3, 5), np.float64, device=2), "y_pred")
    assert wrapped.stream == 0x1002 and wrapped.empty((3,), "uint8").device.id == 2


@pytest.mark.skipif(not _core.WITH_CUDA, reason="_core was built without CUDA")
def test_preload_without_a_driver_says_why():
    if _core.cuda_driver()[0] == "ok":
        pytest.skip("a usable NVIDIA driver is present (tests/test_gpu_core.py covers preload)")
    with pytest.raises(RuntimeError, match="driver"):
        core.preload()
    with pytest.raises(RuntimeError, match="driver"):
        core.preload(0)
