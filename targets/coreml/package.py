"""Writing the `.mlpackage` of a pack: flexible inputs, model metadata, deterministic bytes, report.

The package follows the stateful LLM contract of swift-transformers' `LanguageModel` (see
`program` for the inputs, states and output) and its metadata convention: the keys under
`co.huggingface.exporters.*` (name, task, architecture, framework, precision) that Hugging
Face's exporters write and `LanguageModel` reads (`modelName`), plus `liftedge.*` keys for
what a runner needs beside the tokenizer files: the compute units the memory plan assumed,
the context and prompt-chunk limits, BOS / EOS / PAD ids. This module owns that and the
lowering report; the graph is `program`, the resident-memory table `residency`.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from liftedge.targets.coreml import program, residency

TASK = "text-generation"
# Descriptions Xcode shows for the contract's features.
DESCRIPTIONS = {
    program.INPUT_IDS: "token ids [1, T], 1 <= T <= max_prefill",
    program.CAUSAL_MASK: "additive fp16 mask [1, 1, T, E] over cache positions 0..E-1; E - T is the first token's "
                         "position (causality and sliding windows are also applied inside)",
    program.LOGITS: "next-token logits [1, T, vocab] (fp32)",
}


def metadata(config, manifest: dict, s: program.Shapes, compute_units: str, tokens: dict) -> dict[str, str]:
    """The package's user-defined metadata (all values strings, as the spec stores them)."""
    source = Path(str((manifest.get("source") or {}).get("path") or "model"))
    architectures = getattr(config, "architectures", None) or [config.model_type]
    formats = sorted({e.get("fmt") for e in manifest.get("sites", {}).values()})
    return {
        "co.huggingface.exporters.name": source.stem if source.suffix == ".gguf" else source.name,
        "co.huggingface.exporters.task": TASK,
        "co.huggingface.exporters.architecture": str(architectures[0]),
        "co.huggingface.exporters.framework": "pytorch",
        "co.huggingface.exporters.precision": "float32",
        "liftedge.compute_units": compute_units,
        "liftedge.max_context": str(s.max_context),
        "liftedge.max_prefill": str(s.max_prefill),
        "liftedge.bos_token_id": "" if tokens["bos_token_id"] is None else str(tokens["bos_token_id"]),
        "liftedge.eos_token_ids": ",".join(str(t) for t in tokens["eos_token_ids"]),
        "liftedge.pad_token_id": str(tokens["pad_token_id"]),
        "liftedge.weight_formats": ",".join(str(f) for f in formats),
    }


def save_package(prog, out: Path, s: program.Shapes, user_metadata: dict[str, str]) -> Path:
    """Serialise the decoder program as out/model.mlpackage (flexible T and E)."""
    import coremltools as ct

    t = ct.RangeDim(1, s.max_prefill)
    inputs = [ct.TensorType(program.INPUT_IDS, shape=(1, t), dtype=np.int32),
              ct.TensorType(program.CAUSAL_MASK, shape=(1, 1, ct.RangeDim(1, s.max_prefill),
                                                        ct.RangeDim(1, s.max_context)), dtype=np.float16)]
    return save_mlpackage(prog, Path(out) / program.PACKAGE_NAME, inputs, user_metadata)


def save_mlpackage(prog, path: Path, inputs=None, user_metadata: dict[str, str] | None = None) -> Path:
    """Write `prog` as an ML program package with no graph passes: the ops stay as written
    (the default pipeline would fold the fp16->fp32 casts of constants into fp32 copies)."""
    import coremltools as ct

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       inputs=inputs, pass_pipeline=ct.PassPipeline.EMPTY,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    model.save(str(path))
    make_manifest_deterministic(path)
    finish_spec(path, user_metadata or {})
    return path


def finish_spec(path: Path, user_metadata: dict[str, str]) -> None:
    """Set metadata and feature descriptions; drop the conversion date coremltools stamps in
    (so a rebuild is byte-identical)."""
    from coremltools.proto import Model_pb2

    file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(file.read_bytes())
    defined = spec.description.metadata.userDefined
    defined.pop("com.github.apple.coremltools.conversion_date", None)
    defined.update(user_metadata)
    for feature in [*spec.description.input, *spec.description.output]:
        if feature.name in DESCRIPTIONS:
            feature.shortDescription = DESCRIPTIONS[feature.name]
    file.write_bytes(spec.SerializeToString(deterministic=True))


def make_manifest_deterministic(path: Path) -> None:
    """coremltools names the package's items with random UUIDs; derive them from the paths."""
    file = path / "Manifest.json"
    manifest = json.loads(file.read_text())
    entries = manifest["itemInfoEntries"]
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "liftedge-coreml:" + item["path"]))
               for old, item in entries.items()}
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(entries.items(), key=lambda kv: kv[1]["path"])}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def lower_pack(pack: Path, out: Path, max_context: int, max_prefill: int,
               compute_units: str = residency.DEFAULT_COMPUTE_UNITS) -> dict[str, Any]:
    """Write out/model.mlpackage for `pack`; return the lowering report."""
    from transformers import AutoConfig

    from liftedge.lowering import special_tokens
    from liftedge.packed import read_manifest, read_quantized, read_weights

    residency.check_compute_units(compute_units)
    manifest = read_manifest(pack)
    config = AutoConfig.from_pretrained(str(pack), trust_remote_code=False)
    program.family_of(config)
    tensors = read_weights(pack)
    qtensors = read_quantized(pack, manifest, tensors)
    prog, sites, s = program.build_program(config, tensors, qtensors, max_context, max_prefill)
    tokens = special_tokens(pack)
    user_metadata = metadata(config, manifest, s, compute_units, tokens)
    path = save_package(prog, out, s, user_metadata)
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    weight_nbytes = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    pack_nbytes = int(manifest["totals"]["nbytes"])
    return {
        "artifacts": {"package": program.PACKAGE_NAME},
        "sites": sites,
        "program": {"deployment_target": "iOS18", "family": config.model_type, "layers": s.layers,
                    "states": {"names": [program.KEY_CACHE, program.VALUE_CACHE], "dtype": "fp16",
                               "shape": list(program.cache_shape(s))},
                    "compute": "fp32 activations, fp16 constants and KV cache"},
        "runtime": {"max_context": s.max_context, "max_prefill": s.max_prefill,
                    "convention": "swift-transformers LanguageModel (stateful): inputIds, causalMask, "
                                  "keyCache/valueCache states, logits",
                    "inputs": f"{program.INPUT_IDS} int32 [1, T] (1 <= T <= max_prefill), "
                              f"{program.CAUSAL_MASK} fp16 [1, 1, T, E] (1 <= E <= max_context; first position E - T)",
                    "outputs": f"{program.LOGITS} float32 [1, T, vocab]",
                    "compute_units": compute_units, **tokens},
        "metadata": user_metadata,
        "residency": residency.residency_report(pack_nbytes, qtensors, compute_units),
        "sizes": {"weight_file_nbytes": weight_nbytes, "pack_tensor_nbytes": pack_nbytes,
                  "weight_file_over_pack": round(weight_nbytes / pack_nbytes, 6)},
    }
