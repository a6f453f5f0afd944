"""What every benchmark measures the same way: this process's memory (Linux /proc) and step times."""

from __future__ import annotations

import time
from collections.abc import Callable


def status(key: str) -> int:
    """A /proc/self/status figure in bytes: "VmRSS:" (now) or "VmHWM:" (peak since start or reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start a new peak: VmHWM becomes the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed_steps(step: Callable[[], float], steps: int) -> dict:
    """One warm-up call of `step` (allocator, thread pool, decode tables), then `steps` timed calls.
    Returns the fastest step, every time, the warm-up's result and the peaks with and without it."""
    first = step()
    warm_peak = status("VmHWM:")
    reset_peak()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_peak = status("VmHWM:")
    return {"step_s": min(times), "step_times": times, "first_loss": first,
            "peak_rss_bytes": max(warm_peak, step_peak), "step_peak_rss_bytes": step_peak}
