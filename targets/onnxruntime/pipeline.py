"""The target's two contract steps: pack -> files (`lower_pack`), files -> record (`verify_artifact`).

This module sequences the others (read the pack, build the graph, write the files, convert
to `.ort`, run the checks) and writes the report entries; it holds no graph logic itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from liftedge.errors import ArtifactError
from liftedge.lowering import chat_template, copy_tokenizer, special_tokens
from liftedge.targets.onnxruntime.builder import ExternalData

MODEL_NAME, GENAI_NAME, DATA_NAME = "model.onnx", "genai_config.json", "model.onnx.data"
# The .ort file is one flatbuffer, which cannot address past 2 GiB (no external data in it).
ORT_FORMAT_MAX_NBYTES = 1 << 31


def read_pack(pack: Path):
    """(config, params fp16 numpy by name, quantized sites, manifest)."""
    from transformers import AutoConfig

    from liftedge.packed import read_manifest, read_quantized, read_weights

    manifest = read_manifest(pack)
    tensors = read_weights(pack)
    sites = read_quantized(pack, manifest, tensors)
    fields = {f"{n}.{f}" for n, qt in sites.items() for f in qt.tensors}
    params = {k: v.numpy() for k, v in sorted(tensors.items()) if k not in fields}
    try:
        config = AutoConfig.from_pretrained(str(pack), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ArtifactError(f"{pack / 'config.json'} cannot be read ({type(exc).__name__}: {exc})") from None
    return config, params, sites, manifest


def build_model(pack: Path, external=None) -> tuple[onnx.ModelProto, dict[str, Any], Any, Any]:
    """The pack's ModelProto; with `external` (builder.ExternalData) and weights past its
    threshold, their bytes are written to its file while the model is made."""
    from liftedge.targets.onnxruntime.families import make_builder

    config, params, sites, manifest = read_pack(pack)
    builder = make_builder(config, params, sites)
    model = builder.build(external)
    return model, builder.report, builder.s, (config, manifest)


def initializer_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data, inside the model or referenced in its external data."""
    def nbytes(t: onnx.TensorProto) -> int:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return int(next(e.value for e in t.external_data if e.key == "length"))
        return len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return sum(nbytes(t) for t in model.graph.initializer)


def operators(model: onnx.ModelProto) -> dict[str, list[str]]:
    ops: dict[str, set[str]] = {}
    for node in model.graph.node:
        ops.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return {d: sorted(v) for d, v in sorted(ops.items())}


def lower_pack(pack: Path, out: Path, opts: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime import genai, ort_format

    # Weights past opts["external_data"] bytes go to DATA_NAME beside model.onnx (protobuf stops
    # at 2 GiB), one file that ONNX Runtime and onnxruntime-genai read; initializers under 1 KiB
    # (norm weights, constants) stay inside model.onnx.
    model, sites, shapes, (config, manifest) = build_model(pack, ExternalData(out / DATA_NAME, opts["external_data"]))
    model_path = out / MODEL_NAME
    init_nbytes = initializer_nbytes(model)
    external = (out / DATA_NAME).exists()
    model_path.write_bytes(model.SerializeToString())
    tokens = special_tokens(pack)
    context = min(opts["max_context"], int(getattr(config, "max_position_embeddings", opts["max_context"])))
    genai_json = genai.genai_config(config, shapes, MODEL_NAME, tokens, context)
    (out / GENAI_NAME).write_text(json.dumps(genai_json, indent=2, sort_keys=True) + "\n")
    tokenizer = copy_tokenizer(pack, out)
    template_embedded = genai.embed_chat_template(out, chat_template(pack))
    pack_nbytes = manifest["totals"]["nbytes"]
    report = {
        "artifacts": {"onnx": MODEL_NAME, "genai_config": GENAI_NAME, "tokenizer": tokenizer,
                      **({"onnx_data": DATA_NAME} if external else {})},
        "sites": sites,
        "graph": {"opset": model.opset_import[0].version, "ir_version": model.ir_version,
                  "nodes": len(model.graph.node), "operators": operators(model)},
        "weights": {"initializer_nbytes": init_nbytes, "pack_nbytes": pack_nbytes,
                    "ratio": round(init_nbytes / pack_nbytes, 4)},
        "runtime": {"max_context": context, "genai_type": genai_json["model"]["type"], **tokens,
                    "chat_template": "embedded in tokenizer_config.json" if template_embedded
                    else "tokenizer_config.json" if chat_template(pack) else None},
    }
    if opts["ort"] and init_nbytes >= ORT_FORMAT_MAX_NBYTES:
        report["ort_skipped"] = (f"the weights ({init_nbytes} bytes) exceed the .ort format's 2 GiB flatbuffer "
                                 "limit; ORT Mobile loads model.onnx with its external data instead")
    elif opts["ort"]:
        ort_path, ops_path = ort_format.convert_to_ort(model_path, out)
        report["artifacts"].update(ort=ort_path.name, required_operators=ops_path.name)
        report["ort_mobile_operators"] = ort_format.read_ops_config(ops_path)
    else:
        report["ort_skipped"] = "option ort=no"
    return report


def verify_artifact(out: Path, pack: Path, report: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    from liftedge.targets.onnxruntime import TOLERANCE, genai_runner
    from liftedge.targets.onnxruntime.session import make_step, open_session

    from liftedge.packed import load_packed
    from liftedge.verify import compare, greedy, prompt_ids, reference_along

    loaded = load_packed(pack)
    prompt = prompt_ids(loaded.tokenizer)
    if len(prompt) + opts["new_tokens"] > report["runtime"]["max_context"]:
        raise ArtifactError(f"verification needs {len(prompt)} prompt + {opts['new_tokens']} new tokens but the "
                            f"artifact's context is {report['runtime']['max_context']}; raise max_context")
    record: dict[str, Any] = {}
    keys = [key for key in ("onnx", "ort") if key in report["artifacts"]]
    files = [report["artifacts"][key] for key in keys]
    refs: dict[tuple[int, ...], Any] = {}  # one reference pass per distinct token stream
    for key, name in zip(keys, files):
        got = greedy(make_step(open_session(out / name, opts["threads"])), prompt, opts["new_tokens"])
        if tuple(got.tokens) not in refs:
            refs[tuple(got.tokens)] = reference_along(loaded.model, prompt, got.tokens)
        ref = refs[tuple(got.tokens)]
        record[key] = compare(got, ref, TOLERANCE, what=str(out / name))
    del loaded
    if opts["genai"]:
        runner = genai_runner.check(out, files, prompt, ref, report["runtime"]["eos_token_ids"],
                                    TOLERANCE)
    else:
        runner = {"runner": genai_runner.RUNNER, "accepted": None, "skipped": "option genai=no"}
    record["runners"] = [runner]  # a runner record, as every target writes (liftedge.verify)
    return record
