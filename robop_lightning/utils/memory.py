"""Peak resident memory of a piece of code, in the same process (for benchmarks and recipes).

``ru_maxrss`` is a process-wide high-water mark: once an earlier step set it, later steps cannot
be told apart. :class:`PeakRSS` samples the resident set size (``/proc/self/statm``) on a
background thread while its block runs and reports the peak above the RSS at entry.
"""

from __future__ import annotations

import os
import threading

__all__ = ["PeakRSS", "available_host_bytes", "device_free_bytes", "rss_bytes"]


def rss_bytes() -> int | None:
    """The process's resident set size now (``None`` where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (``None`` where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_free_bytes(device) -> int | None:
    """Free memory of an accelerator (``torch.cuda.mem_get_info``); ``None`` for the CPU or where unknown."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except RuntimeError:
        return None


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.extra_mb``: the peak RSS above the entry RSS, in MiB.

    Example:
        >>> with PeakRSS(interval=0.001) as peak:
        ...     block = b"x" * (64 << 20)  # 64 MiB, written
        >>> peak.extra_mb is None or peak.extra_mb >= 0  # (a process may reuse pages it already holds)
        True
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = rss_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def extra_mb(self) -> float | None:
        if self.start is None or self.peak is None:
            return None
        return (self.peak - self.start) / 2**20
