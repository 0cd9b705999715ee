"""`profile_artifact`: the whole profile of one artifact, live or from a recorded profile, as a report dict.

Picks the runtime module, runs it (or analyses the given ETDump / ORT profile), computes the
decode bounds of the named device and of this machine, and assembles `report.build_report`.
Writing files and printing are the command's (`liftedge.commands.profile`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from liftedge.errors import ArtifactError, LiftedgeError
from liftedge.profile.artifact import Artifact, ModelShape, model_shape, resolve


@dataclass(frozen=True)
class ProfileRequest:
    """What to profile and how (validated)."""

    artifact: str
    prompt_tokens: int = 32
    new_tokens: int = 16
    repeats: int = 3
    device: str | None = None
    etdump: Path | None = None
    etrecord: Path | None = None
    ort_profile: Path | None = None
    pack: Path | None = None
    max_context: int | None = None
    threads: int | None = None
    host_bound: bool = True

    def __post_init__(self) -> None:
        for key, low in (("prompt_tokens", 1), ("new_tokens", 1), ("repeats", 1)):
            if getattr(self, key) < low:
                raise LiftedgeError(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(self, key)}")
        if self.etdump is not None and self.ort_profile is not None:
            raise LiftedgeError("give --etdump (ExecuTorch) or --ort-profile (ONNX Runtime), not both")
        if self.etrecord is not None and self.etdump is None and self.ort_profile is not None:
            raise LiftedgeError("--etrecord goes with an ExecuTorch --etdump")


def _etrecord_for(art: Artifact, req: ProfileRequest) -> Path | None:
    if req.etrecord is not None:
        return req.etrecord
    beside = art.path.with_suffix(".etrecord")
    return beside if beside.is_file() else None


def trace_of(art: Artifact, req: ProfileRequest, workdir: Path, progress: Callable):
    """The runtime trace: a replayed profile if one is given, else a live run."""
    from liftedge.profile import executorch, onnxruntime

    common = dict(prompt_tokens=req.prompt_tokens, new_tokens=req.new_tokens)
    if art.runtime == "executorch":
        if req.ort_profile is not None:
            raise LiftedgeError(f"--ort-profile is for ONNX Runtime artifacts; {art.path.name} is an ExecuTorch program")
        etrecord = _etrecord_for(art, req)
        if req.etdump is not None:
            return executorch.analyse_etdump(req.etdump, art.path, etrecord, **common)
        return executorch.run_live(art.path, repeats=req.repeats, max_prefill=art.runtime_option("max_prefill"),
                                   max_context=req.max_context or art.runtime_option("max_context"),
                                   workdir=workdir, etrecord=etrecord, progress=progress, **common)
    if req.etdump is not None or req.etrecord is not None:
        raise LiftedgeError(f"--etdump/--etrecord are for ExecuTorch programs; {art.path.name} runs on ONNX Runtime")
    if req.ort_profile is not None:
        return onnxruntime.analyse_profile(req.ort_profile, report_json=art.report_json, **common)
    return onnxruntime.run_live(art.path, repeats=req.repeats, workdir=workdir, report_json=art.report_json,
                                threads=req.threads, progress=progress, **common)


def read_nbytes(art: Artifact, shape: ModelShape | None, req: ProfileRequest) -> tuple[int | None, str]:
    """Bytes one decode step reads (None if the shape is unknown) and how they were counted."""
    from liftedge.profile.bound import decode_read_nbytes, onnx_weight_nbytes, pte_weight_nbytes

    position = req.prompt_tokens + (req.new_tokens + 1) // 2  # the mean decode position
    if art.runtime == "executorch":
        if shape is None:
            return None, "unknown: no config.json beside the artifact (pass --pack)"
        weights = pte_weight_nbytes(art.path.stat().st_size, shape.vocab, shape.hidden, shape.tied)
        max_context = req.max_context or art.runtime_option("max_context")
        if max_context is None:
            return None, "unknown: the .pte's KV length is not in a report.json (pass --max-context)"
        return (decode_read_nbytes(weights, kv_cache_nbytes=shape.kv_nbytes(max_context)),
                f".pte bytes less the gathered fp16 embedding (one row read){' plus it again for the tied head' if shape.tied else ''}; "
                f"KV cache of all {max_context} static positions (the static-cache attention reads them all)")
    onnx_path = art.path if art.path.suffix == ".onnx" else art.path.with_suffix(".onnx")
    if not onnx_path.is_file():
        return None, "unknown: the .ort has no .onnx beside it to count initializers"
    weights = onnx_weight_nbytes(onnx_path)
    kv = 0 if shape is None else shape.kv_nbytes(position)
    return (decode_read_nbytes(weights, kv_cache_nbytes=kv),
            f"initializers less tables only gathered from; KV cache at position {position} (mean decode position)"
            + ("" if shape else "; KV cache unknown (no genai_config.json)"))


def bounds(art: Artifact, shape: ModelShape | None, req: ProfileRequest, decode_median: float | None,
           device) -> tuple[list[dict], list[str]]:
    """Bound rows of --device and of this machine; the measured speed goes beside the memory system
    it was measured on: this machine for a live run, the device for a recorded profile."""
    from liftedge.profile.bound import make_bound
    from liftedge.profile.host import host_bandwidth_gbs

    nbytes, how = read_nbytes(art, shape, req)
    if nbytes is None:
        return [], [f"no decode bound: bytes per token {how}"]
    recorded = req.etdump is not None or req.ort_profile is not None
    rows = []
    if device is not None:
        rows.append(make_bound(f"{device.display_name} ({device.memory_type}, {device.bandwidth_source})",
                               device.bandwidth_gbps, device.bandwidth_source, nbytes,
                               measured=decode_median if recorded else None).to_dict())
    notes = [f"bytes read per decoded token: {how}"]
    if recorded:
        notes.append("recorded profile: its measured speed is shown against --device's bound"
                     if device is not None else "recorded profile: name the phone with --device to compare it")
    if req.host_bound:
        bw = host_bandwidth_gbs("read")
        rows.append(make_bound("this machine (numpy read, measured)", bw["gbps"], "measured", nbytes,
                               measured=None if recorded else decode_median).to_dict())
        notes.append(f"this machine's bandwidth: {bw['gbps']:.1f} GB/s, measured {bw['measured_at']}"
                     f"{' (cached)' if bw.get('cached') else ''}")
    return rows, notes


def profile_artifact(req: ProfileRequest, workdir: Path, progress: Callable = lambda it, **kw: it) -> dict[str, Any]:
    """Profile `req.artifact`; returns the report dict (see `liftedge.profile.report`)."""
    from liftedge.device import load_device
    from liftedge.profile.report import build_report

    art = resolve(req.artifact)
    device = None if req.device is None else load_device(req.device, require_ram=False)  # only bandwidth is used
    if req.pack is not None and not Path(req.pack).exists():
        raise ArtifactError(f"--pack {req.pack} not found")
    shape = model_shape(art, req.pack)
    load_before = os.getloadavg()[0]
    trace = trace_of(art, req, workdir, progress)
    host = {"cpus": os.cpu_count(), "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    # before the run the load is others'; after it, ours adds up to one unit per thread we ran
    own = req.threads or os.cpu_count() or 1
    host["contended"] = load_before > 0.5 or host["loadavg_1min_after"] > own + 0.5
    if host["contended"] and req.etdump is None and req.ort_profile is None:
        trace.notes.append(f"CONTENDED: load average {load_before:.1f} -> {host['loadavg_1min_after']:.1f} on "
                           f"{host['cpus']} CPUs; other processes shared the CPU, timings are upper bounds on latency")
    report_stub = build_report(trace, artifact=str(art.path), settings={})
    rows, notes = bounds(art, shape, req, report_stub["decode_tokens_per_s"]["median"], device)
    trace.notes.extend(notes)
    settings = {"prompt_tokens": req.prompt_tokens, "new_tokens": req.new_tokens,
                "repeats": req.repeats if req.etdump is None and req.ort_profile is None else None,
                "threads": req.threads}
    report = build_report(trace, artifact=str(art.path), settings=settings, bounds=rows,
                          device=None if device is None else {"name": device.name, "display_name": device.display_name,
                                                              "bandwidth_gbps": device.bandwidth_gbps})
    report["host"] = host
    return report
