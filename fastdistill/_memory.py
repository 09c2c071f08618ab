"""Peak resident memory of this process and the CPU's name, for benchmarks and run metrics.

``ru_maxrss`` is the wrong meter for a child process: Linux carries the parent's high-water mark
across fork + exec, so a small child started by a 1 GB parent reports 1 GB. ``VmHWM`` in
``/proc/self/status`` belongs to the current address space (new at exec), and writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so one process can measure several phases.
"""
from __future__ import annotations

import platform
import resource
import sys
from typing import Optional

__all__ = ["peak_rss_bytes", "current_rss_bytes", "reset_peak_rss", "cpu_model"]


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set of this address space (``VmHWM``); ``ru_maxrss`` where there is no /proc."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> Optional[int]:
    """Resident set now (``VmRSS``), or None without /proc."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
