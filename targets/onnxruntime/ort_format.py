"""`.ort` conversion for ORT Mobile and the operator list a minimal ORT build must include.

Conversion is ORT's own tool (`python -m onnxruntime.tools.convert_onnx_models_to_ort
--optimization_style Fixed`), run in a subprocess on a folder holding only the `.onnx`, so
its side files land where we want them. It writes `model.ort` and `required_operators.config`
(the `--include_ops_by_config` input of a minimal build). This module owns that step and the
parsing of the config; the graph belongs to `graph`.

Determinism: the converter serialises some tables in the order of C++ maps keyed by
pointers, so with address-space randomisation two runs give different (equivalent) bytes.
On Linux the child runs with ADDR_NO_RANDOMIZE (what `setarch -R` does), which makes the
`.ort` bytes repeat; elsewhere they may differ between runs (the `.onnx` never does).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from liftedge.errors import ArtifactError

OPS_CONFIG = "required_operators.config"
ADDR_NO_RANDOMIZE = 0x0040000  # linux/personality.h


def _no_aslr() -> None:
    """preexec_fn: turn off address randomisation for the converter (see the module docstring)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality(ADDR_NO_RANDOMIZE)


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write `<stem>.ort` and `required_operators.config` into `out_dir`; return both paths."""
    with tempfile.TemporaryDirectory(prefix="liftedge-ort-") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        shutil.copyfile(onnx_path, src / onnx_path.name)
        data = onnx_path.with_name(onnx_path.name + ".data")  # external data, where the model has it
        if data.is_file():
            shutil.copyfile(data, src / data.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
               "--output_dir", str(dst), "--optimization_style", "Fixed"]
        preexec = _no_aslr if sys.platform.startswith("linux") else None
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec, check=False)
        ort_files = sorted(dst.glob("*.ort")) if dst.is_dir() else []
        if proc.returncode != 0 or len(ort_files) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ArtifactError(f"converting {onnx_path} to .ort failed: {' | '.join(tail)}")
        ort_path = out_dir / f"{onnx_path.stem}.ort"
        config = next(dst.glob("*.config"), None)
        if config is None:
            raise ArtifactError(f"the .ort converter wrote no operator config for {onnx_path}")
        shutil.copyfile(ort_files[0], ort_path)
        # The tool names the temporary .ort path in a comment; name the artifact's file instead.
        text = config.read_text().replace(str(ort_files[0]), ort_path.name)
        (out_dir / OPS_CONFIG).write_text(text)
    return ort_path, out_dir / OPS_CONFIG


def read_ops_config(path: Path) -> dict[str, dict[str, list[str]]]:
    """domain -> opset -> operators, from a `required_operators.config` ("domain;opset;Op1,Op2")."""
    out: dict[str, dict[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        out.setdefault(domain, {})[opset] = sorted(op.strip() for op in ops.split(",") if op.strip())
    return out
