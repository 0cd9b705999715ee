"""What the C allocator keeps of freed memory: the two glibc settings liftedge's long runs use.

Quantizing (one decoder block after another) and lowering (a pack's layers repacked one by
one, then traced and serialized) allocate and free many tensors of 1-100 MB. glibc serves
those from its heap once its adaptive mmap threshold has risen (up to 32 MB, raised each time
a mapped chunk is freed); the heap's free space then fragments and stays resident. Measured:
~290 MB per SmolLM2 block while quantizing; while lowering a 3B pack, 1.1 GB after the
signs' repacking and 1.2 GB more through `torch.export`, nothing of it alive.

`map_large_allocations` fixes the threshold (every allocation of 256 KiB or more gets its own
mapping, returned to the OS when freed); `release_memory` trims what the heap holds free.
Neither changes a computed value. Both do nothing with another C library or when
LIFTEDGE_NO_TRIM is set (to measure without them). This module owns those two calls; when to
make them belongs to the caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

# glibc's M_MMAP_THRESHOLD option number (malloc.h).
_M_MMAP_THRESHOLD = -3
# Allocations from this size up get their own mapping, returned to the OS when freed.
_MMAP_THRESHOLD_NBYTES = 256 << 10


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def map_large_allocations() -> None:
    """Give every allocation of 256 KiB or more its own mapping, for the rest of the process.

    A fixed threshold also turns glibc's raising of it off. Each large allocation then costs a
    map and its page faults (~5% of a quantized block's time)."""
    if os.environ.get("LIFTEDGE_NO_TRIM"):
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):  # not glibc: its own allocator policy stands
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_NBYTES)


def release_memory() -> None:
    """Collect Python garbage and return the heap's free memory to the OS."""
    gc.collect()
    if os.environ.get("LIFTEDGE_NO_TRIM"):
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc: nothing to trim
        libc.malloc_trim(0)
