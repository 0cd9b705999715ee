"""The table-lookup lift-project kernel (targets/executorch/kernels/lq_lut.h) and its sign layout.

Against the fp32 reference on every shipped rate, ragged shapes, 1 and 2 threads; and its
instruction-set paths: AVX2 and the forced-scalar build here, NEON cross-compiled for arm64
and run under qemu-aarch64 (tests/kernels/lut_driver.cpp prints what each build computes).

Threshold: the tables hold q = round(t / s) with one scale s per token (s = the largest group
sum of |u| over 8064 = 63 * 128 for two planes, over 127 for one int8 plane), so each of the G = 2 *
row_nbytes entries a row sums is off by at most s / 2: |y_r - y_ref_r| <= |scale_r| * G * s / 2,
plus a few fp32 ulps from the transform and lift ahead of the tables (the reference uses the
same fp32 math in another order). That bound is what is asserted; a wrong bit order, nibble
or sign convention exceeds it by orders of magnitude.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from test_executorch import IN_FEATURES, random_layer  # noqa: E402
from liftedge.lattice import shipped_rates  # noqa: E402
from liftedge.lutpack import deinterleave_signs, interleave_signs  # noqa: E402
from liftedge.targets.executorch import kernel, ops  # noqa: E402
from liftedge.targets.reference.liftquant import LiftLinear  # noqa: E402

QMAX = {"lut": 63.0 * 128.0, "lut_int8": 127.0}
LUT_TWO_PLANE, LUT_INT8 = kernel.LUT_MODES["lut"], kernel.LUT_MODES["lut_int8"]
# fp32 transform + lift vs the reference's fp32 order: a few ulps of |u| per entry; 1e-3 of the
# table bound and 1e-5 of max |y| cover that with >10x margin.
FP32_SLACK_REL, FP32_SLACK_ABS = 1e-3, 1e-5
DRIVER = Path(__file__).with_name("kernels") / "lut_driver.cpp"
CORE = [kernel.KERNEL_DIR / "lq_lut.cpp", kernel.KERNEL_DIR / "lq_linear.cpp"]


@pytest.fixture(scope="module")
def kernel_cache(et_kernel_cache):
    """The session's kernel build (shared with test_executorch.py)."""
    return et_kernel_cache


@pytest.fixture(autouse=True)
def _shared_kernel_cache(kernel_cache, monkeypatch):
    monkeypatch.setenv("LIFTEDGE_CACHE", str(kernel_cache))


def table_bound(qt, x: torch.Tensor, method: str) -> np.ndarray:
    """Per (token, row) worst-case error of the integer tables, plus fp32 slack."""
    t = qt.tensors
    u = ops.lift_math(x, t["in_scale"], t["mix1"], t["mix2"], t["block_scale"], t["codebook"]).double()
    groups = 2 * t["signs"].shape[1]
    u = torch.nn.functional.pad(u, (0, 4 * groups - u.shape[-1]))
    s = u.abs().reshape(u.shape[0], groups, 4).sum(-1).amax(-1) / QMAX[method]  # [m]
    return (s[:, None] * groups / 2 * t["scale"].double().abs()[None, :]).numpy()


@pytest.mark.parametrize("rate", shipped_rates(), ids=lambda r: r.slug)
def test_lut_kernel_within_table_bound_every_rate(rate):
    idx = rate.D * 31 + rate.d
    n = IN_FEATURES[idx % len(IN_FEATURES)]
    out = 3 + idx % 61  # ragged: rarely a multiple of 32
    qt = random_layer(out=out, n=n, D=rate.D, d=rate.d, seed=idx)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(idx))
    ref = LiftLinear(qt, None)(x).numpy()
    for method in ("lut", "lut_int8"):
        call = kernel.LayerCall(qt.tensors, method)
        bound = table_bound(qt, x, method) * (1 + FP32_SLACK_REL) + FP32_SLACK_ABS * np.abs(ref).max()
        for rows in (x[:1], x):  # decode (m = 1) and prefill (m = 5)
            got = call(rows.numpy())
            err = np.abs(got.astype(np.float64) - ref[: rows.shape[0]])
            assert (err <= bound[: rows.shape[0]]).all(), (rate, method, rows.shape, float((err / bound[: rows.shape[0]]).max()))


def test_lut_kernel_threads_give_the_same_bits():
    qt = random_layer(out=200, n=576, D=24, d=10, seed=3)  # 7 row tiles, the last one ragged
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(3)).numpy()
    call = kernel.LayerCall(qt.tensors, "lut")
    one = call(x)
    for threads in (1, 2):
        kernel.set_threads(threads)
        assert np.array_equal(call(x, threaded=True), one), threads  # integer sums: order-free


def test_interleave_roundtrip_and_nibble_order():
    g = torch.Generator().manual_seed(0)
    for out, nbytes in ((1, 1), (33, 7), (64, 3), (100, 20)):
        signs = torch.randint(0, 256, (out, nbytes), dtype=torch.uint8, generator=g)
        lut = interleave_signs(signs)
        assert lut.shape == (-(-out // 32), 2 * nbytes, 16)
        assert torch.equal(deinterleave_signs(lut, out), signs)
        r, grp = out - 1, 2 * nbytes - 1  # last row, last group: its nibble where lq_lut.h says
        byte = int(lut[r // 32, grp, r % 16])
        assert (byte & 15 if r % 32 < 16 else byte >> 4) == (int(signs[r, grp // 2]) >> 4 * (grp % 2)) & 15


def test_op_torch_impl_reads_both_layouts():
    qt = random_layer(out=40, n=100, D=12, d=4, seed=5)
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(5))
    args = [qt.tensors[f] for f in ops.FIELDS]
    row_major = ops.lq_linear_math(x, *args)
    interleaved = ops.lq_linear_math(x, interleave_signs(args[0]), *args[1:])
    assert torch.equal(row_major, interleaved)
    assert ops.LqLinear(qt.tensors, None, custom_op=True).signs.dim() == 3
    assert ops.LqLinear(qt.tensors, None, custom_op=False).signs.dim() == 2


def _build_driver(cxx: list[str], flags: list[str], out: Path) -> Path:
    cmd = [*cxx, "-O2", "-std=c++17", *flags, f"-I{kernel.KERNEL_DIR}", str(DRIVER), *map(str, CORE),
           "-pthread", "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _run_driver(cmd: list[str]) -> dict[str, list[str]]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-500:] + res.stderr[-1000:]
    lines = [ln.split() for ln in res.stdout.splitlines()]
    return {" ".join(ln[:3]): ln[3:] for ln in lines if ln[0] != "isa"} | {"isa": [lines[0][1]]}


def _check_driver(got: dict, isa: str) -> None:
    assert got["isa"] == [isa]
    for key, val in got.items():
        if key.startswith(("threads", "split")):
            assert val == ["same"], key
        if key.startswith("pipe"):  # within the table bound against the driver's double reference
            assert float(val[0]) <= 1.0, (key, val[0])


@pytest.fixture(scope="module")
def x86_driver(tmp_path_factory):
    """The driver's output from the forced-scalar x86 build (the reference path)."""
    folder = tmp_path_factory.mktemp("lut-driver")
    exe = _build_driver([kernel.compiler()], ["-march=native", "-DLQ_LUT_FORCE_SCALAR"], folder / "scalar")
    got = _run_driver([str(exe)])
    _check_driver(got, "scalar")
    return folder, got


def test_x86_simd_path_equals_scalar_bit_for_bit(x86_driver):
    folder, scalar = x86_driver
    exe = _build_driver([kernel.compiler()], ["-march=native"], folder / "native")
    got = _run_driver([str(exe)])
    isa = kernel.lut_isa()
    _check_driver(got, isa)
    if isa != "avx2":
        pytest.skip(f"this CPU has no AVX2 (the native build runs the {isa} path)")
    # same compiler flags for the fp32 lift, integer lookups: every output bit equal
    assert {k: v for k, v in got.items() if k != "isa"} == {k: v for k, v in scalar.items() if k != "isa"}


AARCH64_CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


@pytest.mark.skipif(not (shutil.which(AARCH64_CXX) and shutil.which(QEMU)),
                    reason=f"{AARCH64_CXX} or {QEMU} not installed (apt-get install g++-aarch64-linux-gnu "
                           "qemu-user; .ci/setup installs them)")
def test_arm64_neon_path_equals_x86(x86_driver):
    folder, scalar = x86_driver
    exe = _build_driver([AARCH64_CXX], ["-static"], folder / "arm64")
    got = _run_driver([QEMU, str(exe)])
    _check_driver(got, "neon")
    for key, val in scalar.items():
        if key.startswith(("exact", "threads", "split")):  # the kernel on given lifted vectors: same bits
            assert got[key] == val, key
        elif key.startswith("pipe"):
            # from x: the fp32 transform and lift may round differently (other vectorization and
            # FMA contraction on arm64), and a 1-ulp change of u can move a table entry by one
            # step; both builds are already within the table bound of the double reference
            # (_check_driver), and agree to a few table steps: 1e-3 of max |y| for two planes
            # (> 10x their table error), 5e-2 for one int8 plane (s = max group sum / 127).
            tol = {str(LUT_TWO_PLANE): 1e-3, str(LUT_INT8): 5e-2}[key.split()[2]]
            a, b = np.array(got[key][1:], float), np.array(val[1:], float)
            assert np.abs(a - b).max() <= tol * np.abs(b).max(), key
