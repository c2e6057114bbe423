"""Interleaved timing: repeats, medians and spread, and the machine they ran on.

Each benchmark runs the candidates in turn within every repeat (ours, reference, ours, ...), so
that slow drifts of the machine (heat, other processes) hit both alike. It reports the median
of each candidate's times, their spread (min and max relative to the median) and the ratio
of medians.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    name: str
    median_s: float
    min_s: float
    max_s: float
    times_s: list[float]

    @property
    def spread(self) -> str:
        return f"-{1 - self.min_s / self.median_s:.1%}/+{self.max_s / self.median_s - 1:.1%}"

    def as_dict(self) -> dict:
        """The fields and the spread, for JSON and for printing."""
        return asdict(self) | {"spread": self.spread}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    device: torch.device,
) -> dict[str, Timing]:
    """Time each candidate ``repeats`` times, interleaved, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: Timing(name, statistics.median(ts), min(ts), max(ts), ts)
        for name, ts in times.items()
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def environment() -> dict[str, str]:
    """Machine and versions, to print beside the figures."""
    import diffusers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": _cpu_name(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
