"""GPU clocks, power, temperature and utilisation sampled in a background thread through nvidia-ml-py.

A throttling GPU (power cap, heat) makes every other number in a report wrong, so the report shows these
next to the step times. Without a GPU or pynvml the sampler records nothing and says why.
"""
from __future__ import annotations

import statistics
import threading
import time

FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "gpu_util_pct")


class Telemetry:
    def __init__(self, interval_s: float = 0.1, device_index: int = 0):
        self.interval_s, self.device_index = interval_s, device_index
        self.samples: list[dict] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = None

    def __enter__(self) -> "Telemetry":
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:
            self.error = f"no GPU telemetry: {type(exc).__name__}: {exc}"
            return self
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="tgolf-telemetry", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> dict:
        nv, h = self._nvml, self._handle
        return {
            "t_s": time.perf_counter() - self._t0,
            "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "gpu_util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as exc:  # keep what was sampled; say why it stopped
                self.error = f"telemetry stopped: {type(exc).__name__}: {exc}"
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def summary(self) -> dict:
        out: dict = {"samples": len(self.samples), "interval_s": self.interval_s}
        if self.error:
            out["error"] = self.error
        for name in FIELDS:
            values = [s[name] for s in self.samples]
            if values:
                out[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        return out
