"""Compiled CPU kernels for the LiftQuant searches: build once, cache, load with ctypes.

`kernel.c` (next to this file) is compiled at first use with the system C compiler
(`$LIFTEDGE_CC`, default `cc`) into a shared library cached under
`cache_path("kernels", <sha256 of source + flags + compiler version + host CPU>.so)`, written
atomically.
Flags are tried best first (`-O3 -march=native -fopenmp`, then without -march=native, then
without OpenMP). Without a working compiler, or with `LIFTEDGE_KERNEL=0`, `available()` is
False (a warning is logged once) and `search` keeps its torch path, the reference.

What the kernels compute, and how their float32 rounding differs from torch: see kernel.c.
The wrappers take the same tables as the torch searches (`search.ExhaustiveTable`, ...) and
return the same int8 codes. This module owns building and calling the kernels, not the
choice of search (`search.default_method`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from liftedge.cache import cache_path, sha256_text
from liftedge.lattice.switch import FastPath

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernel.c")
ABI_VERSION = 2
MAX_D = 64  # block length d (kernel.c MAX_D: the sums t = A s kept per candidate)
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
COMMON_FLAGS = ("-shared", "-fPIC", "-std=gnu11")
_switch = FastPath("LIFTEDGE_KERNEL")
disabled = _switch.disabled  # the torch reference inside a `with` block

_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)
_i8p = ctypes.POINTER(ctypes.c_int8)


def compiler() -> str:
    return os.environ.get("LIFTEDGE_CC", "cc")


def _compiler_version(cc: str) -> str | None:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> bool:
    """Compile kernel.c into `target` atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp, "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            log.debug("kernel build failed (%s): %s", " ".join(cmd), res.stderr[-2000:])
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("kernel build failed: %s", exc)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        if lib.lq_abi_version() != ABI_VERSION:
            return None
    except (OSError, AttributeError) as exc:
        log.debug("cannot load %s: %s", path, exc)
        return None
    lib.lq_exhaustive.argtypes = [_f32p, ctypes.c_int64, ctypes.c_int, _f32p, _i32p, _i8p, ctypes.c_int]
    lib.lq_exhaustive.restype = None
    lib.lq_candidates.argtypes = [_f32p, _f32p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                  _f32p, _f32p, _f32p, ctypes.c_int, _i32p, _i8p, ctypes.c_int]
    lib.lq_candidates.restype = None
    lib.lq_lanes.restype = ctypes.c_int
    return lib


def _host_id() -> str:
    """The CPU the library is built for (-march=native): machine and CPU flags, if readable."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


@lru_cache(maxsize=None)
def _library(cc: str) -> ctypes.CDLL | None:
    version = _compiler_version(cc) if shutil.which(cc) or os.path.exists(cc) else None
    if version is None or not SOURCE.exists():
        why = f"no C compiler {cc!r} (set LIFTEDGE_CC)" if version is None else f"{SOURCE} is missing"
        log.warning("%s: LiftQuant encoding uses the slower torch search", why)
        return None
    source = SOURCE.read_text()
    for flags in FLAG_SETS:
        key = sha256_text(source, " ".join(flags + COMMON_FLAGS), version, _host_id())[:32]
        target = cache_path("kernels", f"lq-{key}.so")
        if (target.exists() or _compile(cc, flags, target)) and (lib := _load(target)) is not None:
            log.info("LiftQuant CPU kernel: %s (%s)", target, " ".join(flags))
            return lib
    log.warning("building the LiftQuant CPU kernel with %r failed: encoding uses the slower torch search", cc)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, or the build failed)."""
    if not _switch.enabled():
        return None
    return _library(compiler())


def available() -> bool:
    return library() is not None




def _f32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _ptr(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def exhaustive_search(w: torch.Tensor, table) -> torch.Tensor:
    """`search.exhaustive_search` on CPU: int8 signs [N, D] for blocks w [N, d]."""
    n, D = w.shape[0], table.signs.shape[1]
    p = _f32(w @ table.M)  # b.p = w.(M b)
    nhn = _f32(table.neg_half_norms)
    best, neg = np.empty(n, np.int32), np.empty(n, np.int8)
    library().lq_exhaustive(_ptr(p, _f32p), n, D, _ptr(nhn, _f32p), _ptr(best, _i32p), _ptr(neg, _i8p), _threads())
    flip = (1 - 2 * torch.from_numpy(neg)).to(torch.int8)
    return table.signs[torch.from_numpy(best).long()] * flip[:, None]


def _padded_t(x: torch.Tensor) -> np.ndarray:
    """[K, c] -> [c, K'] float32 with K' a multiple of the kernel's vector width (`lq_lanes`:
    16 with AVX-512, else 8); padding repeats the last row, a later duplicate candidate that
    the first-index argmin never prefers."""
    pad = (-x.shape[0]) % library().lq_lanes()
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, -1)])
    return _f32(x.T)


def _candidates(u, w, zx, zr, A, lifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run lq_candidates: (best k [N] long, signs of the best candidate [N, ns] int8)."""
    n, ns = u.shape
    d = w.shape[1]
    if d > MAX_D:
        raise ValueError(f"the CPU kernel handles blocks of at most {MAX_D} weights, got {d}")
    u, w, A = _f32(u), _f32(w), _f32(A)
    zx_t = _padded_t(zx)
    zr_t = _padded_t(zr) if zr is not None else np.zeros(1, np.float32)
    best, signs = np.empty(n, np.int32), np.empty((n, ns), np.int8)
    library().lq_candidates(_ptr(u, _f32p), _ptr(w, _f32p), n, d, ns, zx_t.shape[1], _ptr(zx_t, _f32p),
                            _ptr(zr_t, _f32p), _ptr(A, _f32p), int(lifted), _ptr(best, _i32p), _ptr(signs, _i8p),
                            _threads())
    return torch.from_numpy(best).long(), torch.from_numpy(signs)


def tail_search(w: torch.Tensor, table) -> torch.Tensor:
    """`search.tail_search` on CPU: candidates (sign(x_H), z) with x_H = M_H^-1 w - z_head[k]."""
    D = table.head.numel() + table.tail.numel()
    best, head_signs = _candidates(w @ table.head_inv_t, w, -table.z_head, table.z_recon, table.head_t.T, False)
    out = torch.empty(w.shape[0], D, dtype=torch.int8)
    out[:, table.head] = head_signs
    out[:, table.tail] = table.z_signs[best]
    return out


def lifted_search(w: torch.Tensor, table) -> torch.Tensor:
    """`search.lifted_search` on CPU: candidates sign(M^+ w + N^T z) for every z."""
    return _candidates(w @ table.lift_w, w, table.z_part, None, table.M, True)[1]
