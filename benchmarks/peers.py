"""Peer quantizers for the quality benchmark: what a user would otherwise pick, measured alike.

Owns running three third-party weight quantizers on the linear layers inside the decoder
blocks (`liftedge.quantize.default_sites`, the same sites as the liftedge rows; embeddings
and head stay fp16) and reading each one's result back as a dense weight plus the bytes its
own format stores:

  * `hqq`: the `hqq` package (Half-Quadratic Quantization), `HQQLinear` with
    `BaseQuantizeConfig(nbits, group_size, axis)`; bytes = packed `W_q` + every tensor in its
    meta (fp16 scale and zero per group), as HQQ keeps them.
  * `ort`: ONNX Runtime's `MatMulNBitsQuantizer` (algorithms DEFAULT = RTN in C++, RTN and
    k_quant from its bundled neural-compressor code, HQQ). Each weight is put in a one-node
    MatMul graph, quantized, and the MatMulNBits initializers (packed B, scales, zero points)
    are dequantized with numpy as the MatMulNBits contrib-op spec says
    (`dequantize_matmulnbits`); bytes = those initializers as stored.
  * `palettize`: coremltools' k-means palettization (`PostTrainingPalettizer`, optimal 1-D
    k-means from kmeans1d) per tensor or per group of output channels; bytes = n_bits per
    index (packed) + fp16 LUT entries (+ fp16 per-channel scales when `scale=1`), as
    Core ML's constexpr_lut_to_dense stores them.

Does not own evaluation or the table (benchmarks/quality.py). Works with weights on any
device: numpy / k-means steps run on CPU copies, results come back on the weight's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from liftedge.model import set_site_weight, site_weight
from liftedge.quantize import default_sites

METHODS = ("hqq", "ort", "palettize")


@dataclass
class PeerTensor:
    """A peer's result for one site: dense dequantized weight [out, in] and its stored bytes."""

    weight: torch.Tensor
    nbytes: int
    fields: dict[str, int] = field(default_factory=dict)  # stored bytes by field name


def _nbytes(t) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else int(t.nbytes)


# ---------------------------------------------------------------- hqq (the hqq package)


def hqq_quantize(w: torch.Tensor, bits: int, group: int, axis: int = 1) -> PeerTensor:
    """HQQ (hqq package) of `w` [out, in]: fp16 model, fp16 scale/zero per group, its own bit packing."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    dev = w.device
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=dev, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis)
    hq = HQQLinear(lin, cfg, compute_dtype=torch.float16, device=str(dev), initialize=True, del_orig=True)
    fields = {"W_q": _nbytes(hq.W_q)}
    fields.update({k: _nbytes(v) for k, v in hq.meta.items() if isinstance(v, torch.Tensor)})
    weight = hq.dequantize().reshape(w.shape).to(device=dev, dtype=torch.float32)
    return PeerTensor(weight, sum(fields.values()), fields)


# ---------------------------------------------------------------- ort (MatMulNBitsQuantizer)

_ORT_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def _ort_config(algo: str, bits: int, block: int, symmetric: bool):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algo == "default":
        return mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    if algo == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    if bits != 4:
        raise ValueError(f"ort algo={algo} quantizes at 4 bits only (its node config is fixed to 4)")
    if algo == "rtn":
        return mnq.RTNWeightOnlyQuantConfig()
    if algo == "kquant":
        return mnq.KQuantWeightOnlyQuantConfig()
    raise ValueError(f"unknown ort algo {algo!r}; one of default, rtn, kquant, hqq")


def matmul_graph(w_kn: np.ndarray):
    """A one-node ONNX graph Y = A @ W with W [K, N] an initializer (the form the quantizer rewrites)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dt = TensorProto.FLOAT16 if w_kn.dtype == np.float16 else TensorProto.FLOAT
    k, n = w_kn.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "peer",
                              [helper.make_tensor_value_info("A", dt, [None, k])],
                              [helper.make_tensor_value_info("Y", dt, [None, n])],
                              [numpy_helper.from_array(w_kn, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def ort_quantize_model(w: torch.Tensor, algo: str, bits: int, block: int, symmetric: bool = False,
                       dtype: str = "fp16"):
    """Run MatMulNBitsQuantizer on the one-node graph of `w` [out, in]; the quantized ModelProto."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    k_blocks = -(-w.shape[1] // block)
    if algo in ("rtn", "kquant") and k_blocks % 2:
        # onnxruntime 1.31's neural-compressor path packs 4-bit zero points over the whole
        # tensor, not row by row, and fails reshaping them when a row has an odd block count.
        raise ValueError(f"ort algo={algo}: in_features {w.shape[1]} / block {block} gives {k_blocks} blocks "
                         "per row; onnxruntime's RTN/k_quant path fails on an odd count (zero-point packing "
                         "bug); pick a block that gives an even count (SmolLM2: block=32)")
    w_kn = w.detach().float().cpu().numpy().T.astype(_ORT_DTYPES[dtype])
    cfg = _ort_config(algo, bits, block, symmetric)
    q = MatMulNBitsQuantizer(matmul_graph(np.ascontiguousarray(w_kn)), bits=bits, block_size=block,
                             is_symmetric=symmetric, algo_config=cfg)
    q.process()
    return q.model.model


def _unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., m] -> uint8 [..., m * 8/bits], element j of a byte in bits [j*bits, (j+1)*bits)."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantize_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                           k: int, n: int, bits: int, block: int) -> np.ndarray:
    """Dense W^T [N, K] (float32) of a com.microsoft MatMulNBits node, as its spec says.

    B: uint8 [N, k_blocks, blob] with blob = block*bits/8, element j of a byte in its bits
    [j*bits, (j+1)*bits). scales: [N * k_blocks]. zero_points: absent (2^(bits-1)), uint8
    packed like B per row of N ([N, ceil(k_blocks*bits/8)]), or of the scales' float type
    ([N * k_blocks], unpacked). W[n, k] = (q - zp) * scale of the block of k.
    """
    k_blocks = -(-k // block)
    q = _unpack_low_first(b.reshape(n, k_blocks, block * bits // 8), bits).astype(np.float32)
    s = scales.reshape(n, k_blocks).astype(np.float32)
    if zero_points is None:
        z = np.full((n, k_blocks), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        z = _unpack_low_first(zero_points.reshape(n, -1), bits)[:, :k_blocks].astype(np.float32)
    else:
        z = zero_points.reshape(n, k_blocks).astype(np.float32)
    w = (q - z[..., None]) * s[..., None]
    return w.reshape(n, k_blocks * block)[:, :k]


def read_matmulnbits(model) -> tuple[np.ndarray, dict[str, int]]:
    """(dense W^T [N, K] float32, stored bytes by initializer) of the single MatMulNBits node of `model`."""
    from onnx import helper, numpy_helper

    (node,) = [nd for nd in model.graph.node if nd.op_type == "MatMulNBits"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    b, scales = inits[node.input[1]], inits[node.input[2]]
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    fields = {name: int(inits[name].nbytes) for name in node.input[1:] if name}
    w = dequantize_matmulnbits(b, scales, zp, attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"])
    return w, fields


def ort_quantize(w: torch.Tensor, algo: str, bits: int, block: int, symmetric: bool = False,
                 dtype: str = "fp16") -> PeerTensor:
    """`w` [out, in] through MatMulNBitsQuantizer and back: dense weight + initializer bytes."""
    model = ort_quantize_model(w, algo, bits, block, symmetric, dtype)
    dense, fields = read_matmulnbits(model)
    weight = torch.from_numpy(np.ascontiguousarray(dense)).to(w.device)
    return PeerTensor(weight, sum(fields.values()), fields)


# ---------------------------------------------------------------- palettize (coremltools k-means)


def palettize_quantize(w: torch.Tensor, bits: int, group: int | None = None, scale: bool = False) -> PeerTensor:
    """coremltools PostTrainingPalettizer on `w` [out, in]: per-tensor LUT, or one per `group` output channels."""
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
    )

    out_f, in_f = w.shape
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w.detach().float().cpu())
    cfg = {"n_bits": bits, "enable_per_channel_scale": scale}
    if group:
        cfg.update(granularity="per_grouped_channel", group_size=group, channel_axis=0)
    palettized = PostTrainingPalettizer(nn.Sequential(lin), PostTrainingPalettizerConfig.from_dict(
        {"global_config": cfg})).compress(num_kmeans_workers=1)[0]
    lut = palettized.state_dict()["_COREML_/weight/lut"]
    n_luts = lut.numel() // (2 ** bits)  # LUT entries are scalars (cluster_dim 1)
    fields = {"indices": math.ceil(w.numel() * bits / 8), "lut_fp16": 2 * n_luts * 2 ** bits}
    if scale:
        fields["per_channel_scale_fp16"] = 2 * out_f
    weight = palettized.weight.detach().float().to(w.device)
    return PeerTensor(weight, sum(fields.values()), fields)


# ---------------------------------------------------------------- model level


def _site_fn(method: str, opts: dict[str, str]):
    bits = int(opts.get("bits", 4))
    if method == "hqq":
        group, axis = int(opts.get("group", 64)), int(opts.get("axis", 1))
        return lambda w: hqq_quantize(w, bits, group, axis)
    if method == "ort":
        algo, block = opts.get("algo", "default"), int(opts.get("block", 32))
        sym, dtype = opts.get("sym", "0") in ("1", "true"), opts.get("dtype", "fp16")
        _ort_config(algo, bits, block, sym)  # bad options fail before any work
        return lambda w: ort_quantize(w, algo, bits, block, sym, dtype)
    if method == "palettize":
        group = int(opts["group"]) if opts.get("group") else None
        scale = opts.get("scale", "0") in ("1", "true")
        return lambda w: palettize_quantize(w, bits, group, scale)
    raise ValueError(f"unknown peer method {method!r}; one of {METHODS}")


@torch.no_grad()
def peer_qtensors(model, method: str, opts: dict[str, str]) -> dict[str, PeerTensor]:
    """Site name -> PeerTensor for every default site (linears in decoder blocks) of `model`."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    fn = _site_fn(method, opts)
    return {s.name: fn(site_weight(model, s)) for s in default_sites(model)}


@torch.no_grad()
def apply_peer(model: nn.Module, qtensors: dict[str, PeerTensor]) -> None:
    """Write the peer's dense weights into `model` in place (the float model then evaluates them)."""
    by_name = {s.name: s for s in default_sites(model)}
    for name, pt in qtensors.items():
        set_site_weight(model, by_name[name], pt.weight)


def peer_totals(model: nn.Module, qtensors: dict[str, PeerTensor]) -> dict:
    """Byte accounting like a liftedge pack's totals: linears as the peer stores them, the rest fp16."""
    sites = default_sites(model)
    linear_numel = sum(s.numel for s in sites)
    linear_nbytes = sum(qtensors[s.name].nbytes for s in sites)
    site_params = {id(model.get_submodule(s.name).weight) for s in sites}
    other = sum(p.numel() for p in model.parameters() if id(p) not in site_params)  # tied weights once
    return {"bits_per_weight": round(8 * linear_nbytes / linear_numel, 6), "linear_nbytes": linear_nbytes,
            "nbytes": linear_nbytes + 2 * other}


def series_name(method: str, opts: dict[str, str]) -> str:
    """The Pareto series of a peer config (one line per algorithm and grouping)."""
    if method == "hqq":
        return f"HQQ (hqq pkg) g{opts.get('group', 64)}"
    if method == "ort":
        algo = {"default": "RTN", "rtn": "RTN-INC", "kquant": "k-quant", "hqq": "HQQ"}[opts.get("algo", "default")]
        return f"ORT MatMulNBits {algo} b{opts.get('block', 32)}"
    if method == "palettize":
        return "Core ML palettize " + (f"g{opts['group']}" if opts.get("group") else "per-tensor")
    raise ValueError(f"unknown peer method {method!r}")


NOTE = ("peer: float model evaluated with the peer's dequantized weights in the decoder linears "
        "(no liftedge pack); bytes as the peer's format stores them, the rest fp16")
