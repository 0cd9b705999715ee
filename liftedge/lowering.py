"""Turning a pack into a verified runtime artifact: the contract every target implements.

A target is a module under `liftedge.targets` (the repository's `targets/` folder) named in
`TARGETS`. It exposes

    NAME: str                                   # "executorch", "onnxruntime", "coreml"
    OPTIONS: dict[str, str]                     # option name -> help (for `liftedge build`)
    lower(pack: Path, out: Path, options: dict) -> dict
        # write the artifact files into the (empty, temporary) folder `out`; return the
        # report: {"artifacts": {...}, "sites": {site: {"lowering": ..., "why": ...}}, ...}
    verify(out: Path, pack: Path, report: dict, options: dict) -> dict
        # load what `lower` wrote in the real runtime (or read it back), compare with the
        # reference of `pack` (`liftedge.verify`), return the verification record; raise
        # `liftedge.verify.VerificationError` on a mismatch

`build_artifact` runs lower + verify inside `liftedge.io.atomic_output_dir`, so a failed or
interrupted build leaves nothing at the destination and an earlier artifact stays intact;
`report.json` (lowering, verification, sizes, the pack's manifest summary, `build_cost`: wall
seconds and peak RSS after lowering and after verification) and the pack's
tokenizer files are written beside the artifact. This module owns that sequence, the registry,
the parsing of target options (`parse_target_options`) and what every runner's metadata takes
from the tokenizer (`special_tokens`: BOS/EOS/PAD ids); formats and runtimes belong to the
targets.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from liftedge.errors import ArtifactError, LiftedgeError
from liftedge.io import atomic_output_dir, atomic_write_json

TARGETS = {
    "executorch": "liftedge.targets.executorch",
    "onnxruntime": "liftedge.targets.onnxruntime",
    "coreml": "liftedge.targets.coreml",
}
REPORT_NAME = "report.json"
# What an app needs beside the model to turn text into ids and back (copied from the pack).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def get_target(name: str) -> ModuleType:
    if name not in TARGETS:
        raise LiftedgeError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}")
    return importlib.import_module(TARGETS[name])


def pack_summary(pack: Path) -> dict[str, Any]:
    """What the report repeats from the pack's manifest (source, totals, text protocol, plan, site formats)."""
    from liftedge.packed import read_manifest

    manifest = read_manifest(pack)
    return {"path": str(pack), "source": manifest.get("source"), "totals": manifest.get("totals"),
            "protocol": manifest.get("protocol"), "plan": manifest.get("plan"),
            "site_formats": {name: entry.get("fmt") for name, entry in manifest.get("sites", {}).items()}}


def copy_tokenizer(pack: Path, out: Path) -> list[str]:
    """Copy the pack's tokenizer files into `out` (tokenizer.json as `portable_tokenizer_json`
    writes it); return the names copied."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if not (pack / name).is_file():
            continue
        if name == "tokenizer.json":
            data = json.loads((pack / name).read_text(encoding="utf-8"))
            (out / name).write_text(json.dumps(portable_tokenizer_json(data), ensure_ascii=False), encoding="utf-8")
        else:
            shutil.copyfile(pack / name, out / name)
        copied.append(name)
    return copied


def portable_tokenizer_json(data: dict[str, Any]) -> dict[str, Any]:
    """The same tokenizer in the form the on-device C++ tokenizers read.

    A `Sequence` normalizer or pre-tokenizer with no members (transformers writes one when it
    converts a GGUF vocabulary) does nothing; ExecuTorch's HF tokenizer (pytorch/tokenizers)
    refuses to load it ("Missing normalizers for Normalizer of type Sequence"). It is written as
    null, which tokenizes identically."""
    data = dict(data)
    for key, members in (("normalizer", "normalizers"), ("pre_tokenizer", "pretokenizers")):
        part = data.get(key)
        if isinstance(part, dict) and part.get("type") == "Sequence" and not part.get(members):
            data[key] = None
    return data


def special_tokens(pack: Path) -> dict[str, Any]:
    """BOS / EOS / PAD ids an app's runner needs: {"bos_token_id", "eos_token_ids", "pad_token_id"}.

    The tokenizer's own tokens come first (what the text was trained with); EOS ids that only
    `generation_config.json` or `config.json` list (Llama 3 style stop tokens) are added after
    them. PAD falls back to the first EOS, as Hugging Face generation does. BOS may be None (a
    tokenizer without one); EOS is never empty (a runner would then stop only at the length).
    """
    import json

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(pack), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many types for a bad file
        raise ArtifactError(f"the tokenizer in {pack} cannot be read ({type(exc).__name__}: {exc})") from None
    bos, eos = tok.bos_token_id, [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    for name in ("generation_config.json", "config.json"):
        path = Path(pack) / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        extra = data.get("eos_token_id")
        for token in extra if isinstance(extra, list) else [] if extra is None else [extra]:
            if int(token) not in eos:
                eos.append(int(token))
        if bos is None and data.get("bos_token_id") is not None:
            bos = data["bos_token_id"]
    if not eos:
        raise ArtifactError(f"the tokenizer in {pack} names no end-of-sequence token; a runner could not stop")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return {"bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos, "pad_token_id": int(pad)}


def chat_template(pack: Path) -> str | None:
    """The tokenizer's chat template (`chat_template.jinja`, else `tokenizer_config.json`), or None."""
    import json

    path = Path(pack) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    config = Path(pack) / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def peak_rss_nbytes() -> int:
    """This process's largest resident set so far (Linux ru_maxrss, KiB; macOS, bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def folder_nbytes(folder: Path) -> dict[str, int]:
    """Size of every file under `folder` (relative path -> bytes), sorted."""
    return {str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build_artifact(pack: str | os.PathLike, target: str, out: str | os.PathLike, *,
                   options: dict[str, Any] | None = None, force: bool = False,
                   extra_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lower `pack` for `target` into `out`, verify it, write `report.json`; return the report."""
    from liftedge.heap import map_large_allocations, release_memory

    module = get_target(target)
    pack, options = Path(pack), dict(options or {})
    map_large_allocations()  # freed repacking / tracing buffers go back to the OS (`liftedge.heap`)
    with atomic_output_dir(out, force=force) as tmp:
        started = time.perf_counter()
        report = {"target": module.NAME, "options": options, **module.lower(pack, tmp, options)}
        artifacts = report.setdefault("artifacts", {})
        if "tokenizer" not in artifacts:
            artifacts["tokenizer"] = copy_tokenizer(pack, tmp)
        lowered = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_nbytes": peak_rss_nbytes()}
        release_memory()  # the lowering's heap, before verification loads the reference and the runtime
        report["verification"] = module.verify(tmp, pack, report, options)
        report["build_cost"] = {"lowering": lowered, "with_verification": {
            "seconds": round(time.perf_counter() - started, 1), "peak_rss_nbytes": peak_rss_nbytes()}}
        report["files"] = folder_nbytes(tmp)
        report["pack"] = pack_summary(pack)
        report.update(extra_report or {})
        atomic_write_json(tmp / REPORT_NAME, report)
    return report


def parse_target_options(target: str, options: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """A target's options with its defaults filled in; unknown names are refused.

    Each value is read as its default's type: a bool default takes true/false, yes/no, on/off
    or 1/0; a str default takes a string; any other default (an int, or None for "the
    runtime's choice") takes an integer.
    Range checks beyond that belong to the target.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ArtifactError(f"unknown {target} option(s) {unknown}; known: {', '.join(sorted(defaults))}")
    return {key: _as_type(key, options.get(key, default), default) for key, default in defaults.items()}


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _as_type(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ArtifactError(f"option {name} must be true or false, got {value!r}")
    if value is None:
        return None
    if isinstance(default, str):  # a named choice; the target checks it against its list
        return str(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ArtifactError(f"option {name} must be an integer, got {value!r}") from None
