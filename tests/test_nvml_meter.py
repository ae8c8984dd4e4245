"""benchmarks/nvml_meter.py against a stand-in for libnvidia-ml (CPU only)."""

import ctypes
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nvml_meter  # noqa: E402
from nvml_meter import NVML_CLOCK_SM, EnergyWindow, NvmlError, NvmlMeter  # noqa: E402


class FakeNvml:
    """The five NVML entry points the meter calls, writing through ctypes.byref like the C library."""

    def __init__(self, energy_mj=123_456, sm_mhz=1755, uuid="GPU-1234", fail=None):
        self.energy, self.mhz, self.uuid, self.fail = energy_mj, sm_mhz, uuid, fail
        self.clock_types = []

    def _status(self, name):
        return 999 if self.fail == name else 0

    def nvmlInit_v2(self):
        return self._status("init")

    def nvmlDeviceGetHandleByUUID(self, uuid, handle_ref):
        if uuid.decode() != self.uuid:
            return 13  # NVML_ERROR_NOT_FOUND
        handle_ref._obj.value = 42
        return self._status("handle")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle, value_ref):
        assert handle.value == 42
        value_ref._obj.value = self.energy
        return self._status("energy")

    def nvmlDeviceGetClockInfo(self, handle, clock_type, value_ref):
        self.clock_types.append(clock_type)
        value_ref._obj.value = self.mhz
        return self._status("clock")

    def nvmlErrorString(self, status):
        return b"Not Found" if status == 13 else b"Unknown Error"


def test_reads_energy_and_sm_clock():
    lib = FakeNvml()
    meter = NvmlMeter("1234", lib=lib)  # torch's UUID has no "GPU-" prefix; NVML's does
    assert meter.energy_mj() == 123_456
    lib.energy += 500
    assert meter.energy_mj() == 123_956
    assert meter.sm_clock_mhz() == 1755 and lib.clock_types == [NVML_CLOCK_SM]


@pytest.mark.parametrize("fail,what", [("init", "nvmlInit_v2"), ("energy", "nvmlDeviceGetTotalEnergyConsumption")])
def test_nvml_errors_name_the_call(fail, what):
    lib = FakeNvml(fail=fail)
    with pytest.raises(NvmlError, match=what):
        NvmlMeter("GPU-1234", lib=lib).energy_mj()


def test_unknown_gpu_is_an_error():
    with pytest.raises(NvmlError, match=r"GPU-5678.*Not Found"):
        NvmlMeter("5678", lib=FakeNvml())


def test_missing_library_says_where_it_comes_from(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(NvmlError, match="libnvidia-ml not found.*ships with the driver"):
        nvml_meter._load_library()


class RefreshingCounter(FakeNvml):
    """An energy counter that, like NVML's, changes only at refreshes: every `period` seconds of the
    fake clock it adds what `watts` used since the previous refresh."""

    def __init__(self, watts, period=0.1, **kwargs):
        super().__init__(energy_mj=5_000_000, **kwargs)
        self.watts, self.period, self.now, self.refreshed_at = watts, period, 0.0, 0.0

    def advance(self, t):
        self.now = t
        while self.now >= self.refreshed_at + self.period:
            self.refreshed_at += self.period
            self.energy += round(self.watts * self.period * 1e3)


def poll_for(lib, seconds, step=0.001, start=0.0, read_s=0.0002):
    """An EnergyWindow on a fake clock: a poll every `step`, each read taking `read_s`, during which
    the counter may refresh."""
    clock = {"t": start}

    def now():
        return clock["t"]

    window = EnergyWindow(NvmlMeter("1234", lib=lib), clock=now)
    real_read = lib.nvmlDeviceGetTotalEnergyConsumption

    def timed_read(handle, value_ref):
        clock["t"] += read_s / 2
        lib.advance(clock["t"])
        status = real_read(handle, value_ref)
        clock["t"] += read_s / 2
        return status

    lib.nvmlDeviceGetTotalEnergyConsumption = timed_read
    took = []
    while clock["t"] < start + seconds:
        took.append(window.poll())
        clock["t"] += step
    return window, took


def test_energy_window_power_from_counter_refreshes():
    lib = RefreshingCounter(watts=650.0)
    window, took = poll_for(lib, 1.55, start=0.05)  # starts mid-refresh: the first poll's value is not one
    assert took and all(t == pytest.approx(0.0002) for t in took)
    reading = window.reading()
    assert reading is not None
    assert reading.refreshes == 15 and reading.seconds == pytest.approx(1.4, abs=2e-3)
    assert reading.watts == pytest.approx(650.0, rel=2e-3)
    assert reading.sm_mhz == 1755


def test_energy_window_refuses_a_short_span():
    window, _ = poll_for(RefreshingCounter(watts=650.0), 0.45)  # refreshes at 0.1 ... 0.4: 0.3 s apart
    assert window.reading() is None


def test_energy_window_needs_a_refresh_after_the_first_poll():
    window = EnergyWindow(NvmlMeter("1234", lib=FakeNvml()))  # a counter that never moves
    for _ in range(10):
        window.poll()
    assert window.reading() is None
