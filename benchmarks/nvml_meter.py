"""GPU power and SM clock from NVML, read through ctypes from the driver's libnvidia-ml (no Python
package needed, so it works on hosts that have only the driver).

On the H200s of the device pool every b = 128 decode shape runs at or near the GPU's power limit, for our
kernel and the peers alike (docs/perf-notes.md, rounds 14 and 15). There a step's time depends on the
energy it needs as much as on its cycles, so `bench_decode.py --energy` records both per implementation.

NVML's cumulative energy counter (millijoules since the driver loaded) is refreshed only about every
100 ms: on the pool's H200s the host saw it change 75-126 ms apart (median 100) under load. Reading it
around a 25 ms repetition therefore measures nothing. Between two refreshes, though, its difference is
exact, and a host that polls often sees each refresh within a poll of when it happened. EnergyWindow
takes the mean power from the first to the last refresh it sees while the GPU runs one workload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from dataclasses import dataclass

NVML_SUCCESS = 0
NVML_CLOCK_SM = 1  # nvmlClockType_t


class NvmlError(RuntimeError):
    pass


class NvmlMeter:
    """Energy counter and SM clock of one GPU, named by its UUID as torch reports it."""

    def __init__(self, gpu_uuid: str, lib: ctypes.CDLL | None = None):
        self._lib = lib if lib is not None else _load_library()
        self._check(self._lib.nvmlInit_v2(), "nvmlInit_v2")
        uuid = gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"
        self._handle = ctypes.c_void_p()
        self._check(
            self._lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(self._handle)),
            f"nvmlDeviceGetHandleByUUID({uuid})",
        )

    def energy_mj(self) -> int:
        """Energy the GPU has used since the driver loaded, in millijoules."""
        value = ctypes.c_ulonglong()
        self._check(self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value)),
                    "nvmlDeviceGetTotalEnergyConsumption")  # fmt: skip
        return int(value.value)

    def sm_clock_mhz(self) -> int:
        value = ctypes.c_uint()
        self._check(self._lib.nvmlDeviceGetClockInfo(self._handle, NVML_CLOCK_SM, ctypes.byref(value)),
                    "nvmlDeviceGetClockInfo")  # fmt: skip
        return int(value.value)

    def _check(self, status: int, what: str) -> None:
        if status != NVML_SUCCESS:
            raise NvmlError(f"{what} failed: NVML error {status} ({self._error_string(status)})")

    def _error_string(self, status: int) -> str:
        try:
            text = self._lib.nvmlErrorString(status)
        except Exception:  # the message is only decoration
            return "unknown"
        return text.decode() if isinstance(text, bytes) else str(text)


@dataclass(frozen=True)
class PowerReading:
    watts: float  # mean power between the first and the last counter refresh seen
    seconds: float  # host time between those two refreshes
    refreshes: int  # counter refreshes seen after the first poll
    sm_mhz: float  # median SM clock, read at each refresh


class EnergyWindow:
    """Mean power over the counter refreshes seen by successive poll() calls. The caller keeps the GPU
    busy with a single workload from before the first poll to after the last one."""

    MIN_SECONDS = 0.5  # at least ~5 refreshes: one refresh's timing jitter is then <~5% of the span

    def __init__(self, meter: NvmlMeter, clock=time.perf_counter):
        self._meter = meter
        self._clock = clock  # host time in seconds, monotonic
        self._value: int | None = None  # the counter at the previous poll
        self._first: tuple[float, int] | None = None  # (host time, counter) of the first refresh seen
        self._last: tuple[float, int] | None = None
        self._mhz: list[int] = []

    def poll(self) -> float:
        """Read the counter; returns how long the read took (a driver call of milliseconds), so that the caller can
        pace its polls. A refresh is dated at the middle of the read that first saw it."""
        before = self._clock()
        value = self._meter.energy_mj()
        after = self._clock()
        # The value of the first poll may be up to one refresh old: when it was taken is unknown.
        if self._value is not None and value != self._value:
            self._first = self._first or ((before + after) / 2, value)
            self._last = ((before + after) / 2, value)
            self._mhz.append(self._meter.sm_clock_mhz())
        self._value = value
        return after - before

    def reading(self) -> PowerReading | None:
        """None unless the refreshes seen span MIN_SECONDS."""
        if self._first is None or self._last[0] - self._first[0] < self.MIN_SECONDS:
            return None
        seconds = self._last[0] - self._first[0]
        watts = (self._last[1] - self._first[1]) / 1e3 / seconds
        return PowerReading(watts, seconds, len(self._mhz), statistics.median(self._mhz))


def _load_library() -> ctypes.CDLL:
    names = ["libnvidia-ml.so.1", ctypes.util.find_library("nvidia-ml")]
    errors = []
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        lib.nvmlErrorString.restype = ctypes.c_char_p
        return lib
    raise NvmlError("libnvidia-ml not found (" + "; ".join(errors or ["no candidate"]) + "); it ships with the driver")
