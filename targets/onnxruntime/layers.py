"""One quantized linear site as stock ONNX operators (plus com.microsoft.MatMulNBits).

`emit_linear(ctx, x, site, qt, bias)` appends the subgraph of `qt`'s format to the graph and
returns the output name; `LOWERINGS` is the format -> emitter table (a format missing from it
is refused with the reason). The three patterns:

| format      | subgraph                                                                           |
|-------------|------------------------------------------------------------------------------------|
| `liftquant` | x*in_scale -> mix1 . X . mix2^T -> pad to n_blocks*d -> *block_scale -> .M (lift)   |
|             | -> pad to 8*row bytes -> MatMul with S^T (S unpacked from uint8 by a 256x8 Gather)  |
|             | -> *scale (+bias): the order of targets/reference/liftquant.py LiftLinear.forward  |
| `int`       | MatMulNBits (bits 2/4/8, block = group size, a power of two >= 16); 3 bits refused |
| `fp16`      | MatMul with the fp16 weight cast to fp32                                            |

An "int" embedding table (`emit_int_lookup`) is a Gather of its code rows + stock-op
dequantization (BitwiseAnd/BitShift for 4 bits); a head tied to it is MatMulNBits over the
very same initializers (`IntInputs`), so the table is stored once in the file.

Why the packed signs pass through a runtime view: ORT folds constant subgraphs when a
session starts (and bakes the result into a Fixed-style `.ort`), which would turn every
packed sign matrix into a float matrix 32x its size. Each site reshapes its signs through a
shape computed from its own input (`LayerContext.runtime_view`), so the unpack stays in the
graph, runs just before its MatMul, and the weights stay packed in the file and in memory.
The cost is an unpack per call (~8x a float32 MatMul of the same site at decode, see
benchmarks/onnxruntime_bench.py); a byte-LUT in stock ops and 2-bit MatMulNBits codes were
both measured slower. A custom-op kernel that reads bits directly would be faster, but the
ORT wheel ships no C headers to build one.

This module owns the per-site patterns and the repacking of stored fields into their
initializers; the decoder around them belongs to `graph`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from liftedge.targets.onnxruntime.builder import FLOAT, INT32, MS_DOMAIN, GraphBuilder

from liftedge.errors import ArtifactError
from liftedge.types import QuantizedTensor

MATMULNBITS_BITS = (2, 4, 8)


@dataclass(frozen=True)
class LayerContext:
    """The builder plus the 256x8 sign table every liftquant site shares (a constant: a Gather
    folds only when its indices are constant too, and they come through `runtime_view`)."""

    b: GraphBuilder
    sign_table: str   # float32 [256, 8]: row v = the 8 signs of byte v (bit 1 = +1, LSB first)

    def zero_of(self, x: str, tag: str) -> str:
        """int64 [1] zero computed from `x`'s shape: not a constant, and not ready before `x`.

        Tying each unpack to its own activation matters twice: ORT cannot fold it, and its
        scheduler cannot run every site's unpack up front (all unpacked matrices alive at
        once would cost ~1 GB for SmolLM2; one at a time costs ~10 MB).
        """
        b = self.b
        dim = b.op("Shape", [x], name=f"{tag}/zero_shape", start=0, end=1)
        return b.op("Mul", [dim, b.const([0])], name=f"{tag}/zero")

    def runtime_view(self, value: str, shape: tuple[int, ...], x: str, name: str) -> str:
        """`value` reshaped to its own `shape` through a shape computed from `x` (see `zero_of`)."""
        b = self.b
        dims = b.op("Add", [b.const(list(shape)), self.zero_of(x, name)], name=f"{name}/runtime_shape")
        return b.op("Reshape", [value, dims], name=f"{name}/runtime_view")


def sign_table() -> np.ndarray:
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    return (bits * 2 - 1).astype(np.float32)


def make_context(b: GraphBuilder) -> LayerContext:
    return LayerContext(b, b.initializer("sign_table", sign_table()))


def _f32(b: GraphBuilder, name: str, array: np.ndarray) -> str:
    """An fp16 initializer (as stored in the pack) cast to float32 in the graph."""
    return b.op("Cast", [b.initializer(name, np.asarray(array, np.float16))], name=f"{name}/cast", to=FLOAT)


def _fields(qt: QuantizedTensor) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in qt.tensors.items()}


def emit_liftquant(ctx: LayerContext, x: str, site: str, qt: QuantizedTensor) -> str:
    b, m, f = ctx.b, qt.meta, _fields(qt)
    n, d, D, n1, n2 = m["in_features"], m["d"], m["D"], m["n1"], m["n2"]
    nb = -(-n // d)
    row_bytes = f["signs"].shape[1]
    v = b.op("Mul", [x, _f32(b, f"{site}.in_scale", f["in_scale"])], name=f"{site}/in_scale")
    v = b.op("Reshape", [v, b.const([0, 0, n1, n2])], name=f"{site}/to_kron")
    v = b.op("MatMul", [_f32(b, f"{site}.mix1", f["mix1"]), v], name=f"{site}/mix1")
    mix2_t = b.op("Transpose", [_f32(b, f"{site}.mix2", f["mix2"])], name=f"{site}/mix2_t", perm=[1, 0])
    v = b.op("MatMul", [v, mix2_t], name=f"{site}/mix2")
    v = b.op("Reshape", [v, b.const([0, 0, n])], name=f"{site}/from_kron")
    if nb * d != n:
        v = b.op("Pad", [v, b.const([0, 0, 0, 0, 0, nb * d - n])], name=f"{site}/pad_blocks")
    v = b.op("Reshape", [v, b.const([0, 0, nb, d])], name=f"{site}/to_blocks")
    bscale = b.op("Reshape", [_f32(b, f"{site}.block_scale", f["block_scale"]), b.const([nb, 1])],
                  name=f"{site}/block_scale_col")
    v = b.op("Mul", [v, bscale], name=f"{site}/block_scale")
    u = b.op("MatMul", [v, _f32(b, f"{site}.codebook", f["codebook"])], name=f"{site}/lift")
    u = b.op("Reshape", [u, b.const([0, 0, nb * D])], name=f"{site}/lifted")
    if row_bytes * 8 != nb * D:  # the tail bits of each packed row are zero; pad u to match
        u = b.op("Pad", [u, b.const([0, 0, 0, 0, 0, row_bytes * 8 - nb * D])], name=f"{site}/pad_bits")
    y = b.op("MatMul", [u, _unpacked_signs_t(ctx, site, f["signs"], x)], name=f"{site}/sign_matmul")
    return b.op("Mul", [y, _f32(b, f"{site}.scale", f["scale"])], name=f"{site}/scale")


def _unpacked_signs_t(ctx: LayerContext, site: str, signs: np.ndarray, x: str) -> str:
    """S^T float32 [8 * row_bytes, out] from the packed uint8 signs [out, row_bytes], after `x`."""
    b = ctx.b
    out, row_bytes = signs.shape
    packed = ctx.runtime_view(b.initializer(f"{site}.signs", signs), (out, row_bytes), x, f"{site}/signs")
    idx = b.op("Cast", [packed], name=f"{site}/sign_index", to=INT32)
    s = b.op("Gather", [ctx.sign_table, idx], name=f"{site}/unpack")
    s = b.op("Reshape", [s, b.const([out, row_bytes * 8])], name=f"{site}/sign_rows")
    return b.op("Transpose", [s], name=f"{site}/sign_t", perm=[1, 0])


@dataclass(frozen=True)
class IntInputs:
    """The initializers of an "int" site in MatMulNBits' layout, shared by every use of them
    (a tied table's lookup and head read the same ones: stored once)."""

    codes: str          # uint8 [out, n_groups, blob]: each row padded to whole blocks
    scale: str          # float32 [out * n_groups] (the fp16 scales, cast)
    zero: str | None    # uint8 [out * ceil(n_groups * bits / 8)] packed zero points; None if symmetric


def int_inputs(ctx: LayerContext, site: str, qt: QuantizedTensor) -> IntInputs:
    b, m, f = ctx.b, qt.meta, _fields(qt)
    bits, g, n, out = m["bits"], m["group_size"], m["in_features"], m["out_features"]
    if bits not in MATMULNBITS_BITS:
        raise ArtifactError(f"{site}: int{bits} has no MatMulNBits kernel in ORT (bits {MATMULNBITS_BITS}); "
                            "re-plan this site with another format")
    if g < 16 or g & (g - 1):
        raise ArtifactError(f"{site}: group size {g} is not a power of two >= 16, as MatMulNBits requires")
    ng = -(-n // g)
    blob = g * bits // 8
    codes = np.zeros((out, ng * blob), np.uint8)  # pad each row to whole blocks (zeros are ignored past K)
    codes[:, : f["codes"].shape[1]] = f["codes"]
    # the pack's zero rows are MatMulNBits' zero_points layout (LSB first)
    zero = None if m["symmetric"] else b.initializer(f"{site}.zero", f["zero"].reshape(-1))
    return IntInputs(b.initializer(f"{site}.codes", codes.reshape(out, ng, blob)),
                     _f32(b, f"{site}.scale", f["scale"].reshape(-1)), zero)


def emit_int(ctx: LayerContext, x: str, site: str, qt: QuantizedTensor, inputs: IntInputs | None = None) -> str:
    """MatMulNBits over `inputs` (made here unless given: a tied head passes its embedding's)."""
    m = qt.meta
    inputs = inputs or int_inputs(ctx, site, qt)
    names = [inputs.codes, inputs.scale] + ([inputs.zero] if inputs.zero is not None else [])
    return ctx.b.op("MatMulNBits", [x, *names], name=f"{site}/matmulnbits", domain=MS_DOMAIN,
                    K=m["in_features"], N=m["out_features"], bits=m["bits"], block_size=m["group_size"])


def _unpack_graph(b: GraphBuilder, packed: str, bits: int, tag: str) -> str:
    """uint8 [..., k] -> uint8 [..., k * 8 / bits] codes (LSB first): identity for 8 bits,
    BitwiseAnd / BitShift nibbles interleaved for 4 (`liftedge.bitpack` layout)."""
    if bits == 8:
        return packed
    if bits != 4:
        raise ArtifactError(f"{tag}: an int{bits} table has no lookup lowering (4 or 8 bits)")
    lo = b.op("BitwiseAnd", [packed, b.const(15, np.uint8)], name=f"{tag}/lo")
    hi = b.op("BitShift", [packed, b.const(4, np.uint8)], name=f"{tag}/hi", direction="RIGHT")
    pair = b.op("Concat", [b.op("Unsqueeze", [lo, b.const([-1])], name=f"{tag}/lo1"),
                           b.op("Unsqueeze", [hi, b.const([-1])], name=f"{tag}/hi1")], name=f"{tag}/pair", axis=-1)
    shape = b.op("Concat", [b.op("Shape", [packed], name=f"{tag}/lead", end=-1), b.const([-1])],
                 name=f"{tag}/shape", axis=0)
    return b.op("Reshape", [pair, shape], name=f"{tag}/codes")


def _gather_rows(b: GraphBuilder, flat: str, ids: str, width: int, tag: str) -> str:
    """Rows `ids` [B, S] of a flat [rows * width] tensor as [B, S, width]. Indexing the flat
    tensor (ids * width + 0..width-1) instead of reshaping it keeps ORT from folding a second,
    reshaped copy of the constant (MatMulNBits takes the flat one)."""
    base = b.op("Mul", [b.op("Unsqueeze", [ids, b.const([-1])], name=f"{tag}/ids"), b.const(width)], name=f"{tag}/base")
    return b.op("Gather", [flat, b.op("Add", [base, b.const(np.arange(width))], name=f"{tag}/index")], name=tag)


def emit_int_lookup(ctx: LayerContext, ids: str, site: str, qt: QuantizedTensor, inputs: IntInputs) -> str:
    """Rows `ids` [B, S] of an "int" table, dequantized: float32 [B, S, in].

    Gathers only the looked-up rows of the codes (and of their scales and zero points), then
    (code - zero) * scale per group, as `targets/reference/integer.py` decodes; the table is
    never expanded to float.
    """
    b, m = ctx.b, qt.meta
    bits, g, n = m["bits"], m["group_size"], m["in_features"]
    ng = -(-n // g)
    codes = _unpack_graph(b, b.op("Gather", [inputs.codes, ids], name=f"{site}/gather_codes"), bits, f"{site}/codes")
    codes = b.op("Cast", [codes], name=f"{site}/codes_f32", to=FLOAT)                    # [B, S, ng, g]
    scale = b.op("Unsqueeze", [_gather_rows(b, inputs.scale, ids, ng, f"{site}/gather_scale"), b.const([-1])],
                 name=f"{site}/scale_col")                                               # [B, S, ng, 1]
    if inputs.zero is None:
        centred = b.op("Sub", [codes, b.const(float(1 << (bits - 1)), np.float32)], name=f"{site}/centre")
    else:
        zero = _gather_rows(b, inputs.zero, ids, -(-ng * bits // 8), f"{site}/gather_zero")
        zero = _unpack_graph(b, zero, bits, f"{site}/zero")
        zero = b.op("Slice", [zero, b.const([0]), b.const([ng]), b.const([-1])], name=f"{site}/zero_groups")
        zero = b.op("Unsqueeze", [b.op("Cast", [zero], name=f"{site}/zero_f32", to=FLOAT), b.const([-1])],
                    name=f"{site}/zero_col")
        centred = b.op("Sub", [codes, zero], name=f"{site}/centre")
    rows = b.op("Reshape", [b.op("Mul", [centred, scale], name=f"{site}/dequant"), b.const([0, 0, ng * g])],
                name=f"{site}/rows")
    if ng * g != n:
        rows = b.op("Slice", [rows, b.const([0]), b.const([n]), b.const([-1])], name=f"{site}/unpad")
    return rows


def emit_fp16(ctx: LayerContext, x: str, site: str, qt: QuantizedTensor) -> str:
    b = ctx.b
    w = b.op("Transpose", [_f32(b, f"{site}.weight", _fields(qt)["weight"])], name=f"{site}/weight_t", perm=[1, 0])
    return b.op("MatMul", [x, w], name=f"{site}/matmul")


# format -> (lowering, why that lowering, emitter)
LOWERINGS = {
    "liftquant": ("stock ops: 256x8 Gather unpack + transform + lift + ±1 MatMul",
                  ("no ORT kernel reads packed signs; a custom-op library cannot be built from the pip wheel "
                   "(no C headers), so the stock graph keeps the file at packed size"), emit_liftquant),
    "int": ("com.microsoft.MatMulNBits", "ORT's native low-bit kernel (2/4/8 bits); 3-bit sites are refused",
            emit_int),
    "fp16": ("MatMul (fp16 weight cast to fp32)", "the plan left this site unquantized", emit_fp16),
}


def emit_linear(ctx: LayerContext, x: str, site: str, qt: QuantizedTensor, bias: np.ndarray | None = None) -> str:
    """y = x W^T (+ bias) for a quantized site, x float32 [B, S, in] -> [B, S, out]."""
    if qt.fmt not in LOWERINGS:
        raise ArtifactError(f"{site}: format {qt.fmt!r} has no ONNX Runtime lowering; known: {sorted(LOWERINGS)}")
    y = LOWERINGS[qt.fmt][2](ctx, x, site, qt)
    if bias is not None:
        y = ctx.b.op("Add", [y, _f32(ctx.b, f"{site}.bias", bias)], name=f"{site}/bias")
    return y


def describe(qt: QuantizedTensor) -> dict[str, str]:
    """The report entry of a site: how it was lowered."""
    lowering, why, _ = LOWERINGS[qt.fmt]
    return {"lowering": lowering, "why": why, "format": qt.fmt}
