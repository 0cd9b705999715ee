"""The reference formats: byte layouts, decoding, the Linear-like modules, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from liftedge.bitpack import packed_row_nbytes
from liftedge.errors import ArtifactError
from liftedge.targets.reference import FORMATS, Format, dequantize, get_format, make_module, register_format
from liftedge.targets.reference.fp16 import encode_fp16
from liftedge.targets.reference.integer import decode_int, encode_int
from liftedge.types import QuantizedTensor


def int_example(bits: int, out: int = 6, n: int = 10, group: int = 4, symmetric: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ng = -(-n // group)
    codes = torch.randint(0, 1 << bits, (out, n), generator=g)
    scale = (torch.rand(out, ng, generator=g) + 0.1).half().float()
    zero = torch.randint(0, 1 << bits, (out, ng), generator=g)
    return codes, scale, zero, encode_int(codes, scale, zero, bits, group, symmetric)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_module_computes_x_wt_plus_b(fmt):
    try:
        qt = get_format(fmt).example()
    except NotImplementedError:
        pytest.skip(f"format {fmt!r} defines no example() to test with")
    assert qt.fmt == fmt
    get_format(fmt).check(qt)
    w = dequantize(qt)
    bias = torch.randn(w.shape[0])
    x = torch.randn(3, 5, w.shape[1])
    module = make_module(qt, bias)
    # Same float32 product as F.linear: only the summation order may differ (1e-5 relative).
    # atol 1e-5: outputs are O(1) sums of O(1) terms, so a different order (the lift-project
    # path sums lifted terms, and its buffers are the example's own tensors, whose alignment
    # picks the BLAS code path) moves near-zero outputs by a few float32 ulps of the terms
    # (measured 4e-6); a wrong sign or scale moves them by O(1).
    torch.testing.assert_close(module(x), nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert module.in_features == w.shape[1] and module.out_features == w.shape[0]
    assert all(f"q_{f}" in module.state_dict() for f in qt.tensors)  # stored form kept
    assert make_module(qt, None)(x).shape == (3, 5, w.shape[0])


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_int_layout_decodes_to_the_documented_formula(bits):
    codes, scale, zero, qt = int_example(bits)
    # Field sizes from the layout table: codes and zeros packed at `bits`, fp16 scales.
    assert qt.tensors["codes"].shape == (6, packed_row_nbytes(10, bits))
    assert qt.tensors["zero"].shape == (6, packed_row_nbytes(3, bits))
    assert qt.tensors["scale"].dtype == torch.float16 and qt.tensors["scale"].shape == (6, 3)
    assert qt.nbytes == 6 * (packed_row_nbytes(10, bits) + 2 * 3 + packed_row_nbytes(3, bits))
    c, s, z = decode_int(qt)
    assert torch.equal(c.long(), codes) and torch.equal(z.long(), zero) and torch.equal(s, scale)
    cols = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # groups of 4, the last one of 2
    expected = (codes.float() - zero[:, cols].float()) * scale[:, cols]
    assert torch.equal(dequantize(qt), expected)


def test_int_bytes_are_lsb_first():
    # 3-bit codes 1, 2, 7: stream bits 100 010 111 -> byte 0 = 0b11010001, byte 1 = 0b1.
    qt = encode_int(torch.tensor([[1, 2, 7]]), torch.ones(1, 1), torch.zeros(1, 1), 3, 3)
    assert qt.tensors["codes"].tolist() == [[0b11010001, 0b1]]


def test_symmetric_int_has_implied_zero():
    codes, scale, _, qt = int_example(4, symmetric=True)
    assert set(qt.tensors) == {"codes", "scale"}
    cols = torch.arange(10) // 4
    assert torch.equal(dequantize(qt), (codes.float() - 8) * scale[:, cols])


def test_check_names_the_mismatch():
    qt = int_example(4)[3]
    bad = QuantizedTensor("int", {**qt.tensors, "scale": qt.tensors["scale"].float()}, qt.meta)
    with pytest.raises(ArtifactError, match="scale"):
        get_format("int").check(bad)
    with pytest.raises(ArtifactError, match="known formats"):
        get_format("nope")


def test_conv1d_site_keeps_its_calling_convention():
    from transformers.pytorch_utils import Conv1D

    qt = get_format("int").example()
    w = dequantize(qt)  # [out, in]
    conv = Conv1D(w.shape[0], w.shape[1])  # stores [in, out]
    with torch.no_grad():
        conv.weight.copy_(w.t())
    x = torch.randn(2, 4, w.shape[1])
    torch.testing.assert_close(make_module(qt, conv.bias)(x), conv(x), rtol=1e-5, atol=1e-6)


def test_fp16_format_round_trips_half_values():
    w = torch.randn(5, 7).half().float()
    assert torch.equal(dequantize(encode_fp16(w)), w)


def test_registering_a_format_is_one_decorator():
    try:
        @register_format("test-negated")
        class Negated(Format):
            def tensor_specs(self, meta):
                return {"w": (torch.float32, (meta["out_features"], meta["in_features"]))}

            def dequantize(self, qt):
                return -qt.tensors["w"]

        qt = QuantizedTensor("test-negated", {"w": torch.ones(2, 3)}, {"out_features": 2, "in_features": 3})
        assert torch.equal(make_module(qt, None)(torch.ones(1, 3)), torch.full((1, 2), -3.0))
        with pytest.raises(ValueError, match="already registered"):
            register_format("test-negated")(Negated)
    finally:
        FORMATS.pop("test-negated", None)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 8])
def test_bit_packing_round_trips_on_the_packed_device(nbits):
    from liftedge.bitpack import pack_bits, unpack_bits

    codes = torch.randint(0, 1 << nbits, (3, 13), generator=torch.Generator().manual_seed(nbits))
    packed = pack_bits(codes, nbits)
    assert torch.equal(unpack_bits(packed, nbits, 13), codes.to(torch.uint8))
    on_meta = unpack_bits(packed.to("meta"), nbits, 13)  # decoding stays where the bytes are
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 13)


def _examples() -> list[tuple[str, QuantizedTensor]]:
    g = torch.Generator().manual_seed(1)
    symmetric = encode_int(torch.randint(0, 4, (5, 9), generator=g), torch.rand(5, 3, generator=g) + 0.1,
                           torch.zeros(5, 3), bits=2, group_size=4, symmetric=True)
    return [(name, fmt.example()) for name, fmt in sorted(FORMATS.items())] + [("int", symmetric)]


def test_every_format_decodes_on_the_device_of_its_fields():
    # `plan --device cuda` crashed in the int decoder ("Expected all tensors to be on the same
    # device"): constants it made on the CPU met fields on the GPU. The `meta` device stands in
    # for any second device here: a CPU tensor mixed into a meta computation raises the same way.
    for name, qt in _examples():
        fmt = get_format(name)
        moved = QuantizedTensor(qt.fmt, {k: v.to("meta") for k, v in qt.tensors.items()}, dict(qt.meta))
        w = fmt.dequantize(moved)
        assert w.device.type == "meta" and w.shape == fmt.dequantize(qt).shape, name
        if name in ("fp16", "int"):  # the formats that can hold an embedding table
            rows = torch.tensor([[0, 2], [1, 1]])
            assert fmt.dequantize_rows(moved, rows).device.type == "meta", name


@pytest.mark.cuda
def test_formats_decode_on_cuda_as_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name, qt in _examples():
        fmt = get_format(name)
        on_gpu = QuantizedTensor(qt.fmt, {k: v.cuda() for k, v in qt.tensors.items()}, dict(qt.meta))
        # Same float32 arithmetic on another device: equal up to fused-multiply-add rounding.
        torch.testing.assert_close(fmt.dequantize(on_gpu).cpu(), fmt.dequantize(qt), rtol=1e-5, atol=1e-6)


def test_liftquant_sign_cache_budget(monkeypatch):
    """Past the process's sign-cache budget a layer unpacks on every call (what keeps a 3B
    plan's verification from holding ~9 GB of int8 signs) and computes the same output."""
    from liftedge.targets.reference import liftquant

    qt = get_format("liftquant").example()
    x = torch.randn(3, qt.meta["in_features"], generator=torch.Generator().manual_seed(0))
    cached = make_module(qt)
    y_cached = cached(x)
    assert cached.sign_matrix is not None
    monkeypatch.setattr(liftquant, "SIGN_CACHE_NBYTES", 0)
    uncached = make_module(qt)
    y1, y2 = uncached(x), uncached(x)
    assert uncached.sign_matrix is None
    assert torch.equal(y1, y_cached) and torch.equal(y2, y_cached)  # same ops, same order: exact


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_pass_decodes_by_rows_and_keeps_nothing(fmt, monkeypatch):
    """Under `one_pass()` (verification's single forward pass) a module decodes its weight per
    call, a few rows at a time, keeps nothing decoded, and computes what the cached module does."""
    from liftedge.targets.reference import registry

    qt = get_format(fmt).example()
    x = torch.randn(2, 3, qt.meta["in_features"], generator=torch.Generator().manual_seed(0))
    want = make_module(qt, None)(x)
    monkeypatch.setattr(registry, "DECODE_CHUNK_ROWS", 3)  # examples have a few rows: several chunks, one ragged
    module = make_module(qt, None)
    with registry.one_pass():
        got = module(x)
    assert registry.keeps_decoded()  # the mode ends with its block
    # nothing decoded is kept (DequantLinear's float32 weight, LiftLinear's unpacked signs)
    assert module._buffers.get("weight") is None and module._buffers.get("sign_matrix") is None
    # Row chunks change no row's own sum, only which rows a matmul call holds; the BLAS may
    # block a smaller matmul differently, so float32 summation order (1e-5 relative) may move.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
