"""Build, cache and load the liftedge ExecuTorch kernel library (`liftedge::lq_linear.out`, and
the head kernels `liftedge::fp16_linear.out` and `liftedge::int_linear.out`).

The sources in `kernels/` are compiled at first use with the system C++ compiler
(`$LIFTEDGE_CXX`, default `g++`) against the headers and `libexecutorch.so` that the
executorch wheel ships, into `cache_path("executorch-kernels", <key>.so)`; the key hashes
the sources, the flags, the compiler version, the executorch version and the host CPU, so
a stale library is never loaded. The library is loaded into this process with
`ctypes.CDLL(..., RTLD_GLOBAL)`: its static initialiser registers the kernel with the
ExecuTorch runtime that `executorch.runtime` uses, and its C entry `lq_linear_f32` is
callable directly (tests, benchmarks).

This module owns the build and the load. The op's schema and torch implementation are in
`ops.py`; an app links the same sources through `CMakeLists.txt`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from liftedge.cache import cache_path, sha256_text
from liftedge.errors import ArtifactError

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
SOURCES = ("lq_linear.cpp", "lq_linear_et.cpp", "head_linear_et.cpp")
HEADERS = ("lq_linear.h", "et_linear.h")
# -march=native: the library is built on, and cached for, the machine that runs it.
OPT_FLAGS = ("-O3", "-march=native", "-std=c++17")
METHODS = {"auto": 0, "lut8": 1, "mask": 2}


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("in_features", "out_features", "n1", "n2", "d", "D")] + [
        ("signs", ctypes.c_void_p)] + [(n, ctypes.c_void_p) for n in
                                       ("scale", "in_scale", "mix1", "mix2", "block_scale", "codebook")]


def executorch_root() -> Path:
    import executorch

    return Path(next(iter(executorch.__path__)))


def build_flags() -> list[str]:
    et = executorch_root()
    return [*OPT_FLAGS, "-shared", "-fPIC", "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL",
            f"-I{et / 'include'}", f"-I{et / 'include/executorch/runtime/core/portable_type/c10'}",
            f"-L{et / 'lib'}", f"-Wl,-rpath,{et / 'lib'}"]


def compiler() -> str:
    return os.environ.get("LIFTEDGE_CXX", "g++")


def _compiler_version(cxx: str) -> str:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ArtifactError(f"no C++ compiler {cxx!r} ({exc}); install g++ or set LIFTEDGE_CXX") from None
    if res.returncode != 0:
        raise ArtifactError(f"{cxx} --version failed: {res.stderr.strip()[:200]}")
    return res.stdout.splitlines()[0]


def _host_cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))), "")
    except OSError:
        return platform.processor()


def library_key() -> str:
    from executorch.version import __version__ as et_version

    cxx = compiler()
    parts = [(KERNEL_DIR / name).read_text() for name in (*SOURCES, *HEADERS)]
    return sha256_text(*parts, " ".join(build_flags()), _compiler_version(cxx), et_version,
                       platform.machine(), _host_cpu())[:24]


def library_path() -> Path:
    """The cached kernel library, built now if missing."""
    target = cache_path("executorch-kernels", f"liblq_linear-{library_key()}.so")
    if not target.exists():
        _compile(target)
    return target


def _compile(target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler(), *[str(KERNEL_DIR / s) for s in SOURCES], *build_flags(), "-lexecutorch", "-lexecutorch_threadpool", "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise ArtifactError(f"building the liftedge ExecuTorch kernel failed:\n{' '.join(cmd)}\n"
                                f"{res.stderr[-3000:]}")
        os.replace(tmp, target)
        log.info("built %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Load the kernel library into this process (RTLD_GLOBAL) once; registers the op."""
    import executorch.extension.pybindings.portable_lib  # noqa: F401  (the runtime first)

    lib = ctypes.CDLL(str(library_path()), mode=ctypes.RTLD_GLOBAL)
    lib.lq_linear_f32.restype = ctypes.c_int
    lib.lq_linear_f32.argtypes = [ctypes.POINTER(_Layer), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int]
    lib.lq_scratch_floats.restype = ctypes.c_int64
    lib.lq_scratch_floats.argtypes = [ctypes.POINTER(_Layer), ctypes.c_int64, ctypes.c_int]
    return lib


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def run_kernel(tensors: dict, x: np.ndarray, method: str = "auto") -> np.ndarray:
    """Call the C++ core directly on a "liftquant" tensor's fields: x [m, n] -> y [m, out]."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    lib = load_library()
    keep = {k: _f32(v.float().numpy() if hasattr(v, "float") else v) for k, v in tensors.items() if k != "signs"}
    signs = np.ascontiguousarray(np.asarray(tensors["signs"], dtype=np.uint8))
    d, D = keep["codebook"].shape
    layer = _Layer(keep["in_scale"].size, signs.shape[0], keep["mix1"].shape[0], keep["mix2"].shape[0], d, D,
                   signs.ctypes.data, *(keep[k].ctypes.data for k in
                                        ("scale", "in_scale", "mix1", "mix2", "block_scale", "codebook")))
    x = _f32(x).reshape(-1, layer.in_features)
    y = np.zeros((x.shape[0], layer.out_features), np.float32)
    scratch = np.zeros(lib.lq_scratch_floats(ctypes.byref(layer), x.shape[0], METHODS[method]), np.float32)
    rc = lib.lq_linear_f32(ctypes.byref(layer), x.ctypes.data, x.shape[0], y.ctypes.data, scratch.ctypes.data,
                           METHODS[method])
    if rc != 0:
        raise ArtifactError(f"lq_linear_f32 rejected its arguments (code {rc})")
    return y
