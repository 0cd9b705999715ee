"""Load a causal language model safely: a Hugging Face folder, a GGUF file, or the default.

`load_model(path)` accepts
  * a folder with `config.json` and safetensors weights (one file, or shards listed in
    `model.safetensors.index.json`) and tokenizer files;
  * a `.gguf` file (transformers dequantizes it to float);
  * None or "default": SmolLM2-135M-Instruct, fetched once into the cache (`liftedge.fetch`).
    The word "default" always means the built-in model; write "./default" for a folder.

Before anything is handed to transformers, the input is checked, and each problem is a
`ModelLoadError` naming the file: pickle checkpoints (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are
refused (unpickling runs arbitrary code), so is remote code (`auto_map`); a missing
`config.json`, invalid JSON, a missing or truncated safetensors file, a shard listed in the
index but absent, and an unsupported `model_type` (the message lists the supported ones).
After loading, every weight must be finite and none may be missing from the checkpoint.
The weights stay a memory map of the safetensors file (transformers 5); the pages the
finiteness check reads are given back (`liftedge.pages`), so a loaded model is resident
only where it is used.

The model comes back in eval mode, on CPU, without gradients. This module does not
enumerate sites (see `liftedge.sites`, re-exported here) and does not download anything
itself (see `liftedge.fetch`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from liftedge import fetch
from liftedge.cache import sha256_file, sha256_text
from liftedge.errors import ModelLoadError
from liftedge.io import atomic_output_dir, read_json_object
from liftedge.pages import release_clean_pages
from liftedge.sites import (  # noqa: F401  (re-exported: the public API lives here)
    FAMILIES,
    SUPPORTED_FAMILIES,
    decoder_blocks,
    get_module,
    list_sites,
    set_site_weight,
    site_weight,
)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = f"default:{fetch.DEFAULT_MODEL.name}"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
# Tokenizer files that, when present, are part of the source hash (they change the token ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
_MAX_HEADER_NBYTES = 100 << 20  # safetensors refuses headers above 100 MB; so do we


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and where it came from."""

    model: torch.nn.Module  # transformers PreTrainedModel: eval, on CPU, requires_grad False
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    family: str  # config.model_type, e.g. "llama", "gemma3_text", "gpt2", "gpt_neox"
    source: str  # the path given, or "default:SmolLM2-135M-Instruct"
    source_hash: str  # sha256 over the config, weight and tokenizer file contents

    @property
    def config(self):
        return self.model.config


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               mapped: bool = False) -> LoadedModel:
    """Load a Hugging Face folder, a `.gguf` file, or (None / "default") the built-in model.

    With `mapped`, a folder whose weights are stored narrower than `dtype` (fp16, bf16) keeps
    them in that dtype, a memory map of its safetensors files, and computes in `dtype` one
    module at a time (`liftedge.upcast`): the runs that walk the model block by block
    (quantizing, calibrating, measuring sensitivity) then hold one block in `dtype`, not the
    whole model. Other inputs load as without it.
    """
    if path is None or str(path) == "default":
        return _load_default(dtype)
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path, dtype, mapped=mapped)
    if not path.exists():
        raise ModelLoadError(
            f"{path} does not exist; give a Hugging Face model folder (config.json + *.safetensors), "
            "a .gguf file, or 'default'"
        )
    loader = _FILE_LOADERS.get(path.suffix.lower(), _unknown_file)
    return loader(path, dtype)


# ---------------------------------------------------------------- the default model


def _load_default(dtype: torch.dtype) -> LoadedModel:
    spec = fetch.DEFAULT_MODEL
    gguf = fetch.fetch(spec)
    if dtype != torch.float32:
        return _load_gguf(gguf, dtype, source=DEFAULT_SOURCE, file_sha256=spec.sha256)
    return _load_gguf_via_float_copy(gguf, source=DEFAULT_SOURCE, file_sha256=spec.sha256)


def _load_gguf_via_float_copy(gguf: Path, source: str, file_sha256: str) -> LoadedModel:
    """Load a verified GGUF file through a float32 Hugging Face copy kept beside it.

    Dequantizing SmolLM2's GGUF takes transformers 30-60 s on two cores; loading the float
    copy (~540 MB of safetensors) takes a few seconds. The copy is keyed by the GGUF's hash,
    written atomically, and rebuilt when it fails to load.
    """
    folder = gguf.with_name(f"{gguf.stem}.float32-{file_sha256[:12]}")
    source_hash = sha256_text("gguf", file_sha256)
    if folder.is_dir():
        try:
            return _load_hf_dir(folder, torch.float32, source=source, source_hash=source_hash)
        except ModelLoadError as exc:
            log.warning("rebuilding the float copy of %s: %s", gguf.name, exc)
    loaded = _load_gguf(gguf, torch.float32, source=source, file_sha256=file_sha256)
    _save_float_copy(loaded, folder)
    return loaded


def _save_float_copy(loaded: LoadedModel, folder: Path) -> None:
    try:
        with atomic_output_dir(folder, kind="float-copy", owned=True) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
    except OSError as exc:  # a full disk costs speed next time, nothing else
        log.warning("could not keep a float copy of the default model in %s: %s", folder, exc)


# ---------------------------------------------------------------- Hugging Face folders


def _load_hf_dir(folder: Path, dtype: torch.dtype, source: str | None = None,
                 source_hash: str | None = None, mapped: bool = False) -> LoadedModel:
    _refuse_pickle_only(folder)
    config = _read_json(folder / "config.json", what="the model configuration")
    _refuse_remote_code(folder, config)
    family = _check_family(config.get("model_type"), folder / "config.json")
    weights, shapes = _safetensors_files(folder)
    check_config_matches_tensors(config, shapes, str(folder / "config.json"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stored = _stored_float_dtype([w for w in weights if w.suffix == ".safetensors"]) if mapped else None
    narrow = stored is not None and stored.itemsize < dtype.itemsize
    model = _call(f"transformers could not load the model in {folder}", AutoModelForCausalLM.from_pretrained,
                  folder, dtype=stored if narrow else dtype, use_safetensors=True, trust_remote_code=False,
                  output_loading_info=True)
    if narrow:
        from liftedge.upcast import compute_in

        compute_in(model[0], dtype)
    tokenizer = _call(f"transformers could not load the tokenizer in {folder} (tokenizer.json or "
                      "tokenizer_config.json + vocab files)", AutoTokenizer.from_pretrained,
                      folder, trust_remote_code=False)
    if (folder / "tokenizer_config.json").is_file():
        from liftedge.text import follow_tokenizer_config

        follow_tokenizer_config(tokenizer, _read_json(folder / "tokenizer_config.json", what="the tokenizer configuration"))
    if source_hash is None:
        source_hash = _hash_files(folder, [folder / "config.json", *weights, *(folder / n for n in TOKENIZER_FILES)])
    return _finish(model, tokenizer, family, source or str(folder), source_hash)


def _refuse_pickle_only(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}) and no *.safetensors; "
            "liftedge never unpickles (it can run arbitrary code). Convert the weights to safetensors."
        )


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, ModelLoadError, f"missing {path.name} in {path.parent} ({what})")


def _refuse_remote_code(folder: Path, config: dict) -> None:
    offenders = ["config.json"] if "auto_map" in config else []
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file() and "auto_map" in _read_json(tok_config, what="the tokenizer configuration"):
        offenders.append("tokenizer_config.json")
    if offenders:
        code = sorted(p.name for p in folder.glob("*.py"))
        raise ModelLoadError(
            f"{folder} asks for remote code (auto_map in {', '.join(offenders)}"
            + (f"; code files: {', '.join(code)}" if code else "")
            + "); liftedge never runs a model's custom code. Supported families: "
            + ", ".join(SUPPORTED_FAMILIES)
        )


def _check_family(model_type: str | None, where: Path | str) -> str:
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"model_type {model_type!r} in {where} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, tuple[int, ...]]]:
    """The weight files (index first, then shards), each checked to be complete, and every tensor's shape."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index, what="the safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no 'weight_map' of tensor names to shard files")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts
                   or Path(n).name != n]
        if outside:
            raise ModelLoadError(f"{index} names shard files outside {folder}: {outside[:3]}; shards must be plain "
                                 "file names in the model folder")
        shards = [folder / name for name in names]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} lists shard(s) missing from {folder}: {', '.join(missing)}")
        files = [index, *shards]
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise ModelLoadError(f"missing weights in {folder}: no model.safetensors (or {INDEX_NAME} + shards)")
        files = shards
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shapes.update(_check_safetensors(shard))
    return files, shapes


def _check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Check the header of a safetensors file and that its data is all there; return the shapes."""
    file_nbytes = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_nbytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_nbytes < 0 or header_nbytes > _MAX_HEADER_NBYTES or 8 + header_nbytes > file_nbytes:
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file ({file_nbytes} bytes)")
        try:
            header = json.loads(f.read(header_nbytes))
            data_nbytes = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                              default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelLoadError(f"{path.name} has a corrupt safetensors header: {exc}") from exc
    expected = 8 + header_nbytes + data_nbytes
    if file_nbytes < expected:
        raise ModelLoadError(f"{path.name} is truncated: its header needs {expected} bytes, the file has {file_nbytes}")
    return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _stored_float_dtype(shards: list[Path]) -> torch.dtype | None:
    """The one dtype every floating tensor of the shards is stored in; None if they differ."""
    found = set()
    for shard in shards:
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # checked by _check_safetensors
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] in _SAFETENSORS_FLOATS}
    return _SAFETENSORS_FLOATS[found.pop()] if len(found) == 1 else None


# Decoder-block tensors are named "...layers.N." (Llama, Qwen, Mistral, Gemma, GPT-NeoX) or "...h.N." (GPT-2).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:embed_tokens|wte|embed_in)\.weight$")


def peek_max_positions(spec: str | os.PathLike) -> int | None:
    """The positions a model folder's (or pack's) config.json was made for, read without loading
    anything else; None where no config says (GGUF files, the default model, unreadable configs)."""
    path = Path(str(spec))
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader reports a broken config with its own words
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = text.get(key, config.get(key))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_config_matches_tensors(config: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config.json that does not describe the checkpoint's tensors, before any model is
    built from it (an absurd `num_hidden_layers` would otherwise allocate until killed)."""
    sizes = {"num_hidden_layers": config.get("num_hidden_layers", config.get("n_layer")),
             "hidden_size": config.get("hidden_size", config.get("n_embd")),
             "vocab_size": config.get("vocab_size")}
    text = config.get("text_config")  # Gemma 3 multimodal configs nest the decoder's sizes
    if isinstance(text, dict):
        sizes = {k: text.get(k, v) for k, v in sizes.items()}
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelLoadError(f"{where}: {key} must be a positive integer, got {value!r}")
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK_INDEX.search(name))}
    layers = sizes["num_hidden_layers"]
    if blocks and layers is not None and blocks != set(range(layers)):
        raise ModelLoadError(f"{where}: num_hidden_layers is {layers} but the checkpoint's tensors hold "
                             f"{len(blocks)} decoder blocks (0..{max(blocks)}); config and weights do not match")
    embedding = next((shape for name, shape in shapes.items() if _EMBEDDING.search(name)), None)
    if embedding is not None and len(embedding) == 2:
        for key, dim, what in (("vocab_size", 0, "rows"), ("hidden_size", 1, "columns")):
            if sizes[key] is not None and embedding[dim] != sizes[key]:
                raise ModelLoadError(f"{where}: {key} is {sizes[key]} but the token embedding has "
                                     f"{embedding[dim]} {what}; config and weights do not match")


def check_tokenizer_fits(tokenizer, n_embeddings: int, where: str, error=ModelLoadError) -> None:
    """Refuse a tokenizer that can produce ids past the model's embedding table."""
    n = len(tokenizer)
    if n > n_embeddings:
        raise error(f"{where}: the tokenizer has {n} tokens but the model's embedding only {n_embeddings} "
                    "rows; the tokenizer files do not belong to this model")


# ---------------------------------------------------------------- GGUF files


def _load_gguf(path: Path, dtype: torch.dtype, source: str | None = None,
               file_sha256: str | None = None) -> LoadedModel:
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    model = _call(f"transformers could not read the GGUF file {path}", AutoModelForCausalLM.from_pretrained,
                  folder, gguf_file=name, dtype=dtype, trust_remote_code=False, output_loading_info=True)
    family = _check_family(model[0].config.model_type, path)
    _forget_gguf_origin(model[0])
    tokenizer = _call(f"transformers could not build a tokenizer from {path}", AutoTokenizer.from_pretrained,
                      folder, gguf_file=name, trust_remote_code=False)
    digest = sha256_text("gguf", file_sha256 or sha256_file(path))
    return _finish(model, tokenizer, family, source or str(path), digest)


def _forget_gguf_origin(model) -> None:
    """The weights are plain floats now; transformers still marks the model as GGUF-quantized,
    which makes `is_quantized` true and `save_pretrained` refuse. Drop the marker."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# llama.cpp architecture names that transformers dequantizes into one of our families.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")
# GGUF metadata value types: fixed-size scalars by struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_KEPT_KEYS = ("general.architecture", "general.alignment")


def _check_gguf(path: Path) -> str:
    """Check a GGUF file's header and length without loading it; return its architecture."""
    file_nbytes = path.stat().st_size
    try:
        arch, needed_nbytes = _read_gguf_header(path)
    except (struct.error, UnicodeDecodeError, KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} has a truncated or corrupt GGUF header: {exc}") from None
    if file_nbytes < needed_nbytes:
        raise ModelLoadError(f"{path} is truncated: its header needs {needed_nbytes} bytes, the file has {file_nbytes}")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def _read_gguf_header(path: Path) -> tuple[str | None, int]:
    """`general.architecture` and the file length that the tensor table implies."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file_nbytes = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        _version, n_tensors, n_kv = _gguf_unpack(f, "<I"), _gguf_unpack(f, "<Q"), _gguf_unpack(f, "<Q")
        # every entry takes bytes of the file: a count beyond its length is corrupt, not a long loop
        _gguf_check_count(n_tensors + n_kv, file_nbytes, "header entries")
        meta = {}
        for _ in range(n_kv):
            key, value_type = _gguf_read_string(f), _gguf_unpack(f, "<I")
            if key in _GGUF_KEPT_KEYS:
                meta[key] = _gguf_read_string(f) if value_type == _GGUF_STRING else _gguf_unpack(f, _GGUF_SCALARS[value_type])
            else:
                _gguf_skip_value(f, value_type)
        data_nbytes = 0
        for _ in range(n_tensors):
            _gguf_read_string(f)
            n_dims = _gguf_unpack(f, "<I")
            if n_dims > 8:
                raise ValueError(f"a tensor with {n_dims} dimensions")
            dims = [_gguf_unpack(f, "<Q") for _ in range(n_dims)]
            block, block_nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(_gguf_unpack(f, "<I"))]
            data_nbytes = max(data_nbytes, _gguf_unpack(f, "<Q") + math.prod(dims) // block * block_nbytes)
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1) or align > 1 << 20:
            raise ValueError(f"general.alignment must be a power of two, got {align!r}")
        data_start = -(-f.tell() // align) * align
    return meta.get("general.architecture"), data_start + data_nbytes


def _gguf_unpack(f, fmt: str):
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _gguf_read_string(f) -> str:
    nbytes = _gguf_unpack(f, "<Q")
    if nbytes > 1 << 24:
        raise ValueError(f"a {nbytes}-byte string")
    return f.read(nbytes).decode("utf-8")


def _gguf_check_count(count: int, file_nbytes: int, what: str) -> None:
    if count > file_nbytes:
        raise ValueError(f"{count} {what} in a file of {file_nbytes} bytes")


def _gguf_skip_value(f, value_type: int) -> None:
    if value_type == _GGUF_STRING:
        f.seek(_gguf_unpack(f, "<Q"), 1)
    elif value_type == _GGUF_ARRAY:
        item_type, count = _gguf_unpack(f, "<I"), _gguf_unpack(f, "<Q")
        _gguf_check_count(count, os.fstat(f.fileno()).st_size, "array items")
        if item_type in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), 1)
        else:
            for _ in range(count):
                _gguf_skip_value(f, item_type)
    else:
        f.seek(struct.calcsize(_GGUF_SCALARS[value_type]), 1)


# ---------------------------------------------------------------- other files


def _refuse_pickle_file(path: Path, dtype: torch.dtype) -> LoadedModel:
    raise ModelLoadError(
        f"{path.name} is a pickle checkpoint; liftedge never unpickles (it can run arbitrary code). "
        "Give a folder with config.json and *.safetensors, or a .gguf file."
    )


def _single_safetensors(path: Path, dtype: torch.dtype) -> LoadedModel:
    raise ModelLoadError(f"{path} is a weights file alone; give its folder (with config.json and tokenizer files)")


def _unknown_file(path: Path, dtype: torch.dtype) -> LoadedModel:
    raise ModelLoadError(
        f"{path} is neither a model folder nor a .gguf file; give a Hugging Face model folder "
        "(config.json + *.safetensors), a .gguf file, or 'default'"
    )


_FILE_LOADERS: dict[str, Callable[[Path, torch.dtype], LoadedModel]] = {
    ".gguf": _load_gguf,
    ".safetensors": _single_safetensors,
    **{suffix: _refuse_pickle_file for suffix in PICKLE_SUFFIXES},
}


# ---------------------------------------------------------------- shared


def _call(what: str, fn, *args, **kwargs):
    """Run a transformers loader; its failures become a ModelLoadError that says what failed."""
    try:
        return fn(*args, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise ModelLoadError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _finish(loaded, tokenizer, family: str, source: str, source_hash: str) -> LoadedModel:
    model, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"{source}: weights missing from the checkpoint (they would be random): {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    if info.get("mismatched_keys"):
        raise ModelLoadError(f"{source}: weights with the wrong shape for config.json: {info['mismatched_keys'][:5]}")
    model.eval().requires_grad_(False)
    check_tokenizer_fits(tokenizer, model.get_input_embeddings().num_embeddings, source)
    _check_finite(model, source)
    log.info("loaded %s (%s, %d parameters)", source, family, sum(p.numel() for p in model.parameters()))
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, source=source, source_hash=source_hash)


def _check_finite(model: torch.nn.Module, source: str) -> None:
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):  # tied: once
        # A finite sum proves every element finite (NaN and Inf propagate) and costs a tenth
        # of `isfinite`; only a non-finite sum (or an overflow) needs the element-wise test.
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ModelLoadError(f"{source}: tensor {name} has {bad} non-finite values (NaN or Inf)")
        # The check read every page of the memory-mapped weights; without this the loaded
        # model would stay resident in full although callers use it a block at a time.
        release_clean_pages([tensor])


def _hash_files(root: Path, paths: list[Path]) -> str:
    """sha256 over (name, content hash) of the files that exist, in a fixed order."""
    present = sorted({p for p in paths if p.is_file()}, key=lambda p: p.name)
    return sha256_text("hf", *(f"{p.relative_to(root)}={sha256_file(p)}" for p in present))
