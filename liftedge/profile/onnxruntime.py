"""ONNX Runtime profiles: a live `.onnx`/`.ort` run with ORT's profiler, and the analysis of its JSON.

`run_live` opens the session with `SessionOptions.enable_profiling`, feeds `repeats` x (one
prefill call + `new_tokens` decode calls) through the genai-style step of
`liftedge.targets.onnxruntime.session.make_step`, times every call, and ends the profile.
`analyse_profile` reads any ORT JSON profile (this machine's, or one pulled from a phone) into a
`report.Trace`; the live run goes through it too. Each `model_run` event is one execution; a
node's `*_kernel_time` events fall inside the run that executed them.

Operators are ORT node types (`MatMul`, `Gather`, `com.microsoft` `MatMulNBits`, fused
names where the optimiser fused nodes); liftedge names every node `<site>/<step>`, so a node
of a lift-project site is kind "lift-project (stock ops)" (the site list comes from the
artifact's report.json, else from the step names of `targets/onnxruntime/layers.py`), a
MatMulNBits site "MatMulNBits", the rest "ORT CPU"; the layer is the `layers.N` in the name.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

from liftedge.errors import ArtifactError
from liftedge.profile.report import OpSample, Trace

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)(?:[./]|$)")
KERNEL_SUFFIX = "_kernel_time"
# The step names `layers.emit_liftquant` and `_unpacked_signs_t` give a lift-project site's nodes.
LIFT_STEPS = frozenset({"in_scale", "to_kron", "mix1", "mix2_t", "mix2", "from_kron", "pad_blocks", "to_blocks",
                        "block_scale_col", "block_scale", "lift", "lifted", "pad_bits", "sign_matmul", "scale",
                        "sign_index", "unpack", "sign_rows", "sign_t", "signs"})
# site format (report.json) -> kind of its nodes
FORMAT_KINDS = {"liftquant": "lift-project (stock ops)", "int": "MatMulNBits", "fp16": "ORT CPU"}
DEFAULT_KIND = "ORT CPU"
PROFILE_NAME = "ort_profile.json"


def site_kinds(report_json: Path | None) -> dict[str, str] | None:
    """site name -> node kind, from an artifact's report.json (None when there is none)."""
    if report_json is None or not report_json.is_file():
        return None
    try:
        sites = json.loads(report_json.read_text(encoding="utf-8")).get("sites", {})
    except (OSError, json.JSONDecodeError):
        return None
    return {name: FORMAT_KINDS.get(s.get("format", ""), DEFAULT_KIND) for name, s in sites.items()
            if isinstance(s, dict)}


def node_kind(node: str, op_type: str, sites: dict[str, str] | None) -> str:
    site, _, step = node.partition("/")
    if sites is not None and site in sites:
        return sites[site]
    if op_type == "MatMulNBits":
        return "MatMulNBits"
    if sites is None and step.split("/")[0] in LIFT_STEPS and site.endswith(("proj", "fc1", "fc2", "c_attn", "c_fc",
                                                                             "query_key_value", "dense",
                                                                             "dense_h_to_4h", "dense_4h_to_h")):
        return "lift-project (stock ops)"
    return DEFAULT_KIND


def node_layer(node: str) -> str:
    m = LAYER_RE.search(node)
    return f"layers.{m.group(1)}" if m else ""


def read_profile(path: Path) -> list[dict]:
    if not path.is_file():
        raise ArtifactError(f"ORT profile {path} not found")
    try:
        events = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not an ONNX Runtime JSON profile ({exc})") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ArtifactError(f"{path} is not an ONNX Runtime JSON profile (expected a list of trace events)")
    return events


def analyse_profile(path: Path, *, prompt_tokens: int, new_tokens: int | None,
                    report_json: Path | None = None) -> Trace:
    """A trace from an ORT JSON profile (each model_run's own duration as wall time)."""
    from liftedge.profile.executorch import run_structure

    path = Path(path)
    events = read_profile(path)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if not runs:
        raise ArtifactError(f"{path} holds no model_run events: profile at least one session.run")
    starts = [r["ts"] for r in runs]
    sites = site_kinds(report_json)
    per_node: dict[str, list[float]] = {}
    op_types: dict[str, str] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        node = name[: -len(KERNEL_SUFFIX)]
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i]["ts"] + runs[i]["dur"]:
            continue  # outside every run (initialisation)
        per_node.setdefault(node, [0.0] * len(runs))[i] += e.get("dur", 0) / 1e3
        op_types[node] = e.get("args", {}).get("op_name", "?")
    samples = [OpSample(op_types[n], node_kind(n, op_types[n], sites), node_layer(n), tuple(ms))
               for n, ms in per_node.items()]
    kinds, repeats = run_structure(len(runs), new_tokens)
    init = next((e for e in events if e.get("name") == "session_initialization"), None)
    return Trace("onnxruntime", f"ORT profile {path}", kinds, [prompt_tokens if k == "prefill" else 1 for k in kinds],
                 repeats, [r["dur"] / 1e3 for r in runs], samples, wall_source="ORT profile model_run per call",
                 load_ms=None if init is None else init["dur"] / 1e3, files={"ort_profile": str(path)})


def run_live(model: Path, *, prompt_tokens: int, new_tokens: int, repeats: int, workdir: Path,
             report_json: Path | None = None, threads: int | None = None,
             progress: Callable = lambda it, **kw: it) -> Trace:
    """Run `model` with ORT's profiler on; the trace is the profile's analysis with wall times from here."""
    import onnxruntime as ort

    from liftedge.profile.host import current_rss_nbytes, peak_rss_nbytes
    from liftedge.targets.onnxruntime.session import make_step

    if not model.is_file():
        raise ArtifactError(f"{model} not found")
    workdir.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "ort_profile")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    baseline = current_rss_nbytes()
    t0 = time.perf_counter()
    try:
        session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's own exception types
        raise ArtifactError(f"{model} cannot be loaded by ONNX Runtime ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]})") from None
    load_ms = (time.perf_counter() - t0) * 1e3
    from liftedge.profile.executorch import _ids

    prompt = _ids(prompt_tokens)
    wall, kinds, reps = [], [], []
    for r in progress(range(repeats), desc="profile repeats", total=repeats, unit="repeat"):
        step = make_step(session)  # a fresh KV cache per repeat
        t = time.perf_counter()
        logits = step(prompt, 0)
        wall.append((time.perf_counter() - t) * 1e3)
        kinds.append("prefill")
        reps.append(r)
        token = int(logits[-1].argmax())
        for i in range(new_tokens):
            t = time.perf_counter()
            logits = step([token], prompt_tokens + i)
            wall.append((time.perf_counter() - t) * 1e3)
            kinds.append("decode")
            reps.append(r)
            token = int(logits[-1].argmax())
    peak = peak_rss_nbytes()
    profile = workdir / PROFILE_NAME  # one name, so repeated runs replace rather than pile up
    os.replace(session.end_profiling(), profile)
    trace = analyse_profile(profile, prompt_tokens=prompt_tokens, new_tokens=new_tokens, report_json=report_json)
    if len(trace.exec_kinds) != len(wall):
        raise ArtifactError(f"the ORT profile holds {len(trace.exec_kinds)} runs, the profile run made {len(wall)}")
    trace.notes.append(f"ORT session_initialization {trace.load_ms:.1f} ms (load time shown: the whole "
                       "InferenceSession construction)" if trace.load_ms else "")
    trace.notes = [n for n in trace.notes if n]
    trace.source = "live run"
    trace.exec_wall_ms, trace.exec_kinds, trace.exec_repeat = wall, kinds, reps
    trace.wall_source = "time around each session.run call (Python, profiler on)"
    trace.load_ms, trace.peak_rss_nbytes, trace.baseline_rss_nbytes = load_ms, peak, baseline
    return trace
