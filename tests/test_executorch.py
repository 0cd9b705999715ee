"""ExecuTorch target: the C++ lift-project kernel, the custom op in the real runtime, builds.

Thresholds are relative errors against the fp32 reference (`targets/reference/liftquant.py`);
each says why it is what it is. Builds use the tiny packs of `conftest.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from conftest import make_tiny_pack  # noqa: E402
from liftedge.errors import ArtifactError  # noqa: E402
from liftedge.lattice import shipped_rates  # noqa: E402
from liftedge.lowering import build_artifact  # noqa: E402
from liftedge.targets.executorch import export, kernel, ops, parse_options, runner_check, runtime  # noqa: E402
from liftedge.targets.reference.liftquant import LiftLinear, encode_liftquant, n_blocks  # noqa: E402
from liftedge.verify import VerificationError  # noqa: E402
from liftedge.whiten import kron_factors  # noqa: E402

# Ragged input widths: prime, not a multiple of 8 or of d, SmolLM2's 576, and tiny.
IN_FEATURES = (7, 100, 576, 45, 130, 64)
# fp32 kernel vs fp32 reference: only the summation order differs (bit-serial sums of ±u vs
# a dense matmul), so errors are a few ulps times sqrt(width): 1e-5 leaves ~20x margin and
# a wrong bit order or sign convention gives O(1).
KERNEL_RTOL = 1e-5
# The op's table-lookup kernel (two 7-bit planes, ~14-bit tables with one scale s per token):
# each of the G = 2 * row_nbytes table entries a row sums is off by <= s / 2, s = (largest
# group sum of |u|) / 8064, randomly signed, so errors grow like sqrt(G) (observed <= 2e-4 on
# SmolLM2's real layers; the worst-case bound is checked in test_lut_kernel.py); 1e-3 leaves
# >5x margin and a wrong bit order or sign convention still gives O(1).
LUT_RTOL = 1e-3
# Custom-op .pte vs stock-op fallback .pte: the decoder is the same fp32 math in other
# operators (~1e-6), but the fallback's head is XNNPACK's fp16 linear, which rounds the
# activation to fp16 (observed 2e-3 on the tiny model) where liftedge::fp16_linear keeps
# fp32; 1e-2 covers that and still fails on any layout or sign error (O(1)).
AGREE_RTOL = 1e-2


def random_layer(out: int, n: int, D: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    nb = n_blocks(n, d)
    n1, n2 = kron_factors(n)
    signs = torch.randint(0, 2, (out, nb * D), generator=g) * 2 - 1
    pos = lambda *s: torch.rand(*s, generator=g) + 0.5  # noqa: E731
    return encode_liftquant(signs, pos(out), pos(n), torch.randn(n1, n1, generator=g) / n1 ** 0.5,
                            torch.randn(n2, n2, generator=g) / n2 ** 0.5, pos(nb), torch.randn(d, D, generator=g))


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def kernel_cache(et_kernel_cache):
    """One kernel build for the session (the autouse fixture gives each test an empty cache)."""
    return et_kernel_cache


@pytest.fixture(autouse=True)
def _shared_kernel_cache(kernel_cache, monkeypatch):
    monkeypatch.setenv("LIFTEDGE_CACHE", str(kernel_cache))


@pytest.mark.parametrize("rate", shipped_rates(), ids=lambda r: r.slug)
def test_kernel_matches_reference_every_rate(rate):
    idx = rate.D * 31 + rate.d
    n = IN_FEATURES[idx % len(IN_FEATURES)]
    qt = random_layer(out=3 + idx % 29, n=n, D=rate.D, d=rate.d, seed=idx)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(idx))
    ref = LiftLinear(qt, None)(x).numpy()
    for method in ("lut8", "mask"):
        for rows in (x[:1], x):  # decode (m = 1) and prefill (m = 5, a ragged token tile)
            got = kernel.run_kernel(qt.tensors, rows.numpy(), method)
            assert rel_err(got, ref[: rows.shape[0]]) < KERNEL_RTOL, (rate, method, rows.shape)


def test_kernel_cache_key_and_reuse():
    first = kernel.library_path()
    assert first.exists() and kernel.library_path() == first  # built once, then reused
    assert kernel.library_key() in first.name


class _Layers(torch.nn.Module):
    """Several lift-project layers (ragged widths, several rates) over one input each."""

    def __init__(self, qts, custom_op: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(ops.LqLinear(qt.tensors, None, custom_op) for qt in qts)

    def forward(self, *xs):
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


@pytest.fixture(scope="module")
def op_program(tmp_path_factory):
    """A .pte calling liftedge::lq_linear on 4 ragged layers; inputs and reference outputs."""
    specs = [(5, 7, 24, 10), (17, 100, 12, 4), (40, 576, 32, 20), (9, 45, 16, 6)]
    qts = [random_layer(o, n, D, d, seed=i) for i, (o, n, D, d) in enumerate(specs)]
    g = torch.Generator().manual_seed(1)
    xs = tuple(torch.randn(1, 3, n, generator=g) for _, n, _, _ in specs)
    tokens = torch.export.Dim("tokens", min=1, max=8)
    prog = torch.export.export(_Layers(qts, True), xs, dynamic_shapes=(tuple({1: tokens} for _ in xs),), strict=True)
    data, counts = export.to_pte(prog)
    path = tmp_path_factory.mktemp("op") / "layers.pte"
    path.write_bytes(data)
    refs = [LiftLinear(qt, None)(x).numpy() for qt, x in zip(qts, xs)]
    return path, xs, refs, counts


def test_custom_op_runs_in_executorch_runtime(op_program):
    path, xs, refs, counts = op_program
    assert counts["liftedge.lq_linear.default"] == 4  # every layer calls the op (not delegated, not decomposed)
    method = runtime.load_method(path, needs_kernel=True)
    outs = method.execute(list(xs))
    for got, ref in zip(outs, refs):
        assert rel_err(got.numpy(), ref) < LUT_RTOL
    outs = method.execute([x[:, :1] for x in xs])  # decode shape (m = 1)
    for got, ref in zip(outs, refs):
        assert rel_err(got.numpy(), ref[:, :1]) < LUT_RTOL


class _Fused(torch.nn.Module):
    """lq_rms_linear and lq_glu (SiLU with a folded norm; GELU without one) over ragged layers."""

    def __init__(self, qts, norm_weights):
        super().__init__()
        rms = ops.LqLinear(qts[0].tensors, None)
        rms.fold_norm(norm_weights[0], 1e-5)
        gate, up = ops.LqLinear(qts[1].tensors, None), ops.LqLinear(qts[2].tensors, None)
        for layer in (gate, up):
            layer.fold_norm(norm_weights[1], 1e-6)
        self.rms, self.silu = rms, ops.LqGlu(gate, up, ops.GLU_ACTS["silu"])
        self.gelu = ops.LqGlu(ops.LqLinear(qts[3].tensors, None), ops.LqLinear(qts[4].tensors, None),
                              ops.GLU_ACTS["gelu_tanh"])

    def forward(self, a, b, c):
        return self.rms(a), self.silu(b), self.gelu(c)


def test_fused_ops_run_in_executorch_runtime(tmp_path):
    """The fused kernels against the reference LiftLinear of the normalized input: ragged widths,
    a width past the kernel's thread-split prepare (1100 >= 1024), prefill and decode shapes."""
    specs = [(33, 100, 24, 10), (70, 130, 12, 4), (70, 130, 12, 4), (40, 1100, 24, 10), (40, 1100, 16, 6)]
    qts = [random_layer(o, n, D, d, seed=10 + i) for i, (o, n, D, d) in enumerate(specs)]
    g = torch.Generator().manual_seed(2)
    norm_w = [torch.rand(100, generator=g) + 0.5, torch.rand(130, generator=g) + 0.5]
    xs = (torch.randn(1, 3, 100, generator=g) * 3, torch.randn(1, 3, 130, generator=g), torch.randn(1, 3, 1100, generator=g))
    tokens = torch.export.Dim("tokens", min=1, max=8)
    prog = torch.export.export(_Fused(qts, norm_w), xs, dynamic_shapes=tuple({1: tokens} for _ in xs), strict=True)
    data, counts = export.to_pte(prog)
    assert counts["liftedge.lq_rms_linear.default"] == 1 and counts["liftedge.lq_glu.default"] == 2
    path = tmp_path / "fused.pte"
    path.write_bytes(data)
    ref = lambda i, x: LiftLinear(qts[i], None)(x)  # noqa: E731
    rms = lambda x, eps: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    with torch.no_grad():
        refs = [ref(0, rms(xs[0], 1e-5) * norm_w[0]),
                torch.nn.functional.silu(ref(1, rms(xs[1], 1e-6) * norm_w[1])) * ref(2, rms(xs[1], 1e-6) * norm_w[1]),
                torch.nn.functional.gelu(ref(3, xs[2]), approximate="tanh") * ref(4, xs[2])]
    method = runtime.load_method(path, needs_kernel=True)
    for n in (3, 1):  # prefill, then the decode shape
        outs = method.execute([x[:, :n] for x in xs])
        for got, want in zip(outs, refs):
            # LUT_RTOL for a layer; the products of two such layers double its error, and the
            # norm is exact up to float rounding (1e-7): 2 * LUT_RTOL
            assert rel_err(got.numpy(), want[:, :n].numpy()) < 2 * LUT_RTOL, n


class _LinearAdd(torch.nn.Module):
    def __init__(self, qt):
        super().__init__()
        self.layer = ops.LqLinear(qt.tensors, None)

    def forward(self, x, residual):
        return torch.ops.liftedge.lq_linear_add.default(x, *self.layer.fields(), residual)


def test_linear_add_runs_in_executorch_runtime(tmp_path):
    """lq_linear_add = residual + the layer, prefill and decode shapes; a residual of another
    shape is refused by the kernel."""
    qt = random_layer(70, 130, 24, 10, seed=20)
    g = torch.Generator().manual_seed(3)
    x, residual = torch.randn(1, 3, 130, generator=g), torch.randn(1, 3, 70, generator=g) * 5
    tokens = torch.export.Dim("tokens", min=1, max=8)
    prog = torch.export.export(_LinearAdd(qt), (x, residual), dynamic_shapes=({1: tokens}, {1: tokens}), strict=True)
    data, counts = export.to_pte(prog)
    assert counts["liftedge.lq_linear_add.default"] == 1
    path = tmp_path / "add.pte"
    path.write_bytes(data)
    with torch.no_grad():
        layer = LiftLinear(qt, None)(x)
    method = runtime.load_method(path, needs_kernel=True)
    for n in (3, 1):
        (got,) = method.execute([x[:, :n], residual[:, :n]])
        # the layer's error (LUT_RTOL of its own scale) carried over unchanged; the add is exact
        # up to one float rounding
        assert rel_err(got.numpy() - residual[:, :n].numpy(), layer[:, :n].numpy()) < LUT_RTOL, n
        assert rel_err(got.numpy(), (layer + residual)[:, :n].numpy()) < LUT_RTOL, n


class _Qkv(torch.nn.Module):
    """Three layers after one folded norm (q, k, v of a block), as fusion.py leaves them."""

    def __init__(self, qts, norm_weight):
        super().__init__()
        self.layers = torch.nn.ModuleList(ops.LqLinear(qt.tensors, None) for qt in qts)
        for layer in self.layers:
            layer.fold_norm(norm_weight, 1e-5)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def test_rms_linear3_runs_in_executorch_runtime(tmp_path):
    """The q/k/v graph pass and lq_rms_linear3's kernel: ragged row counts (33, 8, 70 rows:
    tiles split unevenly between the three layers), prefill and decode shapes."""
    from liftedge.targets.executorch import fusion

    qts = [random_layer(o, 130, 24, 10, seed=30 + i) for i, o in enumerate((33, 8, 70))]
    g = torch.Generator().manual_seed(4)
    norm_w, x = torch.rand(130, generator=g) + 0.5, torch.randn(1, 3, 130, generator=g) * 2
    tokens = torch.export.Dim("tokens", min=1, max=8)
    prog = torch.export.export(_Qkv(qts, norm_w), (x,), dynamic_shapes=({1: tokens},), strict=True)
    assert fusion.fuse_shared_input_layers(prog) == 1
    data, counts = export.to_pte(prog)
    assert counts["liftedge.lq_rms_linear3.default"] == 1 and "liftedge.lq_rms_linear.default" not in counts
    path = tmp_path / "qkv.pte"
    path.write_bytes(data)
    with torch.no_grad():
        xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
        refs = [LiftLinear(qt, None)(xn) for qt in qts]
    method = runtime.load_method(path, needs_kernel=True)
    for n in (3, 1):
        outs = method.execute([x[:, :n]])
        assert len(outs) == 3
        for got, want in zip(outs, refs):
            assert rel_err(got.numpy(), want[:, :n].numpy()) < LUT_RTOL, n  # one layer's table error


def test_pte_needing_kernel_fails_clearly_without_it(op_program):
    path = op_program[0]
    code = ("import sys\nfrom pathlib import Path\nfrom liftedge.targets.executorch import runtime\n"
            "try:\n    runtime.load_method(Path(sys.argv[1]), needs_kernel=False)\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert "ArtifactError" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "liftedge::lq_linear" in res.stdout and "load_library" in res.stdout


@pytest.fixture(scope="module")
def mixed_pack(tmp_path_factory):
    """Tiny Llama with LQ-24/10, LQ-12/4 and int4 (group 32) sites."""
    return make_tiny_pack("llama", tmp_path_factory.mktemp("et-mixed") / "pack", mixed=True)


@pytest.fixture(scope="module")
def builds(mixed_pack, tmp_path_factory, kernel_cache):
    root = tmp_path_factory.mktemp("et-builds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFTEDGE_CACHE", str(kernel_cache))
        return {flag: build_artifact(mixed_pack, "executorch", root / f"custom-{flag}",
                                     options={"custom_ops": flag, "max_context": 128, "max_prefill": 64})
                | {"out": root / f"custom-{flag}"} for flag in (True, False)}


def test_build_llama_custom_op_verified(builds, mixed_pack):
    report = builds[True]
    assert report["verification"]["passed"] and report["verification"]["greedy_tokens_equal"]
    assert report["requires_kernel_library"] is True
    manifest = json.loads((mixed_pack / "manifest.json").read_text())
    assert set(manifest["sites"]) <= set(report["sites"])  # every site says how it was lowered
    lowerings = {v["lowering"] for v in report["sites"].values()}
    assert "liftedge::lq_linear_add" in lowerings and any(x.startswith("stock-op dequant int4") for x in lowerings)
    assert all(v["why"] for v in report["sites"].values())
    assert report["sites"]["lm_head"]["lowering"] == "liftedge::fp16_linear"  # fp16 head, fp32 sums
    assert report["int8_head"] is False
    assert json.loads((builds[True]["out"] / "report.json").read_text())["verification"]["passed"]
    # ExecuTorch's own LLM runner, with the kernel library loaded, reproduces the reference's tokens
    (runner,) = report["verification"]["runners"]
    assert runner["runner"].endswith("TextLLMRunner") and runner["accepted"] is True
    assert runner["tokens"] == runner_check.expected_tokens(report["verification"]["reference_tokens"], [0])
    # lq_linear_add where the residual add follows (o_proj, down_proj); lq_rms_linear3 (q/k/v)
    # and lq_glu (gate/up) where fusion.py folded the block's norms
    # and rope where RoPE's transposes, slices and rotation were (q and k of every block)
    assert set(runner["kernel_library"]["operators"]) == {"liftedge::lq_linear_add", "liftedge::lq_rms_linear3",
                                                          "liftedge::lq_glu", "liftedge::fp16_linear", "liftedge::rope"}
    assert report["operators"]["liftedge.rope.default"] == 2 * 2  # q and k of the 2 blocks
    assert report["sites"]["model.layers.1.self_attn.k_proj"]["lowering"] == "liftedge::lq_rms_linear3"
    assert {v["lowering"] for k, v in report["sites"].items() if k.endswith(("gate_proj", "up_proj"))} >= {
        "liftedge::lq_glu"}
    assert report["sites"]["model.layers.0.self_attn.o_proj"]["lowering"] == "liftedge::lq_linear_add"
    assert report["operators"]["liftedge.lq_linear_add.default"] == sum(
        v["lowering"] == "liftedge::lq_linear_add" for v in report["sites"].values())
    assert report["runtime"]["kernel_library"]["operators"] == runner["kernel_library"]["operators"]


def test_int8_head_option(tiny_lq_pack):
    """ExportOptions.int8_head (the benchmark's equal-head programs) swaps the fp16 head for
    torchao's int8 linear; builds keep the pack's head (liftedge::fp16_linear)."""
    opts = dict(max_context=16, max_prefill=8)
    _, model, sites = export.prepare_model(tiny_lq_pack, export.ExportOptions(**opts))
    assert sites["lm_head"]["lowering"] == "liftedge::fp16_linear"
    x = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = model.lm_head(x).detach()
    _, model, sites = export.prepare_model(tiny_lq_pack, export.ExportOptions(**opts, int8_head=True))
    assert sites["lm_head"]["lowering"].startswith(export.INT8_HEAD)
    # int8 weights (per-row scale) and int8 activations (per-token scale): ~1/127 of each
    # operand's range, averaged over the hidden width; 2e-2 of the largest logit is ~5x that,
    # and a wrong table or transpose gives O(1)
    assert rel_err(model.lm_head(x).detach(), want) < 2e-2


def test_runner_metadata_from_plan_and_tokenizer(builds):
    """The constant methods TextLLMRunner reads: prefill bound, planned context, vocab, BOS/EOS."""
    meta = builds[True]["runner_metadata"]
    assert meta["get_max_seq_len"] == 64 and meta["get_max_context_len"] == 128
    assert meta["get_vocab_size"] == 320  # conftest.TINY_VOCAB
    assert meta["get_bos_id"] == 0 and meta["get_eos_ids"] == [0]  # conftest's tokenizer config
    assert meta["use_kv_cache"] and meta["enable_dynamic_shape"]


def test_runner_check_refuses_other_tokens(builds):
    """A runner whose tokens differ from the reference fails verification (the check can fail)."""
    report = builds[False]
    wrong = [(t + 1) % 320 if t != 0 else 1 for t in report["verification"]["reference_tokens"]]
    with pytest.raises(VerificationError, match="TextLLMRunner generated other greedy tokens"):
        runner_check.check_text_llm_runner(builds[False]["out"], report, wrong)


def test_shipped_tokenizer_loads_in_text_llm_runner(builds, tmp_path):
    """The artifact's tokenizer.json is what TextLLMRunner loads, unchanged. transformers' GGUF
    conversion writes an empty `Sequence` normalizer, which the runner's C++ tokenizer refuses
    (the real SmolLM2 GGUF did): it is shipped as null (same tokenization), and a shipped file the
    runner cannot load fails the check."""
    from liftedge.lowering import portable_tokenizer_json

    shipped = json.loads((builds[True]["out"] / "tokenizer.json").read_text())
    gguf_style = {**shipped, "normalizer": {"type": "Sequence", "normalizers": []}}
    assert portable_tokenizer_json(gguf_style)["normalizer"] is None
    kept = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
    assert portable_tokenizer_json({**shipped, "normalizer": kept})["normalizer"] == kept
    bad = tmp_path / "art"
    shutil.copytree(builds[True]["out"], bad)
    (bad / "tokenizer.json").write_text(json.dumps(gguf_style))
    report = builds[True]
    with pytest.raises(VerificationError, match="Failed to load tokenizer"):
        runner_check.check_text_llm_runner(bad, report, report["verification"]["reference_tokens"])


def test_fp16_sites_stay_fp16(tmp_path):
    """Linears a plan keeps fp16 go into the .pte as fp16 through liftedge::fp16_linear (as the plan
    counts their bytes), not as XNNPACK fp32 (twice the bytes: what kept a 1B plan's export past 8 GB)."""
    pack = make_tiny_pack("llama", tmp_path / "pack", limit=2)
    report = build_artifact(pack, "executorch", tmp_path / "art", options={"max_context": 128, "max_prefill": 64})
    assert report["verification"]["passed"] and report["verification"]["greedy_tokens_equal"]
    fp16 = [name for name, v in report["sites"].items() if v["lowering"] == f"{ops.NAMESPACE}::fp16_linear"]
    quantized = json.loads((pack / "manifest.json").read_text())["sites"]
    linears = [n for n in report["sites"] if n not in quantized and ".layers." in n]
    assert linears and set(linears) <= set(fp16)
    # fp16 weights: the .pte holds each fp16 site's weight bytes as stored in the pack, once
    from liftedge.packed import read_weights

    weights = read_weights(pack)
    pte = (tmp_path / "art" / export.PTE_NAME).read_bytes()
    for name in linears:
        assert pte.count(weights[f"{name}.weight"].to(torch.float16).numpy().tobytes()) == 1, name


def test_fallback_needs_no_kernel_and_agrees(builds):
    report = builds[False]
    assert report["verification"]["passed"] and report["requires_kernel_library"] is False
    assert report["custom_op_calls"] == 0
    (runner,) = report["verification"]["runners"]  # the fallback runs in the stock runner alone
    assert runner["accepted"] is True and "kernel_library" not in runner
    ids = torch.tensor([[5, 17, 101, 3, 250, 9, 42]])
    pos = torch.arange(ids.shape[1])
    logits = {}
    for flag in (True, False):
        method = runtime.load_method(builds[flag]["out"] / export.PTE_NAME, needs_kernel=flag)
        logits[flag] = method.execute([ids, pos])[0].numpy()
        # prefill returns the last position's logits only; a one-token call at that position agrees
        assert logits[flag].shape == (1, 1, 320)
        again = method.execute([ids[:, -1:], pos[-1:]])[0].numpy()
        assert rel_err(again, logits[flag]) < LUT_RTOL  # same math in another call shape (summation order)
    assert rel_err(logits[False], logits[True]) < AGREE_RTOL


def test_failed_verification_leaves_nothing(builds, monkeypatch, tmp_path):
    """Lowering that writes a wrong program (another pack's) must not publish anything."""
    import liftedge.targets.executorch as target

    other = make_tiny_pack("llama", tmp_path / "other", seed=3)

    monkeypatch.setattr(target, "lower", lambda pack, out, options: _copy_lower(builds, out))
    dest = tmp_path / "artifact"
    with pytest.raises(VerificationError):
        build_artifact(other, "executorch", dest, options={"max_context": 128, "max_prefill": 64})
    assert not dest.exists() and not list(tmp_path.glob(".artifact*"))


def _copy_lower(builds, out: Path) -> dict:
    shutil.copy(builds[True]["out"] / export.PTE_NAME, out / export.PTE_NAME)
    return {k: builds[True][k] for k in ("sites", "requires_kernel_library", "artifacts")}


def test_unsupported_family_and_bad_options_refused():
    with pytest.raises(ArtifactError, match="does not support model family 'phi3'"):
        export.check_family("phi3")
    with pytest.raises(ArtifactError, match="unknown executorch option"):
        parse_options({"bogus": 1})
    with pytest.raises(ArtifactError, match="true or false"):
        parse_options({"custom_ops": "maybe"})
    with pytest.raises(ArtifactError, match="max_context"):
        export.ExportOptions(max_context=4)


# qwen3 ties its head to the embedding; llama does not. The head is the C++ kernel with custom
# ops (default) and stock-op dequantization without.
@pytest.mark.parametrize("family,option,custom_ops", [("qwen3", "int8-g64", True), ("llama", "int4-g32", False),
                                                      ("llama", "int4-g32", True)])
def test_int_embedding_and_head_verified(family, option, custom_ops, tmp_path, kernel_cache, monkeypatch):
    monkeypatch.setenv("LIFTEDGE_CACHE", str(kernel_cache))
    pack = make_tiny_pack(family, tmp_path / "pack", mixed=True, embedding=option)
    report = build_artifact(pack, "executorch", tmp_path / "art",
                            options={"max_context": 128, "max_prefill": 64, "custom_ops": custom_ops})
    assert report["verification"]["passed"] and report["verification"]["greedy_tokens_equal"]
    assert report["sites"]["model.embed_tokens"]["lowering"].startswith("stock-op int")
    head = report["sites"]["lm_head"]["lowering"]
    if custom_ops:  # the kernel reads the packed codes: no per-call float table
        assert head.startswith(f"{ops.NAMESPACE}::int_linear") and report["requires_kernel_library"]
    else:
        assert head.startswith("stock-op dequant int") and not report["requires_kernel_library"]
    # the .pte holds the table's codes exactly once (a tied head reads the embedding's buffer)
    from liftedge.packed import read_weights

    codes = read_weights(pack)["model.embed_tokens.codes"].numpy().tobytes()
    assert (tmp_path / "art" / export.PTE_NAME).read_bytes().count(codes) == 1


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in export.SUPPORTED_FAMILIES if f != "llama"])
def test_build_other_families(family, tmp_path):
    pack = make_tiny_pack(family, tmp_path / "pack")
    report = build_artifact(pack, "executorch", tmp_path / "art", options={"max_context": 128, "max_prefill": 64})
    assert report["verification"]["passed"]
    assert [r["accepted"] for r in report["verification"]["runners"]] == [True]  # TextLLMRunner


@pytest.mark.slow
def test_smollm2_pack_runs_in_text_llm_runner(tmp_path, smollm2_lq_pack):
    """The real SmolLM2 LQ-24/10 .pte: verification (logits, 32 greedy tokens) and ExecuTorch's own
    TextLLMRunner, with the kernel library loaded, reproduce the reference's greedy tokens."""
    report = build_artifact(smollm2_lq_pack, "executorch", tmp_path / "art")
    assert report["verification"]["passed"]
    (runner,) = report["verification"]["runners"]
    assert runner["accepted"] and runner["runner"].endswith("TextLLMRunner"), runner
    # the lift-project layers (norms, gated MLP and residual adds fused) and the tied fp16 head
    # (a quantize pack keeps the head fp16)
    assert set(report["custom_operators"]) == {f"{ops.NAMESPACE}::{op}" for op in (
        "lq_rms_linear3", "lq_glu", "lq_linear_add", "fp16_linear", "rope")}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmakelists_builds_against_the_wheel(tmp_path):
    """The app-side CMakeLists configures and compiles with the executorch wheel's CMake package."""
    src = kernel.KERNEL_DIR.parent
    cfg = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                          f"-DCMAKE_PREFIX_PATH={kernel.executorch_root()}"], capture_output=True, text=True,
                         timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    res = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert list(tmp_path.glob("libliftedge_kernels.*"))


def test_attention_in_llm_ops_agrees_with_stock(builds, mixed_pack):
    """Default builds attend through ExecuTorch's LLM ops (llama::update_cache + custom_sdpa over
    a [1, S, H_kv, D] cache: no GQA repeat copy, no mask over the whole cache); the program agrees
    with the stock-operator attention program on a prefill and the decode steps after it."""
    report = builds[True]
    assert report["attention"]["lowering"] == "llm ops" and report["requires_llm_ops"] is True
    from collections import Counter

    from liftedge.profile.executorch import instruction_names

    ops_used = Counter(name for name, _, _ in instruction_names(builds[True]["out"] / export.PTE_NAME).values())
    # per block: one sdpa, a keys and a values update, written in place (no functional copy of the cache)
    assert ops_used["llama::custom_sdpa.out"] == 2 and ops_used["llama::update_cache.out"] == 4
    assert not any(("expand_copy" in k or "index_put" in k or "where" in k) for k in ops_used)
    assert report["runner_metadata"]["use_sdpa_with_kv_cache"] is True

    opts = export.ExportOptions(max_context=32, max_prefill=8, llm_attention=False)
    _, model, _ = export.prepare_model(mixed_pack, opts)
    assert export.attention_lowering(model, opts) == {"lowering": "stock operators", "why": "llm_attention=False"}
    data, counts = export.to_pte(export.export_program(model, opts))
    assert not any(k.startswith("llama.") for k in counts)
    stock = builds[True]["out"].parent / "stock-attention.pte"
    stock.write_bytes(data)
    ids = torch.tensor([[5, 17, 101, 3, 250, 9, 42, 7, 11, 300, 2]])
    rows = {}
    for name, path in (("llm", builds[True]["out"] / export.PTE_NAME), ("stock", stock)):
        method = runtime.load_method(path, needs_kernel=True)
        out = [method.execute([ids[:, :6], torch.arange(6)])[0].numpy()]
        out += [method.execute([ids[:, t:t + 1], torch.tensor([t])])[0].numpy() for t in range(6, 11)]
        rows[name] = np.concatenate(out, axis=1)
    # same fp32 math in other kernels (softmax and the sums run in another order): ~1e-6; the
    # LUT kernel's rounding is the same in both; 1e-4 fails on any wrong position or head mapping (O(1))
    assert rel_err(rows["llm"], rows["stock"]) < 1e-4


def test_sliding_window_shorter_than_context_keeps_stock_attention():
    """custom_sdpa attends to every earlier position: a model whose window is shorter than the
    context keeps transformers' attention, and the report says why."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("gemma3_text"))
    window = model.config.sliding_window
    short = export.attention_lowering(model, export.ExportOptions(max_context=window * 2, max_prefill=8))
    assert short["lowering"] == "stock operators" and f"sliding window {window}" in short["why"]
    assert export.attention_lowering(model, export.ExportOptions(max_context=window, max_prefill=8))["lowering"] == "llm ops"


def test_llm_attention_option_and_report(builds):
    """`--option llm_attention=false` is a documented, checked option; the default build's report
    tells the app which ExecuTorch LLM ops it must link."""
    from liftedge.targets.executorch import OPTIONS

    assert "llm_attention" in OPTIONS and parse_options({"llm_attention": False})["llm_attention"] is False
    with pytest.raises(ArtifactError, match="true or false"):
        parse_options({"llm_attention": "sometimes"})
    llm = builds[True]["runtime"]["llm_ops"]
    assert llm["needed"] is True and llm["operators"] == ["llama::update_cache", "llama::custom_sdpa"]


def test_write_pte_frees_what_it_serialized_and_writes_the_same_bytes(mixed_pack, tmp_path, monkeypatch):
    """`write_pte` spends its program: each constant is freed once the emitter has copied it
    (and the KV-cache buffers at the end), so a lowering never holds the weights twice. The
    bytes must be those of the intact program (`to_pte`): freeing happens after each copy."""
    opts = export.ExportOptions(max_context=32, max_prefill=8)
    want, _ = export.to_pte(export.export_program(export.prepare_model(mixed_pack, opts)[1], opts))
    monkeypatch.setattr(export, "_FREE_MIN_NBYTES", 1)  # every tensor of this tiny program counts as large
    program = export.export_program(export.prepare_model(mixed_pack, opts)[1], opts)
    held = [t for t in (*program.state_dict.values(), *program.constants.values()) if isinstance(t, torch.Tensor)]
    export.write_pte(program, tmp_path / "model.pte")
    assert (tmp_path / "model.pte").read_bytes() == want
    signs = [t for name, t in program.state_dict.items() if name.endswith(".signs")]
    assert signs and all(t.untyped_storage().nbytes() == 0 for t in signs)  # the repacked signs: freed
    caches = [t for name, t in program.constants.items() if "cache" in name and t.numel() > 1]
    assert caches and all(t.untyped_storage().nbytes() == 0 for t in caches)  # the KV cache: freed on leaving
    assert sum(t.untyped_storage().nbytes() for t in held) < sum(t.nbytes for t in held)
