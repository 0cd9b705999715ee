"""Pack -> `.pte`: swap in export modules, wrap with a static KV cache, export, lower, save.

`lower_pack(pack, out, opts)` does the whole lowering and returns the report fields:

1. `load_packed(pack)` gives the HF model with reference modules; each site is replaced by
   its export module (`modules.py`, `ops.LqLinear`) and the reason is recorded per site.
2. A static-cache wrapper: the KV cache is a set of static buffers of `max_context`
   positions; its forward takes (input_ids [1, n], cache_position [n]) and returns the last
   position's logits [1, 1, vocab]; n is a dynamic dimension in [1, max_prefill], so one
   method serves prefill and decode. By default attention runs in ExecuTorch's LLM ops
   (`attention.py`: `llama::update_cache` + `llama::custom_sdpa` over [1, S, H_kv, D]
   buffers, as ExecuTorch's own Llama export); where they do not fit (a sliding window
   shorter than the context) or with `llm_attention=False`, transformers'
   `TorchExportableModuleWithStaticCache` in stock operators (sliding-window layers become
   full static layers, so generation stops at `max_context`).
3. `torch.export` (strict, as DEPS.md found necessary with torch 2.13), then
   `to_edge_transform_and_lower` with the XNNPACK partitioner (attention, norms, fp matmuls),
   then `to_executorch`; the custom op stays outside the delegate and runs the C++ kernel.
4. The program carries the constant methods ExecuTorch's LLM runner reads
   (`executorch.extension.llm.runner.TextLLMRunner`; `runner_metadata`): prefill bound,
   planned context, vocabulary, BOS/EOS ids from the tokenizer config.

This module owns the export; the op is `ops.py`, the kernel `kernel.py`, checks `runtime.py`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liftedge.errors import ArtifactError
from liftedge.pages import release_clean_pages
from liftedge.upcast import NarrowLinear, widen
from liftedge.targets.executorch import attention, fusion, modules, ops
from liftedge.targets.reference import TiedHead

log = logging.getLogger(__name__)

PTE_NAME = "model.pte"
# Families whose HF implementation exports with transformers' static cache (tested: tests/test_executorch.py).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gpt_neox")
CUSTOM_OP = f"{ops.NAMESPACE}::{ops.OP}"
INT8_HEAD = "xnnpack int8 linear"


@dataclass(frozen=True)
class ExportOptions:
    """What to build (validated): custom op or stock-op fallback, context, prefill bound."""

    custom_ops: bool = True
    max_context: int = 256
    max_prefill: int = 128
    # An fp16 head as XNNPACK's int8 linear (`modules.int8_head`). Off in builds: it changes the
    # model the pack describes (SmolLM2: greedy tokens leave the fp16-head reference after ~15-25
    # of 32, so verification fails); an int8 head the plan chose (int8-g64 table) is verified
    # through liftedge::int_linear. On for the benchmark's equal-head comparisons.
    int8_head: bool = False
    # Attention + KV cache through ExecuTorch's LLM ops (`attention.py`) where the model allows.
    llm_attention: bool = True
    # RMSNorms and the gated MLP's activation folded into the lift-project ops (`fusion.py`;
    # custom ops only). Off only to measure what it saves.
    fuse_blocks: bool = True

    def __post_init__(self) -> None:
        if not (8 <= self.max_context <= 1 << 16):
            raise ArtifactError(f"max_context must be in [8, 65536], got {self.max_context}")
        if not (2 <= self.max_prefill <= self.max_context):
            raise ArtifactError(f"max_prefill must be in [2, max_context={self.max_context}], got {self.max_prefill}")


def check_family(family: str | None) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ArtifactError(f"the executorch target does not support model family {family!r}; "
                            f"supported: {', '.join(SUPPORTED_FAMILIES)}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    from liftedge.packed import replace_module

    replace_module(model, name, new)


def swap_sites(model: nn.Module, qtensors: dict, custom_ops: bool) -> dict[str, dict[str, str]]:
    """Replace every quantized site by its export module; return site -> {lowering, why}."""
    sites = {}
    embedding = model.get_input_embeddings()
    for name, qt in sorted(qtensors.items()):
        if model.get_submodule(name) is embedding:
            continue  # a lookup table, not a linear: `swap_embeddings`
        bias = getattr(model.get_submodule(name), "bias", None)
        if qt.fmt == "liftquant":
            _replace(model, name, ops.LqLinear(qt.tensors, bias, custom_op=custom_ops))
            release_clean_pages(qt.tensors.values())  # the stored signs were read into the repacked copy
            sites[name] = ({"lowering": CUSTOM_OP, "why": "lift-project layer: C++ kernel over the packed signs"}
                           if custom_ops else
                           {"lowering": "stock-op lift-project",
                            "why": "custom_ops=False: bit unpack + matmuls in stock operators, signs packed"})
        elif qt.fmt == "int":
            layer = modules.IntDequantLinear(qt, bias)
            kind = f"int{qt.meta['bits']} g{qt.meta['group_size']}"
            if custom_ops and model.get_submodule(name) is model.get_output_embeddings() and layer.kernel_supported:
                layer.custom_op = True  # the head: the vocabulary-sized table read in place by the kernel
                sites[name] = {"lowering": f"{ops.NAMESPACE}::int_linear ({kind})",
                               "why": "output head: C++ kernel over the packed codes, no per-call dequantized table"}
            else:
                sites[name] = {"lowering": f"stock-op dequant {kind}",
                               "why": "packed codes unpacked in the graph: exact pack values at packed size "
                                      "(8da4w would re-quantize to another grid)"}
            _replace(model, name, layer)
        elif qt.fmt == "fp16":
            sites[name] = {"lowering": "xnnpack fp32 linear", "why": "fp16 site: float weights, XNNPACK"}
        else:
            raise ArtifactError(f"site {name}: format {qt.fmt!r} has no ExecuTorch lowering")
    return sites


def swap_fp16_linears(model: nn.Module, custom_ops: bool) -> dict[str, dict[str, str]]:
    """Decoder linears the pack keeps fp16 (plain weights after `load_packed`): with the kernel
    library, `liftedge::fp16_linear` over the fp16 weight (the plan's 2 bytes per weight, fp32
    activations and sums); without it, XNNPACK's fp32 linear (twice the bytes)."""
    sites = {}
    head = model.get_output_embeddings()  # already swapped (`swap_embeddings`), or the int8 head option's
    for name, layer in list(model.named_modules()):
        if type(layer) not in (nn.Linear, NarrowLinear) or layer is head:
            continue
        if not custom_ops:
            widen(layer)  # a pack's fp16 weight (NarrowLinear), as float32 for XNNPACK's fp32 linear
            sites[name] = {"lowering": "xnnpack fp32 linear",
                           "why": "fp16 site, custom_ops=False: stock XNNPACK linear over fp32 weights"}
            continue
        _replace(model, name, modules.fp16_linear(layer.weight, layer.bias))
        sites[name] = {"lowering": f"{ops.NAMESPACE}::fp16_linear",
                       "why": "fp16 site: stored fp16 as planned, read in place by the C++ kernel"}
    return sites


def swap_embeddings(model: nn.Module, qtensors: dict, custom_ops: bool = True,
                    int8_head: bool = False) -> dict[str, dict[str, str]]:
    """Embedding and head as the pack stores them (fp16 or "int"), the tied table stored once;
    with `int8_head`, an fp16 head becomes XNNPACK's int8 linear (`modules.int8_head`)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    scale = getattr(emb, "embed_scale", None)
    scale = None if scale is None else float(scale)
    # tied: the HF head shares the fp16 embedding's weight, or the reference head reads the int table
    tied = head is not None and (isinstance(head, TiedHead) or getattr(head, "weight", None) is getattr(emb, "weight", 0))
    if emb_name in qtensors:
        new_emb, sites = _int_embedding(emb_name, qtensors[emb_name], scale)
    else:
        new_emb = modules.Fp16Embedding(emb.weight, scale)
        sites = {emb_name: {"lowering": "fp16 embedding (portable gather)", "why": "pack stores it fp16"}}
    _replace(model, emb_name, new_emb)
    if head_name is None or head_name in qtensors:  # no head, or a quantized untied head (`swap_sites`)
        return sites
    bias = getattr(head, "bias", None)
    if int8_head and not isinstance(new_emb, modules.IntEmbedding):
        weight = new_emb.table if tied else head.weight
        _replace(model, head_name, modules.int8_head(weight, bias))
        sites[head_name] = {"lowering": f"{INT8_HEAD} (per-row int8 weights, int8 dynamic activations)",
                            "why": "fp16 head in the pack: the vocabulary-sized GEMV is the largest read of a "
                                   "decode step; int8 halves it and XNNPACK's int8 GEMM runs it"
                                   + ("; tied: the fp16 table stays for the embedding lookup" if tied else "")}
        return sites
    if tied and isinstance(new_emb, modules.IntEmbedding):
        new_head, sites[head_name] = _int_tied_head(new_emb, bias, custom_ops)
    elif tied:
        new_head = modules.Fp16Head(new_emb, "table", bias, custom_ops)
        why = ("tied to the embedding: one fp16 table serves both" if custom_ops else
               "custom_ops=False: XNNPACK fp16 linear, which keeps its own copy of the tied table")
    else:
        new_head = modules.fp16_linear(head.weight, bias, custom_ops)
        why = "pack stores it fp16"
    if head_name not in sites:
        sites[head_name] = {"lowering": f"{ops.NAMESPACE}::fp16_linear" if custom_ops else "xnnpack fp16 linear",
                            "why": why}
    _replace(model, head_name, new_head)
    return sites


def _int_embedding(name: str, qt, scale: float | None):
    """An "int" embedding: the looked-up rows of codes gathered, then dequantized."""
    if qt.fmt != "int":
        raise ArtifactError(f"{name}: a {qt.fmt!r} embedding has no ExecuTorch lowering (fp16 or int)")
    kind = f"int{qt.meta['bits']} g{qt.meta['group_size']}"
    return modules.IntEmbedding(qt, scale), {name: {
        "lowering": f"stock-op {kind} lookup (index_select of code rows + dequant)",
        "why": "only the looked-up rows are dequantized"}}


def _int_tied_head(emb: modules.IntEmbedding, bias, custom_ops: bool):
    """The head over an `IntEmbedding`'s table (stored once): the C++ kernel, or stock-op dequant."""
    kind = f"int{emb.meta['bits']} g{emb.meta['group_size']}"
    kernel = custom_ops and emb.kernel_supported
    site = ({"lowering": f"{ops.NAMESPACE}::int_linear ({kind}) over the tied table",
             "why": "tied: one stored table serves both; the C++ kernel reads the packed codes"}
            if kernel else
            {"lowering": f"stock-op dequant {kind} of the tied table + linear",
             "why": "tied: one stored table serves both; custom_ops=False (or a layout the kernel does not "
                    "read): the table is dequantized per call, exact, packed on disk"})
    return modules.IntTiedHead(emb, bias, kernel), site


def prepare_model(pack: Path, opts: ExportOptions):
    """The loaded pack with export modules in place, and the per-site report."""
    from liftedge.packed import load_packed_quantized, read_manifest

    family = read_manifest(pack)["source"].get("family")
    check_family(family)  # before the (slow) load
    loaded, qtensors = load_packed_quantized(pack)
    model = loaded.model
    sites = swap_sites(model, qtensors, opts.custom_ops)
    sites.update(swap_embeddings(model, qtensors, opts.custom_ops, opts.int8_head))
    sites.update(swap_fp16_linears(model, opts.custom_ops))
    if opts.custom_ops and opts.fuse_blocks:
        fusion.fuse_blocks(model, family)
        _name_fused_sites(model, sites)
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return loaded, model.eval(), sites


def _name_fused_sites(model: nn.Module, sites: dict[str, dict[str, str]]) -> None:
    """Say in the per-site report which lift-project layers `fusion.fuse_blocks` folded."""
    for name, module in model.named_modules():
        if isinstance(module, ops.LqGlu):
            for part in ("gate", "up"):
                site = name.rsplit(".", 1)[0] + f".{part}_proj"
                if site in sites:
                    sites[site] = {"lowering": f"{ops.NAMESPACE}::lq_glu",
                                   "why": "gate and up projections, the activation and the product in one call"
                                          + (" after the folded RMSNorm" if module.gate.norm_eps is not None else "")}
        elif isinstance(module, ops.LqLinear) and module.norm_eps is not None and name in sites:
            sites[name] = {"lowering": f"{ops.NAMESPACE}::lq_rms_linear",
                           "why": "lift-project layer with the RMSNorm before it folded in (norm weight in in_scale)"}


def _name_graph_fused_sites(paths: dict[str, str], sites: dict[str, dict[str, str]]) -> None:
    """Say in the per-site report which layers the graph passes of `fusion` rewrote (a module
    path under the export wrapper ends with the site's name)."""
    for path, op in paths.items():
        site = next((s for s in sites if path == s or path.endswith("." + s)), None)
        if site is not None:
            sites[site] = {"lowering": f"{ops.NAMESPACE}::{op}", "why": fusion.GRAPH_FUSED[op]}


def _last_logits_wrapper(model: nn.Module, max_context: int) -> nn.Module:
    """transformers' static-cache wrapper whose forward computes the head on the last position
    only (`logits_to_keep=1`): logits [1, 1, vocab] for any n. Greedy decoding and ExecuTorch's
    TextLLMRunner read only the last position; a prompt's logits per position come from
    one-token calls (`runtime.pte_step`)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogits(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
            for layer in self.static_cache.layers:  # as the parent: the cache restarts at cache_position[0]
                layer.cumulative_length.copy_(cache_position[0])
            outs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=None,
                              cache=self.static_cache, use_cache=True, logits_to_keep=1)
            return outs.logits

    return LastLogits(model, batch_size=1, max_cache_len=max_context)


def attention_lowering(model: nn.Module, opts: ExportOptions) -> dict[str, Any]:
    """How the program's attention is lowered: ExecuTorch's LLM ops, or stock operators and why."""
    if not opts.llm_attention:
        return {"lowering": "stock operators", "why": "llm_attention=False"}
    reason = attention.unsupported_reason(model, opts.max_context)
    if reason is not None:
        return {"lowering": "stock operators", "why": reason}
    return {"lowering": "llm ops", "operators": list(attention.OPERATORS),
            "kv_cache": "[1, max_context, kv_heads, head_dim] fp32 per layer, written in place"}


def export_program(model: nn.Module, opts: ExportOptions) -> torch.export.ExportedProgram:
    """The static-cache program: (input_ids [1, n], cache_position [n]) -> logits [1, 1, vocab]
    (the last position)."""
    if attention_lowering(model, opts)["lowering"] == "llm ops":
        wrapper = attention.LlmOpsCacheWrapper(model, opts.max_context)
    else:
        wrapper = _last_logits_wrapper(model, opts.max_context)
    seq = torch.export.Dim("seq", min=1, max=opts.max_prefill)
    ids = torch.zeros((1, 2), dtype=torch.long)
    pos = torch.arange(2, dtype=torch.long)
    with torch.no_grad(), _real_values_uncopied():
        program = torch.export.export(wrapper, args=(), kwargs={"input_ids": ids, "cache_position": pos},
                                      dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
                                      strict=True)
    if opts.custom_ops and opts.fuse_blocks:
        fusion.fuse_residual_adds(program)
        fusion.fuse_shared_input_layers(program)
        fusion.fuse_rope(program)
    return program


@contextlib.contextmanager
def _real_values_uncopied():
    """Strict export traces with Dynamo, which clones every real tensor it meets (each weight,
    each cache buffer) into its real-value cache, kept for evaluating data-dependent values that
    this graph never asks for: a copy of the whole model while it traces (the 8B lowering peaked
    3.3 GB above its repacked weights) that the export's shape environment keeps alive afterwards.
    Here the cache holds the tensors themselves; the traced graph is the same (it is built from
    fake tensors), and the program is verified like any other."""
    from torch._dynamo.variables import builder

    original = builder._clone_input

    def keep(value, fake_mode):
        return value if type(value) in (torch.Tensor, nn.Parameter) else original(value, fake_mode)

    builder._clone_input = keep
    try:
        yield
    finally:
        builder._clone_input = original


def runner_metadata(loaded, opts: ExportOptions, llm_attention: bool = False) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads (names as executorch 1.5.1's
    `llm_runner_helper` spells them; `get_max_seq_len` is required, the others have defaults
    there that would be wrong for us). Values: the prefill bound, the context the memory plan
    budgeted, the logits width, BOS/EOS from the tokenizer and generation config."""
    tok, model = loaded.tokenizer, loaded.model
    eos: set[int] = set()
    for source in (getattr(tok, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None)):
        for value in source if isinstance(source, (list, tuple)) else [source]:
            if value is not None:
                eos.add(int(value))
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    meta: dict[str, Any] = {
        "get_max_seq_len": opts.max_prefill,      # longest chunk one forward call accepts
        "get_max_context_len": opts.max_context,  # the static KV cache (memory plan's context)
        "get_vocab_size": _logits_width(model),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": llm_attention,
        "enable_dynamic_shape": True,             # forward takes 1..max_prefill tokens per call
    }
    if bos is not None:
        meta["get_bos_id"] = int(bos)
    if eos:
        meta["get_eos_ids"] = sorted(eos)
    return meta


def _logits_width(model) -> int:
    """Rows of the output head (a quantized head may hold its weight in another form)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def to_pte(program: torch.export.ExportedProgram, partitioners: list | None = None, *,
           etrecord: Path | None = None, constant_methods: dict[str, Any] | None = None):
    """Lower to ExecuTorch (XNNPACK by default); returns (.pte bytes, operator counts).

    With `etrecord`, the ETRecord (the edge graph with debug handles, which the profiler
    uses to name ETDump events by layer) is saved there; the `.pte` bytes are the same.
    """
    manager, counts = to_executorch(program, partitioners, etrecord=etrecord, constant_methods=constant_methods)
    return manager.buffer, counts


def write_pte(program: torch.export.ExportedProgram, path: Path, *,
              constant_methods: dict[str, Any] | None = None) -> dict[str, int]:
    """`to_pte` written straight to `path` (the serialized pieces one after another: no
    whole-program bytes object, which at 3B is 1.5 GB beside the tensors it was made from);
    returns the operator counts. The program is spent (`to_executorch`'s `spend`): neither it
    nor the module it was exported from can run afterwards."""
    manager, counts = to_executorch(program, constant_methods=constant_methods, spend=True)
    with open(path, "wb") as f:
        manager.write_to_file(f)
    return counts


def to_executorch(program: torch.export.ExportedProgram, partitioners: list | None = None, *,
                  etrecord: Path | None = None, constant_methods: dict[str, Any] | None = None,
                  spend: bool = False):
    """The lowered program's `ExecutorchProgramManager` and the operator counts (`to_pte`).

    `spend=True` frees the program's large constants as they are serialized
    (`_constants_freed_once_emitted`): the lowering then never holds the weights twice, and
    the program cannot be used again."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    # IR validity is not checked: liftedge::lq_linear is not a core ATen op (it is ours).
    edge = to_edge_transform_and_lower(program, partitioner=partitioners or [XnnpackPartitioner()],
                                       constant_methods=constant_methods,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                       generate_etrecord=etrecord is not None)
    counts = op_counts(edge.exported_program().graph_module)
    spent = edge.exported_program() if spend and etrecord is None else None
    freed = contextlib.nullcontext() if spent is None else _constants_freed_once_emitted(spent)
    with _fast_mutable_buffer_check(), freed:
        manager = edge.to_executorch()
    if etrecord is not None:
        manager.get_etrecord().save(str(etrecord))
    return manager, counts


# Constants smaller than this are left alone by `_constants_freed_once_emitted` (not worth it).
_FREE_MIN_NBYTES = 1 << 20


@contextlib.contextmanager
def _constants_freed_once_emitted(program: torch.export.ExportedProgram):
    """Emission (`to_executorch`) copies every constant into a bytes object of the program
    being serialized; the tensor it copied is not read again when nothing but the program holds
    it. Within this block, each constant's storage is freed as soon as it has been copied, where
    it is large, resizable (owned by torch: the repacked signs, not a memory-mapped pack field)
    and held under one name only (a tied table is not), so the lowering never holds the weights
    twice (the 8B lowering peaked 2.6 GB above its repacked weights). On leaving the block the
    rest of the program's large tensors (the KV-cache buffers, a tied table) are freed too:
    the ExportedProgram is spent, for a program that is written and dropped (no ETRecord)."""
    from collections import Counter

    from executorch.exir.emit._emitter import _Emitter

    held = [t for t in (*program.state_dict.values(), *program.constants.values()) if isinstance(t, torch.Tensor)]
    names = Counter(t.untyped_storage().data_ptr() for t in held)
    original = _Emitter._tensor_spec_to_evalue

    def emit_then_free(self, spec, *args, **kwargs):
        value = original(self, spec, *args, **kwargs)
        storage = spec.storage if spec.const else None
        if (storage is not None and storage.nbytes() >= _FREE_MIN_NBYTES and storage.resizable()
                and names.get(storage.data_ptr()) == 1):
            storage.resize_(0)
        return value

    _Emitter._tensor_spec_to_evalue = emit_then_free
    try:
        yield
    finally:
        _Emitter._tensor_spec_to_evalue = original
    for t in held:  # what emission left (mutable buffers: the KV cache; tied tables): spent too
        storage = t.untyped_storage()
        if storage.nbytes() >= _FREE_MIN_NBYTES and storage.resizable():
            storage.resize_(0)


@contextlib.contextmanager
def _fast_mutable_buffer_check():
    """Memory planning asks "is this placeholder a mutated buffer?" once per node, and
    executorch 1.5.1 rebuilds the signature's input->buffer map on every call: quadratic in
    the ~1,500 buffers of a 30-block pack (tens of minutes). Same answer, computed once."""
    from executorch.exir import memory_planning as mp

    original = mp._is_mutable_buffer
    cache: dict[int, tuple[Any, frozenset[str]]] = {}

    def is_mutable_buffer(node, graph_signature=None) -> bool:
        if graph_signature is None or node.op != "placeholder" or not isinstance(node.target, str):
            return False
        key = id(graph_signature)
        if key not in cache:
            mutated = set(graph_signature.buffers_to_mutate.values())
            names = frozenset(n for n, fqn in graph_signature.inputs_to_buffers.items() if fqn in mutated)
            cache[key] = (graph_signature, names)  # the reference keeps the id from being reused
        return node.target in cache[key][1]

    mp._is_mutable_buffer = is_mutable_buffer
    try:
        yield
    finally:
        mp._is_mutable_buffer = original


def op_counts(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """How many nodes of each operator stay outside delegates (delegate calls included)."""
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def lower_pack(pack: Path, out: Path, opts: ExportOptions) -> dict[str, Any]:
    """Write `out/model.pte`; return the report's lowering fields."""
    loaded, model, sites = prepare_model(pack, opts)
    attn = attention_lowering(model, opts)
    program = export_program(model, opts)
    _name_graph_fused_sites(fusion.graph_fused_layers(program), sites)
    metadata = runner_metadata(loaded, opts, attn["lowering"] == "llm ops")
    del loaded, model
    counts = write_pte(program, out / PTE_NAME, constant_methods=metadata)
    custom = sorted(k.split(".")[1] if "." in k else k for k in counts if k.startswith(f"{ops.NAMESPACE}."))
    n_custom = sum(v for k, v in counts.items() if k.startswith(f"{ops.NAMESPACE}."))
    return {"sites": sites, "operators": counts, "int8_head": any(
                v["lowering"].startswith(INT8_HEAD) for v in sites.values()), "custom_op_calls": n_custom,
            "requires_kernel_library": n_custom > 0, "attention": attn,
            "requires_llm_ops": attn["lowering"] == "llm ops",
            "custom_operators": [f"{ops.NAMESPACE}::{name}" for name in custom],
            "runner_metadata": metadata}
