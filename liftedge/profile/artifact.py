"""What `liftedge profile ARTIFACT` names: the model file, its runtime, and the model's shape.

ARTIFACT is a folder written by `liftedge build` (report.json beside model.pte, or
model.onnx / model.ort) or a file; the runtime follows from the extension. A Core ML
`.mlpackage` is refused: Core ML runs only on Apple hardware. The shape numbers the bound needs
(layers, KV heads, head size, vocabulary, hidden size, tied head) come from the pack's
config.json named in report.json (or given with --pack), or from an ORT artifact's
genai_config.json; the static KV length of a `.pte` from report.json (or --max-context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liftedge.errors import ArtifactError

RUNTIME_OF_SUFFIX = {".pte": "executorch", ".onnx": "onnxruntime", ".ort": "onnxruntime"}
# in a build folder, the file profiled for each target (the .onnx and .ort run the same graph)
MODEL_FILES = ("model.pte", "model.onnx", "model.ort")


@dataclass(frozen=True)
class Artifact:
    path: Path                  # the model file that runs
    runtime: str
    folder: Path                # where the outputs go by default
    report: dict[str, Any] | None

    @property
    def report_json(self) -> Path | None:
        p = self.path.parent / "report.json"
        return p if p.is_file() else None

    def runtime_option(self, key: str) -> int | None:
        value = ((self.report or {}).get("runtime") or {}).get(key)
        return int(value) if isinstance(value, (int, float)) else None


def _coreml_error(path: Path) -> ArtifactError:
    return ArtifactError(f"{path} is a Core ML model: Core ML runs only on Apple hardware (macOS/iOS), not on "
                         "this Linux machine; profile it in Xcode's Core ML performance report or Instruments")


def resolve(artifact: str | Path) -> Artifact:
    path = Path(artifact)
    if path.suffix == ".mlpackage" or path.suffix == ".mlmodel":
        raise _coreml_error(path)
    if not path.exists():
        raise ArtifactError(f"{path} not found: give an artifact folder from `liftedge build` or a "
                            ".pte / .onnx / .ort file")
    if path.is_dir():
        if any(path.glob("*.mlpackage")):
            raise _coreml_error(next(path.glob("*.mlpackage")))
        found = next((path / name for name in MODEL_FILES if (path / name).is_file()), None)
        if found is None:
            raise ArtifactError(f"{path} holds no model.pte, model.onnx or model.ort")
        path = found
    if path.suffix not in RUNTIME_OF_SUFFIX:
        raise ArtifactError(f"cannot tell the runtime of {path.name}: expected .pte (ExecuTorch), .onnx or .ort "
                            "(ONNX Runtime)")
    if path.suffix == ".pte":
        check_pte_header(path)
    report = None
    if (path.parent / "report.json").is_file():
        try:
            report = json.loads((path.parent / "report.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            report = None
    return Artifact(path, RUNTIME_OF_SUFFIX[path.suffix], path.parent, report)


def check_pte_header(path: Path) -> None:
    """Refuse a file that is not an ExecuTorch program before the runtime sees it (the runtime
    aborts the whole process on some malformed input instead of raising)."""
    with open(path, "rb") as f:
        head = f.read(8)
    ident = head[4:8]
    if len(head) < 8 or ident[:2] != b"ET" or not ident[2:].isdigit():
        raise ArtifactError(f"{path} is not an ExecuTorch program (no 'ETnn' flatbuffer identifier at byte 4)")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    hidden: int
    tied: bool

    def kv_nbytes(self, positions: int, itemsize: int = 4) -> int:
        """K and V of every layer over `positions` (the runtimes keep fp32 caches)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * positions * itemsize


def _from_config(config_json: Path) -> ModelShape | None:
    from liftedge.memory import ModelDims

    if not config_json.is_file():
        return None
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        dims = ModelDims.from_config(text)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"{config_json} (named by the artifact's report) is not a usable model config "
                            f"({type(exc).__name__}: {exc}); pass --pack or --max-context") from None
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    return ModelShape(dims.layers, dims.kv_heads, dims.head_dim, dims.vocab, dims.hidden, tied)


def _from_genai(genai_json: Path) -> ModelShape | None:
    if not genai_json.is_file():
        return None
    m = json.loads(genai_json.read_text(encoding="utf-8"))["model"]
    d = m["decoder"]
    return ModelShape(d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], m["vocab_size"],
                      d["hidden_size"], tied=True)


def model_shape(art: Artifact, pack: Path | None = None) -> ModelShape | None:
    """The model's shape numbers, or None where nothing beside the artifact says them."""
    candidates = []
    if pack is not None:
        candidates.append(Path(pack) / "config.json" if Path(pack).is_dir() else Path(pack))
    pack_path = ((art.report or {}).get("pack") or {}).get("path")
    if pack_path:
        candidates.append(Path(pack_path) / "config.json")
    for c in candidates:
        shape = _from_config(c)
        if shape is not None:
            return shape
    return _from_genai(art.path.parent / "genai_config.json") if art.runtime == "onnxruntime" else None
