"""Reading a saved `.mlpackage` back and checking it against its pack, without Core ML.

- `load_program`: spec (`MLModel(path, skip_model_load=True).get_spec()`) -> milproto load
  with the package's weight folder -> a pymil Program whose constants are numpy arrays.
- `check_weights`: every constant liftedge wrote is compared bit for bit with the pack's
  stored field (uint1 sign indices with the packed signs, the LUT with [-scale, +scale],
  int codes/scales/zero points, fp16 factors, norms, embedding); each constexpr is then
  decompressed and compared with the dense matrix its fields define.
- `check_structure`: inputs, states (the contract's names, dtypes, shapes), output, op counts
  per pattern.

Any difference raises `VerificationError` naming the constant. This module owns the
checks; the op patterns are `layers`, executing the program is `interpreter`.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import torch
from liftedge.targets.coreml import layers
from liftedge.targets.coreml.interpreter import blockwise_shift_scale, lut_to_dense

from liftedge.verify import VerificationError

WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"


def load_program(package: Path):
    """The program of a saved package, constants loaded from its weight files."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return load(spec, spec.specificationVersion, file_weights_dir=str(Path(package) / WEIGHTS_DIR))


def constexpr_storage(package: Path) -> dict[str, dict[str, str]]:
    """How each constexpr's inputs are stored in the spec: op name -> {input: "UINT1", ...}."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    fn = spec.mlProgram.functions["main"]
    out = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type.startswith("constexpr_"):
            out[op.outputs[0].name] = {
                k: MIL_pb2.DataType.Name(v.arguments[0].value.type.tensorType.dataType)
                for k, v in op.inputs.items()}
    return out


def check_storage(package: Path, qtensors: dict) -> dict[str, int]:
    """The ±1 indices are stored as UINT1 and int codes as UINT4/UINT8 (packed on disk)."""
    storage = constexpr_storage(package)
    want = {"liftquant": ("indices", lambda qt: "UINT1"), "int": ("data", lambda qt: f"UINT{qt.meta['bits']}")}
    for site, qt in qtensors.items():
        if qt.fmt not in want:
            continue
        field, dtype = want[qt.fmt]
        got = storage.get(layers.const_name(site, "weight"), {}).get(field)
        if got != dtype(qt):
            raise VerificationError(f"{site}: {field} stored as {got}, expected {dtype(qt)}")
    return {"constexpr_ops": len(storage)}


def ops_by_name(prog) -> dict[str, Any]:
    return {op.name: op for op in prog.functions["main"].operations}


def _same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != want.tobytes():
        raise VerificationError(f"{what}: the package's constant differs from the pack "
                                f"({got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)})")


def _const(ops: dict, name: str) -> np.ndarray:
    if name not in ops:
        raise VerificationError(f"the package has no constant {name!r}")
    return ops[name].outputs[0].val


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def check_liftquant(ops: dict, site: str, qt) -> int:
    from liftedge.targets.reference.liftquant import n_blocks

    from liftedge.bitpack import unpack_bits

    m = qt.meta
    op = ops.get(layers.const_name(site, "weight"))
    if op is None or op.op_type != "constexpr_lut_to_dense":
        raise VerificationError(f"{site}: no constexpr_lut_to_dense weight in the package")
    indices, lut = op.inputs["indices"].val, op.inputs["lut"].val
    width = n_blocks(m["in_features"], m["d"]) * m["D"]
    _same_bits(indices.astype(np.uint8), _np(unpack_bits(qt.tensors["signs"], 1, width)), f"{site} sign indices")
    _same_bits(lut, layers.sign_lut(_np(qt.tensors["scale"])), f"{site} LUT")
    signs = _np(unpack_bits(qt.tensors["signs"], 1, width)).astype(np.float16) * 2 - 1
    _same_bits(lut_to_dense(indices, lut), signs * _np(qt.tensors["scale"])[:, None], f"{site} decoded ±s matrix")
    for field in ("in_scale", "mix1", "mix2", "codebook"):
        _same_bits(_const(ops, layers.const_name(site, field)), _np(qt.tensors[field]), f"{site} {field}")
    _same_bits(_const(ops, layers.const_name(site, "block_scale")).reshape(-1), _np(qt.tensors["block_scale"]),
               f"{site} block_scale")
    return 6


def check_int(ops: dict, site: str, qt) -> int:
    from liftedge.targets.reference.integer import decode_int

    m = qt.meta
    op = ops.get(layers.const_name(site, "weight"))
    if op is None or op.op_type != "constexpr_blockwise_shift_scale":
        raise VerificationError(f"{site}: no constexpr_blockwise_shift_scale weight in the package")
    codes, _, zero = decode_int(qt)
    data, scale, offset = (op.inputs[k].val for k in ("data", "scale", "offset"))
    _same_bits(data.astype(np.uint8), layers.int_padded_codes(_np(codes), m["group_size"]), f"{site} codes")
    _same_bits(scale, _np(qt.tensors["scale"]), f"{site} scale")
    _same_bits(offset.astype(np.uint8), _np(zero).astype(np.uint8), f"{site} zero points")
    # The decoded fp16 matrix is the reference's fp32 dequantization rounded to fp16, which is
    # exactly what a fp16-output constexpr can hold: compare it bit for bit at fp16.
    dense = blockwise_shift_scale(data, scale, offset)[:, :m["in_features"]]
    from liftedge.targets.reference import get_format

    _same_bits(dense, _np(get_format("int").dequantize(qt)).astype(np.float16), f"{site} decoded int matrix")
    return 4


def check_weights(prog, tensors: dict[str, torch.Tensor], qtensors: dict, sites: dict[str, Any]) -> dict[str, Any]:
    """Compare every constant with the pack; returns counts of what was compared."""
    ops = ops_by_name(prog)
    compared = collections.Counter()
    for site, qt in qtensors.items():
        if qt.fmt == "liftquant":
            compared["liftquant_fields"] += check_liftquant(ops, site, qt)
        elif qt.fmt == "int":
            compared["int_fields"] += check_int(ops, site, qt)
        else:
            _same_bits(_const(ops, layers.const_name(site, "weight")), _np(qt.tensors["weight"]), f"{site} weight")
            compared["fp16_weights"] += 1
    fields = {f"{s}.{f}" for s, qt in qtensors.items() for f in qt.tensors}
    for name, t in tensors.items():
        if name in fields:
            continue
        site = name.removesuffix(".weight")
        key = layers.const_name(site, "weight") if site in sites else name.replace(".", "_")
        _same_bits(_const(ops, key).reshape(t.shape), _np(t), name)
        compared["plain_tensors"] += 1
    compared["sites"] = len(qtensors)
    return dict(compared)


def check_structure(prog, program_report: dict[str, Any], n_lq: int, n_int: int) -> dict[str, Any]:
    """Inputs, outputs, states (the swift-transformers contract) and op counts are what `program` writes."""
    from liftedge.targets.coreml.program import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

    from coremltools.converters.mil.mil import types

    fn = prog.functions["main"]
    layers_n = program_report["layers"]
    states = {n: v for n, v in fn.inputs.items() if types.is_state(v.sym_type)}
    problems = []
    if sorted(states) != sorted([KEY_CACHE, VALUE_CACHE]):
        problems.append(f"states {sorted(states)} != {[KEY_CACHE, VALUE_CACHE]}")
    shape = program_report["states"]["shape"]
    for name, var in states.items():
        wrapped = var.sym_type.wrapped_type()
        if list(wrapped.get_shape()) != shape or wrapped.get_primitive() != types.fp16:
            problems.append(f"state {name} is not fp16{shape}")
    inputs = {n: v for n, v in fn.inputs.items() if n not in states}
    want = {INPUT_IDS: (types.int32, 2), CAUSAL_MASK: (types.fp16, 4)}
    if set(inputs) != set(want):
        problems.append(f"inputs {sorted(inputs)} != {sorted(want)}")
    for name, (dtype, rank) in want.items():
        var = inputs.get(name)
        if var is not None and (var.dtype != dtype or var.rank != rank):
            problems.append(f"input {name} is {types.builtin_to_string(var.dtype)} rank {var.rank}, expected "
                            f"{types.builtin_to_string(dtype)} rank {rank}")
    if [v.name for v in fn.outputs] != [LOGITS]:
        problems.append(f"outputs {[v.name for v in fn.outputs]} != [{LOGITS!r}]")
    counts = collections.Counter(op.op_type for op in fn.operations)
    expect = {"constexpr_lut_to_dense": n_lq, "constexpr_blockwise_shift_scale": n_int,
              "read_state": 2 * layers_n, "coreml_update_state": 2 * layers_n, "softmax": layers_n}
    problems += [f"{k}: {counts.get(k, 0)} ops, expected {v}" for k, v in expect.items() if counts.get(k, 0) != v]
    if problems:
        raise VerificationError("the package's program is not what was written: " + "; ".join(problems))
    return {"opset": str(fn.opset_version), "op_counts": dict(sorted(counts.items())),
            "states": len(states), "state_shape": shape}


def _feature_ranges(feature) -> list[tuple[int, int]]:
    shape_range = feature.type.multiArrayType.shapeRange.sizeRanges
    return [(int(r.lowerBound), int(r.upperBound)) for r in shape_range]


def check_spec(package: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The saved spec's interface is the contract: feature names, dtypes, flexible ranges,
    state shapes, and the metadata the report records."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft
    from liftedge.targets.coreml.program import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

    desc = ct.models.MLModel(str(package), skip_model_load=True).get_spec().description
    rt, array = report["runtime"], ft.ArrayFeatureType
    t, e = (1, rt["max_prefill"]), (1, rt["max_context"])
    want_inputs = {INPUT_IDS: (array.INT32, [(1, 1), t]), CAUSAL_MASK: (array.FLOAT16, [(1, 1), (1, 1), t, e])}
    got_inputs = {f.name: (f.type.multiArrayType.dataType, _feature_ranges(f)) for f in desc.input}
    want_states = {n: (array.FLOAT16, report["program"]["states"]["shape"]) for n in (KEY_CACHE, VALUE_CACHE)}
    got_states = {f.name: (f.type.stateType.arrayType.dataType, list(f.type.stateType.arrayType.shape))
                  for f in desc.state}
    problems = []
    if got_inputs != want_inputs:
        problems.append(f"inputs {got_inputs} != {want_inputs}")
    if got_states != want_states:
        problems.append(f"states {got_states} != {want_states}")
    if [f.name for f in desc.output] != [LOGITS]:
        problems.append(f"outputs {[f.name for f in desc.output]} != [{LOGITS!r}]")
    metadata = dict(desc.metadata.userDefined)
    wrong = sorted(k for k, v in report["metadata"].items() if metadata.get(k) != v)
    if wrong:
        problems.append(f"metadata {wrong} differ from the report")
    if problems:
        raise VerificationError("the package's interface is not the stateful LLM contract: " + "; ".join(problems))
    return {"inputs": sorted(got_inputs), "states": sorted(got_states), "metadata_keys": len(report["metadata"])}
