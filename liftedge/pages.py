"""Give the resident pages of memory-mapped weights back to the page cache.

transformers 5 loads safetensors weights as views of a private memory map of the file: the
weights cost no heap, but every page that was read (the load's finiteness check, a forward
pass) stays in the process's resident set until the map goes away, so a model that was read
once counts in full against a phone-sized memory budget. A caller that needs one decoder
block at a time (the streaming quantizer) drops the pages of the weights it is done with
and keeps the resident set at about one block's worth.

Only pages that still hold the file's bytes are dropped, with `madvise(MADV_DONTNEED)`:
the next access maps the same page-cache page again, so no value ever changes. Which pages
those are is read from `/proc/self/pagemap`: bit 61 ("file page or shared anonymous") is set
for a clean page of a private file map and clear for a page that was written to (copy on
write made it private anonymous memory: dropping it would lose the write) and for heap
memory (dropping it would zero it). Such pages are kept. Without pagemap (not Linux) nothing
is dropped.

This module owns that one mechanism; when to call it belongs to the caller, which must not
write to the tensors from another thread meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

_PAGEMAP = "/proc/self/pagemap"
_PRESENT = 1 << 63
_FILE_OR_SHARED = 1 << 61
_MADV_DONTNEED = 4


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


_PAGE = _page_size()


def _page_runs(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Merged [first, last) page numbers lying wholly inside the CPU tensors' bytes.

    Partial pages at a tensor's ends are left out: they hold a neighbour's bytes too.
    """
    spans = []
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        first = -(-start // _PAGE)
        last = (start + t.numel() * t.element_size()) // _PAGE
        if last > first:
            spans.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


def _clean_runs(pagemap, first: int, last: int) -> list[tuple[int, int]]:
    """Sub-runs of [first, last) whose pages are present and file-backed (safe to drop)."""
    entries = np.frombuffer(os.pread(pagemap, (last - first) * 8, first * 8), dtype=np.uint64)
    clean = (entries & np.uint64(_PRESENT | _FILE_OR_SHARED)) == np.uint64(_PRESENT | _FILE_OR_SHARED)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], clean.astype(np.int8), [0]))))
    return [(first + int(a), first + int(b)) for a, b in zip(edges[::2], edges[1::2])]


def release_clean_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the clean file-backed pages inside `tensors` from the resident set; bytes dropped.

    Values are unchanged (the pages come back from the page cache when read); written-to,
    heap and non-CPU memory is left alone. Returns 0 where pagemap cannot be read.
    """
    runs = _page_runs(tensors)
    if not runs:
        return 0
    try:
        pagemap = os.open(_PAGEMAP, os.O_RDONLY)
    except OSError:
        return 0
    try:
        clean = [run for first, last in runs for run in _clean_runs(pagemap, first, last)]
    except OSError as exc:
        log.debug("cannot read %s: %s", _PAGEMAP, exc)
        return 0
    finally:
        os.close(pagemap)
    return sum(_drop(first, last) for first, last in clean)


def _drop(first: int, last: int) -> int:
    libc = _libc()
    if libc is None:
        return 0
    if libc.madvise(ctypes.c_void_p(first * _PAGE), ctypes.c_size_t((last - first) * _PAGE), _MADV_DONTNEED):
        log.debug("madvise failed: errno %d", ctypes.get_errno())
        return 0
    return (last - first) * _PAGE


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
            _LIBC[0].madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]
