"""Peak resident and anonymous memory of this process, sampled from /proc (Linux), and the
memory a device has free."""

from __future__ import annotations

import threading


def _status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def available_bytes(device: str = "cpu") -> int | None:
    """What the device can still give this process: MemAvailable (Linux) for the CPU, free
    memory for a CUDA device; None where it cannot be known."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # no /proc (not Linux) or an unexpected format: unknown
        return None
    return None


class MemoryMonitor:
    """Samples RssAnon every `interval` seconds; VmHWM gives the exact peak RSS at the end."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tensormerge-mem")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))

    def __enter__(self) -> "MemoryMonitor":
        self.peak_anon = _status().get("RssAnon", 0)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))

    @property
    def peak_rss(self) -> int:
        return _status().get("VmHWM", 0)
