"""Build, cache and load the liftedge ExecuTorch kernel library (`liftedge::lq_linear.out`, and
the head kernels `liftedge::fp16_linear.out` and `liftedge::int_linear.out`).

`run_kernel` calls the lift-project kernels directly on a layer's packed fields: the
table-lookup kernel (`lut`: two int8 table planes, the op's default; `lut_int8`: one plane)
over the interleaved sign layout, or the fp32 kernels of the row-major layout (`mask`,
`lut8`), on the calling thread or (`threads`) over ExecuTorch's threadpool.

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
SOURCES = ("lq_linear.cpp", "lq_lut.cpp", "lq_linear_et.cpp", "head_linear_et.cpp")
HEADERS = ("lq_linear.h", "lq_lut.h", "et_linear.h")
# -march=native: the library is built on, and cached for, the machine that runs it.
OPT_FLAGS = ("-O3", "-march=native", "-std=c++17")
METHODS = {"auto": 0, "lut8": 1, "mask": 2}  # the fp32 kernels over row-major signs (lq_linear.h)
LUT_MODES = {"lut": 0, "lut_int8": 1}  # the table-lookup kernel (lq_lut.h): two planes / one


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("in_features", "out_features", "n1", "n2", "d", "D")] + [
        ("signs", ctypes.c_void_p)] + [(n, ctypes.c_void_p) for n in
                                       ("scale", "in_scale", "mix1", "mix2", "block_scale", "codebook", "mix2t")]


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
    L, p, i64 = ctypes.POINTER(_Layer), ctypes.c_void_p, ctypes.c_int64
    for name, res, args in (
            ("lq_linear_f32", ctypes.c_int, [L, p, i64, p, p, ctypes.c_int]),
            ("lq_scratch_floats", i64, [L, i64, ctypes.c_int]),
            ("lq_mask_linear_threaded", ctypes.c_int, [L, p, i64, p, p]),
            ("lq_lut_linear_f32", ctypes.c_int, [L, p, i64, p, p, ctypes.c_int]),
            ("lq_lut_linear_threaded", ctypes.c_int, [L, p, i64, p, p, ctypes.c_int]),
            ("lq_lut_scratch_bytes", i64, [L, i64, ctypes.c_int]),
            ("lq_lut_isa", ctypes.c_char_p, []),
            ("liftedge_set_threads", ctypes.c_int, [ctypes.c_int])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def set_threads(n: int) -> None:
    """Resize ExecuTorch's threadpool (the one the op and the `threads` entries use)."""
    if load_library().liftedge_set_threads(int(n)) != 0:
        raise ArtifactError(f"could not set the ExecuTorch threadpool to {n} threads")


def lut_isa() -> str:
    """The instruction-set path of the table-lookup kernel in this build: avx2, neon or scalar."""
    return load_library().lq_lut_isa().decode()


class LayerCall:
    """One layer's fields as the C core takes them (converted once), callable on x [m, n]."""

    def __init__(self, tensors: dict, method: str = "auto"):
        if method not in METHODS and method not in LUT_MODES:
            raise ValueError(f"method must be one of {sorted([*METHODS, *LUT_MODES])}, got {method!r}")
        import torch

        from liftedge.lutpack import interleave_signs

        self.lib, self.method = load_library(), method
        self.keep = {k: _f32(v.float().numpy() if hasattr(v, "float") else v)
                     for k, v in tensors.items() if k != "signs"}
        signs = tensors["signs"]
        out = self.keep["scale"].size
        if method in LUT_MODES:
            signs = interleave_signs(torch.as_tensor(np.asarray(signs, dtype=np.uint8)))
        self.signs = np.ascontiguousarray(np.asarray(signs, dtype=np.uint8))
        d, D = self.keep["codebook"].shape
        self.layer = _Layer(self.keep["in_scale"].size, out, self.keep["mix1"].shape[0],
                            self.keep["mix2"].shape[0], d, D, self.signs.ctypes.data,
                            *(self.keep[k].ctypes.data for k in
                              ("scale", "in_scale", "mix1", "mix2", "block_scale", "codebook")))
        self._scratch = np.zeros(0, np.float32)

    def scratch(self, m: int) -> np.ndarray:
        ref = ctypes.byref(self.layer)
        if self.method in LUT_MODES:
            nbytes = self.lib.lq_lut_scratch_bytes(ref, m, LUT_MODES[self.method])
        else:
            nbytes = 4 * self.lib.lq_scratch_floats(ref, m, METHODS[self.method])
        if self._scratch.nbytes < nbytes:
            self._scratch = np.zeros(-(-nbytes // 4), np.float32)
        return self._scratch

    def __call__(self, x: np.ndarray, threaded: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        x = _f32(x).reshape(-1, self.layer.in_features)
        m = x.shape[0]
        y = np.zeros((m, self.layer.out_features), np.float32) if out is None else out
        ref, scratch = ctypes.byref(self.layer), self.scratch(m).ctypes.data
        args = (ref, x.ctypes.data, m, y.ctypes.data, scratch)
        if self.method in LUT_MODES:
            fn = self.lib.lq_lut_linear_threaded if threaded else self.lib.lq_lut_linear_f32
            rc = fn(*args, LUT_MODES[self.method])
        elif threaded and self.method in ("mask", "auto"):
            rc = self.lib.lq_mask_linear_threaded(*args)
        else:
            rc = self.lib.lq_linear_f32(*args, METHODS[self.method])
        if rc != 0:
            raise ArtifactError(f"the {self.method} kernel rejected its arguments (code {rc})")
        return y


def run_kernel(tensors: dict, x: np.ndarray, method: str = "auto", threads: int | None = None) -> np.ndarray:
    """Call the C++ core directly on a "liftquant" tensor's fields: x [m, n] -> y [m, out].

    `threads`: run over ExecuTorch's threadpool resized to that many threads (else the
    calling thread only).
    """
    call = LayerCall(tensors, method)
    if threads is not None:
        set_threads(threads)
    return call(x, threaded=threads is not None)
