"""This machine's side of the bound: memory bandwidth (measured once, cached) and peak RSS.

`host_bandwidth_gbs()` streams a buffer far larger than the caches and keeps the best of a few
passes; the first call on a machine measures (~1 s), later calls read the value cached in
`liftedge.cache` under a key made of the host name, the CPU model and the total RAM.
`measure_bandwidth_gbs(kind)` measures without the cache ("read": a sum over the buffer, what a
decode step does to its weights; "copy": read + write, counted as both). `peak_rss_nbytes()` is
the process's high-water mark (VmHWM). This module does not know about models or runtimes.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from typing import Callable

import numpy as np

# 256 MiB: far above any CPU's last-level cache, so the passes stream from DRAM.
BUFFER_NBYTES = 256 << 20
REPEATS = 5


def _read_pass(src: np.ndarray, dst: np.ndarray) -> int:
    src.sum()
    return src.nbytes


def _copy_pass(src: np.ndarray, dst: np.ndarray) -> int:
    np.copyto(dst, src)
    return 2 * src.nbytes  # every byte is read once and written once


# kind -> one timed pass over the buffer, returning the bytes it moved
PASSES: dict[str, Callable[[np.ndarray, np.ndarray], int]] = {"read": _read_pass, "copy": _copy_pass}


def measure_bandwidth_gbs(kind: str = "read", nbytes: int = BUFFER_NBYTES, repeats: int = REPEATS) -> float:
    """Best of `repeats` passes of `kind` over `nbytes`, in GB/s (1e9 bytes per second)."""
    if kind not in PASSES:
        raise ValueError(f"unknown bandwidth kind {kind!r}; known: {', '.join(PASSES)}")
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src) if kind == "copy" else src
    PASSES[kind](src, dst)  # touch every page before timing
    best = float("inf")
    moved = 0
    for _ in range(repeats):
        t = time.perf_counter()
        moved = PASSES[kind](src, dst)
        best = min(best, time.perf_counter() - t)
    return moved / best / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key() -> dict:
    """What identifies this machine's memory system for the cache."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"host": platform.node(), "cpu": _cpu_model(), "ram_nbytes": int(ram), "cpus": os.cpu_count()}


def host_bandwidth_gbs(kind: str = "read") -> dict:
    """{"gbps", "kind", "measured_at", "host", ...}: measured on the first call, then read from the cache."""
    from liftedge.cache import cache_path, sha256_text
    from liftedge.io import atomic_write_json

    key = host_key()
    path = cache_path("bandwidth", sha256_text(kind, json.dumps(key, sort_keys=True)) + ".json")
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("gbps", 0) > 0:
                return data | {"cached": True}
        except (OSError, json.JSONDecodeError):
            pass  # a damaged entry is measured again
    data = {"gbps": measure_bandwidth_gbs(kind), "kind": kind, "buffer_nbytes": BUFFER_NBYTES,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_1min": os.getloadavg()[0],
            **key}
    atomic_write_json(path, data)
    return data | {"cached": False}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_nbytes() -> int:
    """The process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork+exec
    from a (large) parent, so a child started by a big process would report the parent's peak."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(value if platform.system() == "Darwin" else value * 1024)
    return kib * 1024


def current_rss_nbytes() -> int:
    """The process's resident set now (VmRSS), or its peak where /proc is missing."""
    kib = _status_kib("VmRSS")
    return peak_rss_nbytes() if kib is None else kib * 1024
