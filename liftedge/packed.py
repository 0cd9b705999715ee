"""The canonical on-disk form of a quantized model (a "pack"), which every target lowers from.

A pack is a folder:

| file                  | content                                                             |
|-----------------------|---------------------------------------------------------------------|
| `manifest.json`       | format "liftedge-pack", version 1, per-site formats and byte counts, |
|                       | totals, source model, quantizer config, calibration, plan, version  |
| `weights.safetensors` | quantized site fields as "<site>.<field>" (e.g. "...q_proj.codes"), |
|                       | every other parameter (norms, biases, embeddings, head) as fp16;    |
|                       | tied weights stored once (under the first name, usually the embedding) |
| `config.json`, tokenizer files | so the pack loads standalone                               |

The manifest's byte counts are the truth the planner and the reports use:
`totals.bits_per_weight` = 8 x (bytes of every linear site in the decoder blocks, packed
fields as stored, an unquantized one at fp16) / their weight count. Embeddings and the head
are outside that average and are stored as fp16 unless a quantized form is given for them:
the token embedding (or an untied head) may be an "int" site; a head tied to it then has no
tensor of its own, and the reference model reads the embedding's stored table for both the
lookup (decoding only the rows looked up) and the logits (`targets/reference/embedding.py`).

Writing is atomic (`liftedge.io.atomic_output_dir`) and deterministic: tensors are laid out
by safetensors in a fixed order, its metadata is one key, JSON is key-sorted, nothing records
a time. `load_packed` rebuilds the architecture from config.json (no remote code), keeps the
fp16 weights of plain linear and embedding layers fp16 (views of the mapped file, widened per
call: `liftedge.upcast.NarrowLinear`), loads the other fp16 parameters (norms, biases) as
float32, and puts the reference module of each site's format (`liftedge.targets.reference`)
in place of the quantized layer. Any unreadable, truncated or
inconsistent pack is an `ArtifactError` naming the file.

This module owns the folder layout and the manifest; formats' byte layouts belong to
`liftedge.targets.reference`, producing the quantized tensors to `liftedge.quantize`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from liftedge import __version__
from liftedge.cache import sha256_file, sha256_text
from liftedge.errors import ArtifactError
from liftedge.io import atomic_output_dir, atomic_write_json, read_json_object
from liftedge.types import QuantizedTensor, Site
from liftedge.upcast import keep_narrow, narrowable

log = logging.getLogger(__name__)

PACK_FORMAT = "liftedge-pack"
PACK_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
# Unquantized linear weights are counted (and stored) at fp16.
FP16_BITS = 16


# ---------------------------------------------------------------- writing


def save_packed(path: str | os.PathLike, loaded, qtensors: Mapping[str, QuantizedTensor], *,
                method: str | Mapping[str, str], quantizer: dict[str, Any] | None = None,
                calibration: dict[str, Any] | None = None, plan: dict[str, Any] | None = None,
                force: bool = False) -> dict[str, Any]:
    """Write `loaded` with `qtensors` (site name -> QuantizedTensor) as a pack at `path`.

    `method` names the quantization method of every site (or a map site -> method);
    `quantizer` (method config), `calibration` and `plan` are recorded as given (JSON-able).
    Returns the manifest written.
    """
    from liftedge.model import list_sites
    from liftedge.text import protocol_name

    model = loaded.model
    sites = {s.name: s for s in list_sites(model)}
    _check_sites(qtensors, sites)
    tensors = _site_tensors(qtensors)
    skip = {f"{name}.weight" for name in qtensors}
    params = _other_parameters(model, skip)
    clash = sorted(set(tensors) & set(params))
    if clash:
        raise ArtifactError(f"quantized fields clash with parameter names: {clash[:3]}")
    tensors.update(params)
    manifest = pack_manifest(sites, qtensors, tensors, method=method,
                             source={"path": _absolute_source(loaded.source), "sha256": loaded.source_hash,
                                     "family": loaded.family},
                             protocol=protocol_name(loaded.tokenizer), quantizer=quantizer,
                             calibration=calibration, plan=plan)
    with atomic_output_dir(path, force=force) as tmp:
        _write_weights(tmp / WEIGHTS_NAME, tensors)
        model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        # The weights' hash in the manifest: a weights file swapped in from another pack of the
        # same shape, or damaged on disk, is refused on load (`read_weights`).
        manifest["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    log.info("wrote pack %s (%d quantized sites, %.3f bits/weight)", path, len(qtensors),
             manifest["totals"]["bits_per_weight"])
    return manifest


def pack_manifest(sites: Mapping[str, Site], qtensors: Mapping[str, QuantizedTensor],
                  tensors: Mapping[str, torch.Tensor], *, method: str | Mapping[str, str], source: dict[str, Any],
                  protocol: str, quantizer: dict[str, Any] | None, calibration: dict[str, Any] | None,
                  plan: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a pack (all but `weights_sha256`), from shapes and dtypes alone: `tensors`
    (every stored tensor, site fields included) and `qtensors` may live on the meta device."""
    return {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "liftedge_version": __version__,
        "source": source,
        "protocol": protocol,  # text fed with BOS first or not (liftedge.text)
        "quantizer": quantizer,
        "calibration": calibration,
        "plan": plan,
        "sites": {name: _site_entry(sites[name], qt, method) for name, qt in qtensors.items()},
        "totals": _totals(sites, qtensors, tensors),
    }


def _absolute_source(source) -> str:
    """The source model as an absolute path (a relative one would later be read from another
    folder), or liftedge's own name for the built-in default ("default:NAME")."""
    text = str(source)
    return text if text.startswith("default:") else str(Path(text).absolute())


def _check_sites(qtensors: Mapping[str, QuantizedTensor], sites: Mapping[str, Site]) -> None:
    from liftedge.targets.reference import get_format

    for name, qt in qtensors.items():
        if name not in sites:
            raise ArtifactError(f"{name} is not a site of this model")
        site = sites[name]
        if site.tied_to is not None:
            raise ArtifactError(f"{name} shares its weight with {site.tied_to}; quantize the owner instead")
        get_format(qt.fmt).check(qt)
        shape = (qt.meta.get("out_features"), qt.meta.get("in_features"))
        if shape != (site.out_features, site.in_features):
            raise ArtifactError(f"{name}: quantized shape {list(shape)} != site shape "
                                f"{[site.out_features, site.in_features]}")


def _site_tensors(qtensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    return {f"{name}.{field}": t.detach().cpu().contiguous().clone()
            for name, qt in qtensors.items() for field, t in qt.tensors.items()}


def _other_parameters(model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter not in `skip`, floats as fp16; a tied parameter once (first name)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if name in skip:
            continue
        t = p.detach().cpu()
        out[name] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous().clone()
    return out


def _site_entry(site: Site, qt: QuantizedTensor, method: str | Mapping[str, str]) -> dict[str, Any]:
    return {
        "method": method if isinstance(method, str) else method[site.name],
        "fmt": qt.fmt,
        "meta": dict(qt.meta),
        "kind": site.kind,
        "shape": [site.out_features, site.in_features],
        "transposed": site.transposed,
        "nbytes": qt.nbytes,
        "tensors": {f: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                    for f, t in sorted(qt.tensors.items())},
    }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _totals(sites: Mapping[str, Site], qtensors: Mapping[str, QuantizedTensor],
            tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    linear = [s for s in sites.values() if s.kind == "linear" and s.block is not None]
    linear_numel = sum(s.numel for s in linear)
    linear_nbytes = sum(qtensors[s.name].nbytes if s.name in qtensors else s.numel * FP16_BITS // 8
                        for s in linear)
    quantized_numel = sum(sites[n].numel for n in qtensors)
    other_numel = sum(t.numel() for k, t in tensors.items() if not _is_site_field(k, qtensors))
    return {
        "quantized_sites": len(qtensors),
        "quantized_nbytes": sum(qt.nbytes for qt in qtensors.values()),
        "nbytes": sum(_nbytes(t) for t in tensors.values()),
        "linear_numel": linear_numel,
        "linear_nbytes": linear_nbytes,
        "bits_per_weight": round(8 * linear_nbytes / linear_numel, 6) if linear_numel else 0.0,
        "numel": quantized_numel + other_numel,
    }


def _is_site_field(key: str, qtensors: Mapping[str, QuantizedTensor]) -> bool:
    site, _, field = key.rpartition(".")
    return site in qtensors and field in qtensors[site].tensors


def _write_weights(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # One metadata key only: safetensors writes its metadata map in hash order, so several
    # keys would make the bytes differ from run to run.
    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": PACK_FORMAT})


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8",
                       torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def write_weights_streaming(path: Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], produce) -> None:
    """Write a safetensors file of the tensors `specs` names (name -> (dtype, shape)), asking
    `produce(name)` for each in turn: only one tensor is ever held, whatever the total size.

    The header is laid out from the specs first (names sorted, data back to back, header padded
    to 8 bytes as safetensors does); a produced tensor that differs from its spec is an error.
    `safetensors.torch.load_file` reads the result like any other file.
    """
    import json
    import struct

    names = sorted(specs)
    header: dict[str, Any] = {"__metadata__": {"format": PACK_FORMAT}}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            dtype, shape = specs[name]
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ArtifactError(f"{name}: produced {t.dtype} {list(t.shape)}, the header says {dtype} {list(shape)}")
            data = t.detach().cpu().contiguous()
            if data.numel():
                f.write(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
            del t, data


# ---------------------------------------------------------------- reading


def is_pack(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding a pack manifest. A corrupt manifest still makes it a pack:
    reading it then says "corrupt pack" rather than treating the folder as a model."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the pack at `path`, checked for format and version."""
    file = Path(path) / MANIFEST_NAME
    manifest = read_json_object(file, ArtifactError, f"{file} not found: {path} is not a liftedge pack",
                                "; the pack is corrupt")
    if manifest.get("format") != PACK_FORMAT:
        raise ArtifactError(f"{file} does not describe a {PACK_FORMAT!r} pack")
    if manifest.get("version") != PACK_VERSION:
        raise ArtifactError(f"{file} has pack version {manifest.get('version')!r}; this liftedge reads "
                            f"version {PACK_VERSION} only")
    for key in ("sites", "totals", "source"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{file} lacks its {key!r} section; the pack is corrupt")
    _check_manifest_schema(manifest, file)
    return manifest


# What every reader of a manifest relies on: field -> accepted JSON types.
_SITE_FIELDS = {"method": str, "fmt": str, "meta": dict, "kind": str, "shape": list, "nbytes": int, "tensors": dict}
_TOTAL_FIELDS = ("quantized_sites", "quantized_nbytes", "nbytes", "linear_numel", "linear_nbytes",
                 "bits_per_weight", "numel")


def _check_manifest_schema(manifest: dict[str, Any], file: Path) -> None:
    """Refuse a manifest whose sites or totals are not what liftedge wrote (one line, not a traceback)."""
    for name, entry in manifest["sites"].items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{file}: site {name} is a {type(entry).__name__}, not an object; the pack is corrupt")
        for field, kind in _SITE_FIELDS.items():
            if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
                raise ArtifactError(f"{file}: site {name} lacks a valid {field!r} ({kind.__name__}); "
                                    "the pack is corrupt")
        shape = entry["shape"]
        if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ArtifactError(f"{file}: site {name} has shape {shape!r}; the pack is corrupt")
    for field in _TOTAL_FIELDS:
        value = manifest["totals"].get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ArtifactError(f"{file}: totals.{field} is {value!r}, not a number; the pack is corrupt")
    if not isinstance(manifest["source"].get("path"), str):
        raise ArtifactError(f"{file}: source.path is missing; the pack is corrupt")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the pack's weights.safetensors, as stored: checked against the manifest's
    SHA-256 (packs written since it was recorded) and for non-finite values.

    The tensors are views of a private (copy-on-write) memory map of the file, not heap copies:
    pages are read when touched and are page cache the kernel can reclaim, so a lowering that
    repacks the signs holds the pack once, not twice (a 3B pack is 1.5 GB). A write to a tensor
    stays in this process; packs are replaced by rename (`liftedge.io`), never rewritten in
    place, so a mapped file does not change under its reader."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ArtifactError(f"{file} not found; the pack is incomplete")
    expected = read_manifest(path).get("weights_sha256")
    if expected is not None and sha256_file(file) != expected:
        raise ArtifactError(f"{file} is not the weights file this pack's manifest was written with (SHA-256 "
                            "differs): replaced or damaged; rebuild the pack")
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncation/corruption
        raise ArtifactError(f"{file} cannot be read ({type(exc).__name__}: {exc}); the pack is corrupt") from None
    for name, tensor in tensors.items():
        # a finite sum proves every element finite; only a non-finite one needs the element test
        if tensor.is_floating_point() and not torch.isfinite(tensor.float().sum()):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ArtifactError(f"{file}: tensor {name} has {bad} non-finite values (NaN or Inf); "
                                    "the pack is corrupt")
    return tensors


def read_quantized(path: str | os.PathLike, manifest: dict[str, Any] | None = None,
                   tensors: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedTensor]:
    """The quantized sites of a pack, site name -> QuantizedTensor (checked against their format)."""
    from liftedge.targets.reference import get_format

    manifest = manifest if manifest is not None else read_manifest(path)
    tensors = tensors if tensors is not None else read_weights(path)
    file = Path(path) / WEIGHTS_NAME
    out = {}
    for name, entry in manifest["sites"].items():
        if not isinstance(entry, dict) or not {"fmt", "meta", "tensors"} <= set(entry):
            raise ArtifactError(f"{Path(path) / MANIFEST_NAME}: site {name} lacks fmt/meta/tensors; corrupt pack")
        fields = {}
        for field in entry["tensors"]:
            key = f"{name}.{field}"
            if key not in tensors:
                raise ArtifactError(f"{file} lacks tensor {key!r} listed in the manifest; the pack is corrupt")
            fields[field] = tensors[key]
        qt = QuantizedTensor(entry["fmt"], fields, dict(entry["meta"]))
        try:
            get_format(qt.fmt).check(qt)
        except ArtifactError as exc:
            raise ArtifactError(f"{file}: site {name}: {exc}") from None
        out[name] = qt
    return out


def load_packed(path: str | os.PathLike):
    """Rebuild the quantized model of a pack as a `LoadedModel` (reference modules; computes in float32)."""
    return load_packed_quantized(path)[0]


def load_packed_quantized(path: str | os.PathLike):
    """`load_packed`, and the pack's quantized sites (`read_quantized`) from the same read: the
    reference modules and a target's export modules then share the stored tensors."""
    from liftedge.model import LoadedModel, check_tokenizer_fits

    path = Path(path)
    manifest = read_manifest(path)
    tensors = read_weights(path)
    qtensors = read_quantized(path, manifest, tensors)
    model = _build_model(path, {k: tuple(v.shape) for k, v in tensors.items()})
    fields = {f"{n}.{f}" for n, qt in qtensors.items() for f in qt.tensors}
    narrow = _narrow_weights(model, tensors, fields)
    params = {k: v.to(torch.float32) if v.is_floating_point() and k not in narrow else v
              for k, v in tensors.items() if k not in fields}
    _load_parameters(model, params, set(qtensors), path / WEIGHTS_NAME)
    for holders in narrow.values():
        keep_narrow(holders)
    install_reference_modules(model, qtensors)
    model.eval().requires_grad_(False)
    tokenizer = _load_tokenizer(path)
    check_tokenizer_fits(tokenizer, model.config.get_text_config().vocab_size, str(path), error=ArtifactError)
    source_hash = sha256_text(PACK_FORMAT, sha256_file(path / MANIFEST_NAME), sha256_file(path / WEIGHTS_NAME))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, family=manifest["source"].get("family"),
                         source=str(path), source_hash=source_hash)
    return loaded, qtensors


def _narrow_weights(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                    fields: set[str]) -> dict[str, list[torch.nn.Module]]:
    """The pack's unquantized fp16 weights that stay fp16 (views of the mapped file), by name,
    with the modules holding each (two when tied): those of plain Linear and Embedding layers,
    which then widen them per call (`liftedge.upcast.keep_narrow`). Every other float tensor
    (norms, biases, subclassed layers) is loaded as float32."""
    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(module)
    out = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        stored = tensors.get(name)
        if (name.endswith(".weight") and name not in fields and stored is not None and stored.dtype == torch.float16
                and narrowable(holders[id(param)])):
            out[name] = holders[id(param)]
    return out


def _build_model(path: Path, shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from liftedge.errors import ModelLoadError
    from liftedge.model import check_config_matches_tensors

    file = path / "config.json"
    if not file.is_file():
        raise ArtifactError(f"{file} not found; the pack is incomplete")
    raw = read_json_object(file, ArtifactError, f"{file} not found", "; the pack is corrupt")
    try:
        check_config_matches_tensors(raw, shapes, str(file))
    except ModelLoadError as exc:
        raise ArtifactError(str(exc)) from None
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ArtifactError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from None
    if getattr(config, "auto_map", None):
        raise ArtifactError(f"{file} asks for remote code (auto_map); liftedge never runs it")
    from accelerate import init_empty_weights

    # Parameters on the meta device (no fp32 copy of the whole model, no random init: a 1B
    # config would cost 4.9 GB and minutes here); buffers (rotary tables) are real.
    # `_load_parameters` assigns the pack's tensors; quantized sites are replaced by modules.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # inside the context, tying re-creates the parameter and loses the identity
    return model


def _load_parameters(model: torch.nn.Module, params: dict[str, torch.Tensor], sites: set[str], file: Path) -> None:
    expected = dict(model.named_parameters(remove_duplicate=True))
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ArtifactError(f"{file} holds tensors the model does not have: {unexpected[:3]}; corrupt pack?")
    missing = sorted(k for k in expected if k not in params and k.removesuffix(".weight") not in sites)
    if missing:
        raise ArtifactError(f"{file} lacks parameters {missing[:3]}; the pack is incomplete")
    new: dict[int, torch.nn.Parameter] = {}
    for name, value in params.items():
        target = expected[name]
        if tuple(target.shape) != tuple(value.shape):
            raise ArtifactError(f"{file}: {name} has shape {list(value.shape)}, the model expects "
                                f"{list(target.shape)}")
        if value.is_floating_point() and value.dtype != torch.float16:
            value = value.to(target.dtype)
        new[id(target)] = torch.nn.Parameter(value, requires_grad=False)
    # Assigned, not copied (the model's parameters are on the meta device), everywhere the old
    # parameter object is held, so a tied head keeps sharing its embedding's weight.
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put `new` where the submodule `name` ("a.b.c") of `model` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def install_reference_modules(model: torch.nn.Module, qtensors: Mapping[str, QuantizedTensor]) -> None:
    """Replace each quantized site by its format's reference module (keeping the site's bias).

    A quantized embedding becomes a lookup that decodes only the rows it gathers; a head tied
    to it becomes a `TiedHead` over the same stored table (one copy, as packed).
    """
    from liftedge.model import list_sites
    from liftedge.targets.reference import TiedHead, make_embedding, make_module

    sites = {s.name: s for s in list_sites(model)}  # before any swap: tying is read from the weights
    for name, qt in qtensors.items():
        if name not in sites:
            raise ArtifactError(f"the pack quantizes {name}, which is not a site of its model; corrupt pack")
        old = model.get_submodule(name)
        site = sites[name]
        packed_shape = (qt.meta.get("out_features"), qt.meta.get("in_features"))
        if packed_shape != (site.out_features, site.in_features):
            raise ArtifactError(f"the pack's site {name} is {packed_shape[0]} x {packed_shape[1]} but the model's "
                                f"layer is {site.out_features} x {site.in_features}; pack and config do not match")
        if name in sites and sites[name].kind == "embedding":
            scale = getattr(old, "embed_scale", None)
            emb = make_embedding(qt, None if scale is None else float(scale))
            replace_module(model, name, emb)
            for head in (s for s in sites.values() if s.tied_to == name):
                replace_module(model, head.name, TiedHead(emb, getattr(model.get_submodule(head.name), "bias", None)))
        else:
            replace_module(model, name, make_module(qt, getattr(old, "bias", None)))


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ArtifactError(f"the tokenizer files in {path} cannot be read ({type(exc).__name__}: {exc})") from None
