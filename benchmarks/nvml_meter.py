"""GPU energy and SM clock from NVML, read through ctypes from the driver's libnvidia-ml (no Python
package needed, so it works on hosts that have only the driver).

On the H200s of the device pool every b = 128 decode shape runs at the GPU's power limit, for our
kernel and the peers alike, and the SM clock drops below its maximum there (docs/perf-notes.md, round
14). There a step's time depends on the energy it needs as much as on its cycles, so
`bench_decode.py --energy` records both per implementation: the energy per step from NVML's
cumulative energy counter (millijoules since the driver loaded) around each timed repetition, and the
SM clock while the repetition runs. NVML does not state how often the energy counter updates, so one
repetition's reading is only as exact as that interval allows; bench_decode reports medians over
repetitions of --target-ms each.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
