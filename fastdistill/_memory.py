"""Memory meters (peak RSS of this process, bytes autograd saves for backward) and the CPU's
name, for benchmarks, memory tests and run metrics.

``ru_maxrss`` is the wrong meter for a child process: Linux carries the parent's high-water mark
across fork + exec, so a small child started by a 1 GB parent reports 1 GB. ``VmHWM`` in
``/proc/self/status`` belongs to the current address space (new at exec), and writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so one process can measure several phases.
"""
from __future__ import annotations

import platform
import resource
import sys
from typing import Dict, Iterable, Optional

import torch

__all__ = ["peak_rss_bytes", "current_rss_bytes", "reset_peak_rss", "cpu_model", "SavedTensorMeter"]


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


class SavedTensorMeter:
    """Live and peak bytes that autograd holds for backward while the context is active.

    Every tensor autograd saves passes through the pack hook; we keep it in a handle whose
    lifetime is the graph node's, so the count drops when the graph is freed. Bytes are counted
    per unique storage (views of θ saved by ten ops count once), and storages of ``exclude``
    (pre-existing inputs) not at all.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: Dict[int, list] = {}  # storage ptr -> [handles alive, nbytes]
        self.live = 0
        self.peak = 0

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _SavedHandle.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> "_SavedHandle":
        return _SavedHandle(self, tensor)

    def acquire(self, ptr: int, nbytes: int) -> None:
        if ptr in self._excluded:
            return
        ref = self._refs.get(ptr)
        if ref is None:
            self._refs[ptr] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            ref[0] += 1

    def release(self, ptr: int) -> None:
        ref = self._refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[ptr]


class _SavedHandle:
    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        # the handle keeps the storage alive, so its address cannot be reused while counted
        self.tensor, self.ptr, self.meter = tensor, storage.data_ptr(), meter
        meter.acquire(self.ptr, storage.nbytes())

    @staticmethod
    def unpack(handle: "_SavedHandle") -> torch.Tensor:
        return handle.tensor

    def __del__(self):
        self.meter.release(self.ptr)
