"""Core ML target: op patterns through real coremltools save + read-back, interpreted builds.

Core ML cannot execute on Linux: every numeric check here runs the program *read back from
the saved .mlpackage* (`readback.load_program`) with the numpy interpreter, against the
PyTorch reference (`targets/reference`). Thresholds are relative errors; each says why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from conftest import make_tiny_pack
from liftedge.targets.coreml import layers, lower, package, parse_options, program, readback, residency
from liftedge.targets.coreml.interpreter import Interpreter
from liftedge.targets.coreml.runtime import causal_mask
from liftedge.targets.reference.integer import IntFormat, encode_int
from liftedge.targets.reference.liftquant import (
    LiftLinear,
    LiftQuantFormat,
    encode_liftquant,
)

from liftedge.errors import ArtifactError
from liftedge.lowering import build_artifact
from liftedge.verify import VerificationError

# One op pattern in fp32 (read back, interpreted) vs the fp32 PyTorch reference: only the
# summation order of matmuls differs, a few ulps; 1e-5 leaves a wide margin while a wrong
# bit order, sign, transpose or block layout gives errors of order 1.
PATTERN_RTOL = 1e-5
# A whole tiny model: fp32 compute with an fp16 KV cache (Core ML states are fp16 only);
# observed 1e-4 to 2e-4 on the tiny families. 1e-3 keeps a 5x margin, far below what any
# lowering bug produces.
MODEL_RTOL = 1e-3
BUILD = {"max_context": 64, "max_prefill": 16, "verify_tokens": 8}


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def roundtrip(tmp_path: Path, main, specs: dict, inputs=None):
    """Build a one-function program, save it as .mlpackage, read it back: (program, interpreter)."""
    path = package.save_mlpackage(program._program(main, specs), tmp_path / "p.mlpackage", inputs)
    prog = readback.load_program(path)
    return prog, Interpreter(prog)


def x_spec(n: int, T: int = 3):
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    return {"x": mb.TensorSpec((1, T, n), dtype=types.fp32)}


def lq_example(in_features: int, n1: int, D: int, d: int, out: int = 5) -> object:
    g = torch.Generator().manual_seed(in_features)
    nb = -(-in_features // d)
    rand = lambda *s: torch.rand(*s, generator=g) + 0.5
    signs = torch.randint(0, 2, (out, nb * D), generator=g) * 2 - 1
    return encode_liftquant(signs, rand(out), rand(in_features), torch.randn(n1, n1, generator=g),
                            torch.randn(in_features // n1, in_features // n1, generator=g), rand(nb),
                            torch.randn(d, D, generator=g))


@pytest.mark.parametrize("qt", [LiftQuantFormat().example(), lq_example(12, 3, 6, 4), lq_example(20, 4, 24, 10)],
                         ids=["lq5-2_in7", "lq6-4_in12", "lq24-10_in20"])
def test_liftquant_pattern_roundtrip(tmp_path, qt):
    """Transform + lift + 1-bit palettized ±s matrix equals LiftLinear; every constant bit-exact."""
    bias = torch.randn(qt.meta["out_features"])
    x = np.random.default_rng(0).standard_normal((1, 3, qt.meta["in_features"])).astype(np.float32)

    def main(x_var):
        w = program.Weights({"s.bias": bias.half()}, {"s": qt})
        return w.linear(x_var, "s")

    prog, run = roundtrip(tmp_path, main, x_spec(qt.meta["in_features"]))
    want = LiftLinear(qt, bias.half().float())(torch.from_numpy(x)).detach().numpy()
    assert rel(run(x=x)[0], want) < PATTERN_RTOL
    ops = readback.ops_by_name(prog)
    assert readback.check_liftquant(ops, "s", qt) == 6
    storage = readback.constexpr_storage(tmp_path / "p.mlpackage")[layers.const_name("s", "weight")]
    assert storage == {"indices": "UINT1", "lut": "FLOAT16"}  # 1 bit per sign on disk, not widened


@pytest.mark.parametrize("bits,in_features,group", [(4, 10, 4), (8, 12, 4), (4, 64, 32)])
def test_int_pattern_roundtrip(tmp_path, bits, in_features, group):
    """int4/int8 via constexpr_blockwise_shift_scale (ragged groups padded) equals dequantize."""
    g = torch.Generator().manual_seed(bits)
    ng = -(-in_features // group)
    qt = encode_int(torch.randint(0, 1 << bits, (6, in_features), generator=g), torch.rand(6, ng, generator=g) + 0.1,
                    torch.randint(0, 1 << bits, (6, ng), generator=g), bits=bits, group_size=group)
    x = np.random.default_rng(1).standard_normal((1, 3, in_features)).astype(np.float32)
    prog, run = roundtrip(tmp_path, lambda v: program.Weights({}, {"s": qt}).linear(v, "s"), x_spec(in_features))
    # The constexpr yields fp16 (the fp32 dequantization rounded once): compare with that.
    want = x @ IntFormat().dequantize(qt).half().float().numpy().T
    assert rel(run(x=x)[0], want) < PATTERN_RTOL
    assert readback.check_int(readback.ops_by_name(prog), "s", qt) == 4
    assert readback.check_storage(tmp_path / "p.mlpackage", {"s": qt}) == {"constexpr_ops": 1}


def test_fp16_norm_rope_patterns(tmp_path):
    """fp16 linear ([out, in] and Conv1D [in, out]), RMSNorm, LayerNorm, gelu_new and rotary
    embedding against their PyTorch formulas."""
    from coremltools.converters.mil.mil import Builder as mb

    rng = np.random.default_rng(2)
    wt = torch.randn(4, 8).half()
    norm_w = rng.standard_normal(8).astype(np.float32)
    cos, sin = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)

    def main(x):
        lin = layers.linear(x, layers.fp16_weight("w", wt))
        norm = layers.rms_norm(x, norm_w, 1e-5)
        rot = layers.rotate(mb.reshape(x=x, shape=[1, 1, 3, 8]), cos, sin, 8)
        conv1d = layers.linear(x, layers.fp16_weight("c", wt.T.contiguous()), transposed=True)
        ln = layers.layer_norm(x, norm_w, -norm_w, 1e-5)
        return lin, norm, rot, conv1d, ln, mb.gelu(x=x, mode="TANH_APPROXIMATION")

    _, run = roundtrip(tmp_path, lambda x: list(main(x)), x_spec(8))
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    lin, norm, rot, conv1d, ln, gelu = run(x=x)
    tx = torch.from_numpy(x)
    assert rel(conv1d, x @ wt.float().numpy().T) < PATTERN_RTOL
    want_ln = torch.nn.functional.layer_norm(tx, (8,), torch.from_numpy(norm_w), -torch.from_numpy(norm_w), 1e-5)
    assert rel(ln, want_ln.numpy()) < PATTERN_RTOL
    assert rel(gelu, torch.nn.functional.gelu(tx, approximate="tanh").numpy()) < PATTERN_RTOL
    assert rel(lin, x @ wt.float().numpy().T) < PATTERN_RTOL
    want_norm = norm_w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    assert rel(norm, want_norm) < PATTERN_RTOL
    half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    assert rel(rot.reshape(1, 3, 8), x * cos + half * sin) < PATTERN_RTOL


def test_state_cache_and_mask_roundtrip(tmp_path):
    """The stacked fp16 state persists across calls; a block writes only its own layer, at
    positions E - T .. E - 1 (E = causalMask's last dimension); the mask adds the caller's
    causalMask to the program's own causal / sliding-window mask over positions 0..E-1."""
    from coremltools.converters.mil.mil import Builder as mb

    s = program.Shapes(2, 4, 1, 1, 4, 10, 1e-5, max_context=6, max_prefill=4)
    specs = program.io_specs(s)

    def main(ids, mask, key_cache, value_cache):
        pos = program.Positions(ids, mask, s, np.ones(2, np.float32), 1.0)
        new = mb.mul(x=mb.reshape(x=mb.cast(x=ids, dtype="fp32"), shape=[1, 1, -1, 1]), y=np.ones((1, 1, 1, 4), np.float32))
        seen = program._write_cache(key_cache, new, pos, s, 1)
        program._write_cache(value_cache, new, pos, s, 0)
        return [seen, mb.read_state(input=key_cache), pos.mask(None), pos.mask(2), pos.mask(None, 3)]

    import coremltools as ct

    inputs = [ct.TensorType(program.INPUT_IDS, shape=(1, ct.RangeDim(1, 4)), dtype=np.int32),
              ct.TensorType(program.CAUSAL_MASK, shape=(1, 1, ct.RangeDim(1, 4), ct.RangeDim(1, 6)), dtype=np.float16)]
    _, run = roundtrip(tmp_path, main, specs, inputs)
    run(inputIds=np.array([[1, 2]], np.int32), causalMask=causal_mask(2, 0))
    zeros = np.zeros((1, 1, 1, 3), np.float16)  # swift-transformers passes an all-zero mask
    seen, state, mask, window, grouped = run(inputIds=np.array([[3]], np.int32), causalMask=zeros)
    assert seen.shape == (1, 1, 3, 4) and state.shape == (2, 1, 1, 6, 4)
    assert state[1, 0, 0, :, 0].tolist() == [1, 2, 3, 0, 0, 0]  # first call survived the second
    assert not state[0].any()  # layer 0's slice untouched by layer 1's write
    assert run.states["valueCache"][0, 0, 0, :, 0].tolist() == [1, 2, 3, 0, 0, 0]
    assert not run.states["valueCache"][1].any()
    assert (mask == 0).tolist() == [[True, True, True]]
    assert (window == 0).tolist() == [[False, True, True]]
    assert grouped.shape == (3, 3) and (grouped == mask).all()  # one row per query head of a kv group
    # A two-token chunk at position 3: rows see 0..3 and 0..4; a caller's -inf column adds on top.
    given = causal_mask(2, 3)
    given[..., 0] = -np.inf
    *_, mask, window, _ = run(inputIds=np.array([[4, 5]], np.int32), causalMask=given)
    assert (mask == 0).tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert (window == 0).tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def _check_report(report: dict) -> None:
    v = report["verification"]
    assert v["passed"] and v["greedy_tokens_equal"]
    assert v["prompt_logits_rel_error"] < MODEL_RTOL and v["decode_logits_max_rel_error"] < MODEL_RTOL
    assert v["weights_bit_exact"]["sites"] == len(report["pack"]["site_formats"])
    assert set(report["sites"]) >= set(report["pack"]["site_formats"])
    # Weight file vs the pack's tensor bytes: 64-byte aligned blobs with headers cost more on a
    # model this small (~8-12%); on SmolLM2 it is < 1%.
    assert report["sizes"]["weight_file_over_pack"] < 1.2


def test_tiny_llama_build_verifies(tiny_lq_pack, tmp_path):
    """Verified build; its spec is the stateful contract swift-transformers' `LanguageModel`
    drives (names, dtypes, flexible ranges, stacked states, metadata keys)."""
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft

    report = build_artifact(tiny_lq_pack, "coreml", tmp_path / "art", options=BUILD)
    _check_report(report)
    assert {s["format"] for s in report["sites"].values()} == {"liftquant", "fp16"}  # fp16: the tied head
    on_disk = json.loads((tmp_path / "art" / "report.json").read_text())
    assert on_disk["verification"]["structure"]["states"] == 2
    desc = ct.models.MLModel(str(tmp_path / "art" / program.PACKAGE_NAME), skip_model_load=True).get_spec().description
    inputs = {f.name: f.type.multiArrayType for f in desc.input}
    assert list(inputs) == ["inputIds", "causalMask"]
    assert inputs["inputIds"].dataType == ft.ArrayFeatureType.INT32
    assert inputs["causalMask"].dataType == ft.ArrayFeatureType.FLOAT16
    ranges = lambda t: [(r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges]
    assert ranges(inputs["inputIds"]) == [(1, 1), (1, 16)]  # T up to max_prefill
    assert ranges(inputs["causalMask"]) == [(1, 1), (1, 1), (1, 16), (1, 64)]  # E up to max_context
    # [layers, batch, kv_heads, context, head_dim] of the tiny llama (2 layers, 2 kv heads of 16)
    states = {f.name: (list(f.type.stateType.arrayType.shape), f.type.stateType.arrayType.dataType) for f in desc.state}
    assert states == {n: ([2, 1, 2, 64, 16], ft.ArrayFeatureType.FLOAT16) for n in ("keyCache", "valueCache")}
    assert [f.name for f in desc.output] == ["logits"]
    meta = dict(desc.metadata.userDefined)
    assert meta["co.huggingface.exporters.task"] == "text-generation"
    assert meta["co.huggingface.exporters.architecture"] == "LlamaForCausalLM"
    assert {"co.huggingface.exporters.name", "co.huggingface.exporters.framework",
            "co.huggingface.exporters.precision"} <= set(meta)
    assert meta["liftedge.compute_units"] == "cpuAndNeuralEngine" == report["residency"]["compute_units"]
    assert meta["liftedge.max_context"] == "64" and meta["liftedge.max_prefill"] == "16"
    assert meta["liftedge.eos_token_ids"] == "0"  # the tiny config's eos_token_id
    assert (tmp_path / "art" / "tokenizer.json").is_file()  # what a Swift runner's tokenizer loads
    # An all-zero causalMask (what swift-transformers' stateful runner passes) gives the same
    # logits as the triangular one: the program masks causally itself.
    run = Interpreter(readback.load_program(tmp_path / "art" / program.PACKAGE_NAME))
    ids = np.array([[5, 7, 9, 11]], np.int32)
    tri = run(inputIds=ids, causalMask=causal_mask(4, 0))[0]
    run.reset()
    flat = run(inputIds=ids, causalMask=np.zeros((1, 1, 4, 4), np.float16))[0]
    assert np.array_equal(tri, flat)  # masked scores underflow to exactly 0 either way


def test_mixed_pack_build_verifies(tmp_path):
    """int4 sites (blockwise_shift_scale) and two LiftQuant rates in one program."""
    pack = make_tiny_pack("llama", tmp_path / "pack", mixed=True)
    report = build_artifact(pack, "coreml", tmp_path / "art", options=BUILD)
    _check_report(report)
    lowerings = {s["format"]: s["lowering"] for s in report["sites"].values()}
    assert "constexpr_blockwise_shift_scale" in lowerings["int"]
    assert report["verification"]["weights_bit_exact"]["int_fields"] > 0


@pytest.mark.parametrize("family,option", [("qwen3", "int8-g64"), ("llama", "int4-g32")])
def test_int_embedding_and_head_build_verifies(family, option, tmp_path):
    """The table as one constexpr_blockwise_shift_scale: gathered from, and (tied) the head's matrix."""
    pack = make_tiny_pack(family, tmp_path / "pack", mixed=True, embedding=option)
    report = build_artifact(pack, "coreml", tmp_path / "art", options=BUILD)
    _check_report(report)
    emb, head = report["sites"]["model.embed_tokens"], report["sites"]["lm_head"]
    assert emb["format"] == head["format"] == "int"
    assert emb["lowering"].startswith("gather from constexpr_blockwise_shift_scale")
    assert ("tied" in head["lowering"]) == (family == "qwen3")
    # one constexpr per stored int site: the tied head adds none (checked by the read-back too)
    n_int = sum(1 for e in json.loads((pack / "manifest.json").read_text())["sites"].values() if e["fmt"] == "int")
    ops = report["verification"]["structure"]["op_counts"]
    assert ops["constexpr_blockwise_shift_scale"] == n_int


def test_resident_bytes_per_compute_units():
    """Resident weight bytes where Core ML decompresses at load, against hand arithmetic."""
    lq = lq_example(20, 4, 24, 10)  # 5 rows, in 20 -> 2 blocks of d=10 -> lifted width 2 x 24 = 48
    g = torch.Generator().manual_seed(4)
    int4 = encode_int(torch.randint(0, 16, (6, 10), generator=g), torch.rand(6, 3, generator=g) + 0.1,
                      torch.randint(0, 16, (6, 3), generator=g), bits=4, group_size=4)
    # LiftQuant: dense ±s matrix 5 x 48 fp16 = 480 B replaces packed signs 5 x 48 / 8 = 30 B and
    # scales 5 x 2 = 10 B: +440. It is 2.4x the layer's own fp16 matrix (5 x 20 x 2 = 200 B).
    assert residency.site_nbytes(lq) == (40, 480) and 480 / (5 * 20 * 2) == 2.4
    # int4 group 4, in 10 -> 12 padded columns: dense 6 x 12 x 2 = 144 B replaces codes 6 x 5 B,
    # scales 6 x 3 fp16 = 36 B and zero points 6 x 2 B (two 4-bit per byte): 30 + 36 + 12 = 78 B: +66.
    assert residency.site_nbytes(int4) == (78, 144)
    q = {"a": lq, "b": int4}
    want = {"cpuAndNeuralEngine": 1000, "cpuAndGPU": 1000 + 440, "cpuOnly": 1000 + 440 + 66, "all": 1000 + 440 + 66}
    assert {u: residency.resident_nbytes(1000, q, u) for u in residency.COMPUTE_UNITS} == want
    report = residency.residency_report(1000, q, "cpuAndGPU")
    assert report["compute_units"] == "cpuAndGPU" and report["resident_weight_nbytes"] == want
    assert "not measured" in report["source"]
    with pytest.raises(ArtifactError, match="cpuAndNeuralEngine, cpuAndGPU, cpuOnly, all"):
        residency.resident_nbytes(1000, q, "gpu")


def test_compute_units_option(tiny_lq_pack, tmp_path):
    """--compute-units reaches the package metadata and the report; unknown names are refused."""
    import coremltools as ct

    report = lower(tiny_lq_pack, tmp_path, {**BUILD, "compute_units": "cpuAndGPU"})
    spec = ct.models.MLModel(str(tmp_path / program.PACKAGE_NAME), skip_model_load=True).get_spec()
    assert spec.description.metadata.userDefined["liftedge.compute_units"] == "cpuAndGPU"
    assert report["runtime"]["compute_units"] == report["residency"]["compute_units"] == "cpuAndGPU"
    resident = report["residency"]["resident_weight_nbytes"]
    # every site of the tiny pack is LQ-24/10 (in 64 or 96 -> widths 7 x 24 and 10 x 24, i.e. >=
    # 2.4x fp16) so where the GPU decompresses them the weights take more than twice the stored bytes
    assert resident["cpuAndGPU"] > 2 * resident["cpuAndNeuralEngine"]
    assert resident["cpuAndNeuralEngine"] == report["sizes"]["pack_tensor_nbytes"]
    with pytest.raises(ArtifactError, match="compute units 'ane' unknown"):
        parse_options({"compute_units": "ane"})


def test_memory_plan_records_compute_units(tiny_lq_pack, tmp_path, capsys):
    """The memory model says which compute units a Core ML budget assumes; a pack whose
    weights, as resident on the chosen units, exceed the budget is refused before lowering."""
    from conftest import tiny_config
    from liftedge.cli import main
    from liftedge.device import load_device
    from liftedge.memory import ModelDims, budget_breakdown
    from liftedge.packed import read_manifest, read_quantized, read_weights

    from liftedge.errors import BudgetError, LiftedgeError

    dims, ios = ModelDims.from_config(tiny_config("llama")), load_device("ios", "6GB")
    ne = budget_breakdown(ios, dims)  # ios -> Core ML, the Neural Engine by default
    assert ne.compute_units == "cpuAndNeuralEngine" and "kept compressed" in ne.terms()[-1][0]
    gpu = budget_breakdown(ios, dims, compute_units="cpuAndGPU")
    assert gpu.compute_units == "cpuAndGPU" and "fp16 at load" in gpu.terms()[-1][0]
    assert gpu.to_dict()["compute_units"] == "cpuAndGPU"
    with pytest.raises(LiftedgeError, match="Core ML only"):
        budget_breakdown(ios, dims, runtime="executorch", compute_units="cpuAndGPU")
    manifest = read_manifest(tiny_lq_pack)
    stored = int(manifest["totals"]["nbytes"])
    on_gpu = residency.resident_nbytes(stored, read_quantized(tiny_lq_pack, manifest, read_weights(tiny_lq_pack)),
                                       "cpuAndGPU")
    memory = {"weight_budget_nbytes": (stored + on_gpu) // 2, "unquantized_nbytes": 0}  # fits compressed only
    assert residency.require_resident_fit(tiny_lq_pack, None, memory) == stored
    with pytest.raises(BudgetError, match="on Core ML cpuAndGPU the weights are resident"):
        residency.require_resident_fit(tiny_lq_pack, "cpuAndGPU", memory)
    code = main(["build", str(tiny_lq_pack), "--target", "android", "--ram", "8GB", "--compute-units", "cpuAndGPU",
                 "--seq-len", "64", "-o", str(tmp_path / "out")])
    assert code == 2 and "Core ML builds only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _package_digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_package_bytes_are_deterministic(tiny_lq_pack, tmp_path):
    """Same pack -> identical package (weight blob, spec and Manifest.json)."""
    digests = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        out.mkdir()
        lower(tiny_lq_pack, out, BUILD)
        digests.append(_package_digest(out))
    assert digests[0] == digests[1]


def test_wrong_constant_fails_verification(tiny_lq_pack, tmp_path, monkeypatch):
    """A package whose LUT disagrees with the pack is refused (VerificationError)."""
    from liftedge.targets.coreml import verify

    real = layers.sign_lut
    monkeypatch.setattr(layers, "sign_lut", lambda scale: real(np.asarray(scale) * np.float16(1.5)))
    report = lower(tiny_lq_pack, tmp_path, BUILD)
    monkeypatch.setattr(layers, "sign_lut", real)
    with pytest.raises(VerificationError, match="LUT"):
        verify(tmp_path, tiny_lq_pack, report, BUILD)


def test_unsupported_inputs_fail_clearly(tiny_lq_pack, tmp_path):
    with pytest.raises(ArtifactError, match="unknown coreml option"):
        parse_options({"bogus": 1})
    with pytest.raises(ArtifactError, match="must be an integer"):
        parse_options({"max_context": "lots"})
    with pytest.raises(ArtifactError, match=">= 1"):
        parse_options({"verify_tokens": 0})
    # A family the target does not lower: same pack files, config says phi3.
    fake = tmp_path / "phi3-pack"
    shutil.copytree(tiny_lq_pack, fake)
    config = json.loads((fake / "config.json").read_text())
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (fake / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="'phi3' \\(not supported yet\\)"):
        lower(fake, tmp_path / "out", {})
    int3 = IntFormat().example()  # 3-bit codes: no Core ML constexpr takes them
    with pytest.raises(ArtifactError, match="int3 weights have no Core ML lowering"):
        program._program(lambda x: program.Weights({}, {"s": int3}).linear(x, "s"), x_spec(10))


@pytest.mark.parametrize("family", sorted(set(program.FAMILIES) - {"llama"}))
def test_every_family_has_the_contract(family, tmp_path):
    """Each family's package has the stateful contract (inputs, stacked states, logits,
    metadata), read back from the saved spec and program. One quantized site keeps the pack
    quick; the full per-family numeric verification is the slow test below (llama: above)."""
    pack = make_tiny_pack(family, tmp_path / "pack", limit=1)
    report = lower(pack, tmp_path, {"max_context": 48, "max_prefill": 8})
    package_path = tmp_path / program.PACKAGE_NAME
    fmts = [e["fmt"] for e in json.loads((pack / "manifest.json").read_text())["sites"].values()]
    structure = readback.check_structure(readback.load_program(package_path), report["program"],
                                         fmts.count("liftquant"), fmts.count("int"))
    assert structure["states"] == 2 and structure["state_shape"][0] == 2  # [layers=2, 1, kv, 48, hd]
    assert structure["state_shape"][3] == 48
    spec = readback.check_spec(package_path, report)
    assert spec == {"inputs": ["causalMask", "inputIds"], "states": ["keyCache", "valueCache"],
                    "metadata_keys": len(report["metadata"])}
    architecture = json.loads((pack / "config.json").read_text())["architectures"][0]  # e.g. GPT2LMHeadModel
    assert report["metadata"]["co.huggingface.exporters.architecture"] == architecture


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3_text", "gpt2", "gpt_neox"])
def test_build_other_families(family, tmp_path):
    pack = make_tiny_pack(family, tmp_path / "pack")
    _check_report(build_artifact(pack, "coreml", tmp_path / "art", options=BUILD))


@pytest.mark.slow
def test_smollm2_build(tmp_path, smollm2_lq_pack):
    report = build_artifact(smollm2_lq_pack, "coreml", tmp_path / "art", options={"verify_tokens": 8})
    assert report["verification"]["passed"]
    assert abs(report["sizes"]["weight_file_over_pack"] - 1) < 0.03
