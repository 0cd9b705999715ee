"""ExecuTorch profiles: a live `.pte` run that records an ETDump, and the analysis of an ETDump.

`run_live` loads the program with ETDump on (`Runtime.load_program(..., enable_etdump=True)`),
feeds `repeats` x (one prefill call + `new_tokens` decode calls), times every call and writes
the ETDump (and the debug buffer file the API wants beside it). `analyse_etdump` turns any ETDump
(this machine's, or one recorded on a phone by ExecuTorch's runner) into a `report.Trace`; the
live run goes through it too, so a live table and a replayed one are the same computation.

Names come from the `.pte` itself: each OPERATOR_CALL event carries its instruction id, and
the program's instruction list names the kernel (`liftedge::lq_linear.out`,
`aten::add.out`, ...). XNNPACK reports its own operators inside each DELEGATE_CALL ("Fully
Connected (NC, F32)", ...); the delegate call's time not spent in them becomes one
"XNNPACK delegate (outside its operators)" row so nothing is dropped. The model layer of an
operator needs the ETRecord (debug handles -> the exported graph's module stack); without it
the table is not grouped by layer. Loading and running a `.pte` belongs to
`liftedge.targets.executorch.runtime`; this module only adds the profiling.
"""

from __future__ import annotations

import bisect
import re
import time
import warnings
from pathlib import Path
from typing import Callable

from liftedge.errors import ArtifactError
from liftedge.profile.report import OpSample, Trace

# operator name -> kind; first match wins (exact names of liftedge's kernels, then namespaces)
KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    ("liftedge::lq_", "lift-project kernel"),  # lq_linear and its fused forms (lq_rms_linear, lq_glu)
    ("liftedge::", "liftedge kernel"),
    ("executorch_prim::", "runtime (prim op)"),
    ("", "portable"),
)
# delegate id -> kind shown for its operators
DELEGATE_KINDS = {"XnnpackBackend": "XNNPACK"}
DELEGATE_REST = "delegate (outside its operators)"
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")
_ETDUMP_ID = b"ED00"


def kernel_kind(op_name: str) -> str:
    return next(kind for prefix, kind in KERNEL_KINDS if op_name.startswith(prefix))


def instruction_names(pte: Path) -> dict[int, tuple[str, str, str]]:
    """instruction id -> (operator name, kind, "kernel" or "delegate") of the `.pte`'s forward method.

    Only the program's flatbuffer is read and parsed: the constant and delegate segments that
    follow it (the weights: 1.6 GB at 1B) are not needed for names, and parsing them into Python
    objects took the profiler's own memory to 8.9 GB at 1B."""
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header

    try:
        with open(pte, "rb") as f:
            header = _get_extended_header(f.read(64))
            f.seek(0)
            data = f.read(header.program_size) if header is not None and header.is_valid() else f.read()
        program = _flatbuffer_to_program(data)
    except Exception as exc:  # noqa: BLE001 - flatbuffer errors have many types
        raise ArtifactError(f"{pte} is not a readable ExecuTorch program ({type(exc).__name__}: {exc})") from None
    plan = next((p for p in program.execution_plan if p.name == "forward"), program.execution_plan[0])
    out: dict[int, tuple[str, str, str]] = {}
    for i, ins in enumerate(plan.chains[0].instructions):
        args = ins.instr_args
        if hasattr(args, "op_index"):
            op = plan.operators[args.op_index]
            name = f"{op.name}.{op.overload}" if op.overload else op.name
            out[i] = (name, kernel_kind(name), "kernel")
        elif hasattr(args, "delegate_index"):
            backend = plan.delegates[args.delegate_index].id
            out[i] = (backend, DELEGATE_KINDS.get(backend, backend), "delegate")
    return out


def check_etdump(path: Path) -> None:
    """Refuse a missing, empty or foreign file before the inspector's flatc sees it."""
    if not path.is_file():
        raise ArtifactError(f"ETDump {path} not found")
    head = path.read_bytes()[:12]
    size_prefix = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
    if len(head) < 12 or head[8:12] != _ETDUMP_ID or size_prefix + 4 > path.stat().st_size:
        raise ArtifactError(f"{path} is not an ETDump (no size-prefixed 'ED00' flatbuffer, or truncated): "
                            "record one with ExecuTorch's ETDump enabled (see examples/profile/README.md)")


def _layer_of(event) -> str | None:
    hierarchy = getattr(event, "module_hierarchy", None) or {}
    layers = set()
    for levels in hierarchy.values():
        paths = [v[0] for v in levels.values()] if isinstance(levels, dict) else []
        found = {f"layers.{m.group(1)}" for p in paths for m in [LAYER_RE.search(str(p))] if m}
        layers |= found or {""}
    if not layers:
        return ""
    return layers.pop() if len(layers) == 1 else "several"


def _inspector(etdump: Path, etrecord: Path | None):
    from executorch.devtools import Inspector

    if etrecord is not None:
        import liftedge.targets.executorch.ops  # noqa: F401 - the ETRecord's graph names liftedge::lq_linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Inspector(etdump_path=str(etdump), etrecord=None if etrecord is None else str(etrecord),
                             enable_module_hierarchy=etrecord is not None)
        except Exception as exc:  # noqa: BLE001 - flatc / flatbuffer / zip errors
            what = f"{etdump}" + ("" if etrecord is None else f" with ETRecord {etrecord}")
            raise ArtifactError(f"cannot read {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                                "the ETDump is corrupt or the ETRecord belongs to another program") from None


def _execution_index(starts: list[int]) -> Callable[[int], int]:
    return lambda t: max(0, bisect.bisect_right(starts, t) - 1)


def _times(event, n_exec: int, index: Callable[[int], int]) -> list[float]:
    raw = list(event.perf_data.raw) if event.perf_data is not None else []
    if len(raw) == n_exec:
        return raw
    out = [0.0] * n_exec  # an instruction that did not run every time: place it by its start time
    for value, start in zip(raw, getattr(event, "_start_time", None) or []):
        out[index(start)] += value
    return out


def events_to_samples(inspector, names: dict[int, tuple[str, str, str]]
                      ) -> tuple[list[float], list[OpSample], float | None]:
    """(runtime ms per execution, operator samples, load ms) from the inspector's event blocks.

    Raises `ArtifactError` when an event's instruction is not of its kind in `names` (the ETDump
    was recorded from another program)."""
    blocks = {b.name: b for b in inspector.event_blocks}
    if "Execute" not in blocks:
        raise ArtifactError("the ETDump holds no executions (event block 'Execute' missing): run the method at "
                            "least once before writing the ETDump")
    events = blocks["Execute"].events
    execute = next((e for e in events if e.name == "Method::execute"), None)
    if execute is None:
        raise ArtifactError("the ETDump has no Method::execute events; was it recorded with profiling on?")
    exec_ms = list(execute.perf_data.raw)
    index = _execution_index(list(getattr(execute, "_start_time", None) or []))
    n = len(exec_ms)
    load_ms = None
    for e in blocks.get("Default", type("B", (), {"events": []})).events:
        if e.name == "Program::load_method" and e.perf_data is not None:
            load_ms = float(e.perf_data.raw[0])
    samples: list[OpSample] = []
    pending: list = []  # delegate-internal operator events come before their DELEGATE_CALL
    for e in events:
        if e.name.startswith("native_call_") or e.name == "Method::execute":
            continue  # native_call_* is nested inside its OPERATOR_CALL
        if e.is_delegated_op:
            pending.append(e)
            continue
        layer = _layer_of(e) if e.module_hierarchy else None
        instr = getattr(e, "_instruction_id", None)
        name, kind, what = names.get(instr, (e.name, "runtime", "?"))
        expected = {"DELEGATE_CALL": "delegate", "OPERATOR_CALL": "kernel"}.get(e.name)
        if expected is not None and what != expected:
            raise ArtifactError(f"ETDump event {e.name} at instruction {instr} does not match the program "
                                f"(a {what} instruction there): the ETDump was recorded from another .pte")
        ms = _times(e, n, index)
        if e.name == "DELEGATE_CALL":
            inner = [0.0] * n
            for d in pending:
                d_ms = _times(d, n, index)
                inner = [a + b for a, b in zip(inner, d_ms)]
                samples.append(OpSample(re.sub(r" #\d+$", "", d.name), kind, layer, tuple(d_ms)))
            samples.append(OpSample(f"{kind} {DELEGATE_REST}", kind, layer,
                                    tuple(max(0.0, a - b) for a, b in zip(ms, inner))))
            pending = []
        elif e.name == "OPERATOR_CALL":
            samples.append(OpSample(name, kind, layer, tuple(ms)))
    if pending:  # operators of a delegate whose DELEGATE_CALL event is missing: keep them
        samples += [OpSample(re.sub(r" #\d+$", "", d.name), "delegate", None, tuple(_times(d, n, index)))
                    for d in pending]
    return exec_ms, samples, load_ms


def run_structure(n_exec: int, new_tokens: int | None) -> tuple[list[str], list[int]]:
    """(kind, repeat) per execution for a recorded ETDump: runs of one prefill call and
    `new_tokens` decode calls (all the rest when None), as ExecuTorch's llama runner makes them."""
    period = n_exec if not new_tokens else new_tokens + 1
    kinds = ["prefill" if i % period == 0 else "decode" for i in range(n_exec)]
    return kinds, [i // period for i in range(n_exec)]


def analyse_etdump(etdump: Path, pte: Path, etrecord: Path | None = None, *, prompt_tokens: int,
                   new_tokens: int | None) -> Trace:
    """A trace from an ETDump recorded anywhere (the runtime's own per-call times as wall time)."""
    etdump, pte = Path(etdump), Path(pte)
    check_etdump(etdump)
    if etrecord is not None and not Path(etrecord).is_file():
        raise ArtifactError(f"ETRecord {etrecord} not found; it is written at export time (see "
                            "examples/profile/README.md), or leave --etrecord out to profile without layer names")
    exec_ms, samples, load_ms = events_to_samples(_inspector(etdump, etrecord), instruction_names(pte))
    kinds, repeats = run_structure(len(exec_ms), new_tokens)
    tokens = [prompt_tokens if k == "prefill" else 1 for k in kinds]
    files = {"etdump": str(etdump)} | ({"etrecord": str(etrecord)} if etrecord else {})
    return Trace("executorch", f"ETDump {etdump}", kinds, tokens, repeats, exec_ms, samples,
                 wall_source="ETDump Method::execute per call", load_ms=load_ms, files=files)


def _ids(n: int, seed: int = 0) -> list[int]:
    import numpy as np

    # ids below 256 exist in every byte-level BPE vocabulary (the byte tokens)
    return [int(i) for i in np.random.default_rng(seed).integers(0, 256, n)]


def run_live(pte: Path, *, prompt_tokens: int, new_tokens: int, repeats: int, max_prefill: int | None,
             max_context: int | None, workdir: Path, etrecord: Path | None = None,
             progress: Callable = lambda it, **kw: it) -> Trace:
    """Run `pte` with ETDump on; the trace is the ETDump's analysis with this process's wall times."""
    import torch

    from liftedge.profile.host import current_rss_nbytes, peak_rss_nbytes
    from liftedge.targets.executorch.runtime import calls_custom_op, load_operator_libraries

    if max_prefill is not None and prompt_tokens > max_prefill:
        raise ArtifactError(f"--prompt-tokens {prompt_tokens} exceeds the program's prefill bound {max_prefill}; "
                            "profile one prefill call at most that long")
    if max_context is not None and prompt_tokens + new_tokens > max_context:
        raise ArtifactError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the KV cache of "
                            f"{max_context} positions; lower --prompt-tokens or --new-tokens")
    load_operator_libraries(calls_custom_op(pte))
    from executorch.runtime import Runtime

    baseline = current_rss_nbytes()
    t0 = time.perf_counter()
    try:
        program = Runtime.get().load_program(str(pte), enable_etdump=True, debug_buffer_size=0)
        method = program.load_method("forward")
    except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError with details on stderr
        raise ArtifactError(f"ExecuTorch cannot load {pte}: {exc}") from None
    load_ms = (time.perf_counter() - t0) * 1e3
    wall, kinds, reps = [], [], []
    prompt = torch.tensor([_ids(prompt_tokens)], dtype=torch.long)

    def call(kind: str, repeat: int, ids, positions) -> int:
        t = time.perf_counter()
        try:
            (logits,) = method.execute([ids, positions])
        except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError, details on stderr
            raise ArtifactError(f"{pte.name}: the {kind} call with {ids.shape[1]} token(s) at position "
                                f"{int(positions[0])} failed ({exc}); a bare .pte's prefill bound and KV length "
                                "are unknown here: lower --prompt-tokens / --new-tokens") from None
        wall.append((time.perf_counter() - t) * 1e3)
        kinds.append(kind)
        reps.append(repeat)
        return int(logits[0, -1].argmax())

    for r in progress(range(repeats), desc="profile repeats", total=repeats, unit="repeat"):
        token = call("prefill", r, prompt, torch.arange(prompt_tokens, dtype=torch.long))
        for i in range(new_tokens):
            token = call("decode", r, torch.tensor([[token]], dtype=torch.long),
                         torch.tensor([prompt_tokens + i], dtype=torch.long))
    peak = peak_rss_nbytes()
    workdir.mkdir(parents=True, exist_ok=True)
    etdump = workdir / "profile.etdp"
    program.write_etdump_result_to_file(str(etdump), str(workdir / "profile.debug.bin"))
    trace = analyse_etdump(etdump, pte, etrecord, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    if len(trace.exec_kinds) != len(wall):
        raise ArtifactError(f"the ETDump holds {len(trace.exec_kinds)} executions, the run made {len(wall)}")
    trace.source = "live run"
    trace.exec_wall_ms, trace.exec_kinds, trace.exec_repeat = wall, kinds, reps
    trace.wall_source = "time around each Method.execute call (Python)"
    trace.notes.append(f"ETDump load_method {trace.load_ms:.1f} ms; load time shown is the whole "
                       "load_program + load_method wall time" if trace.load_ms else "")
    trace.notes = [n for n in trace.notes if n]
    trace.load_ms, trace.peak_rss_nbytes, trace.baseline_rss_nbytes = load_ms, peak, baseline
    return trace


def lower_with_etrecord(program, pte: Path, etrecord: Path, partitioners: list | None = None) -> None:
    """Lower an exported program as `targets.executorch.export.to_pte` does (XNNPACK, IR check off
    for the liftedge ops) and write the `.pte` with its ETRecord beside it.

    The ETRecord holds the edge graph with debug handles, which map ETDump events back to the
    exported module stack (`model.layers.3.mlp.down_proj`): that is what groups the table by
    layer. It costs one more serialisation of the graph at export time; the `.pte` is unchanged.
    """
    from liftedge.targets.executorch.export import to_pte

    data, _ = to_pte(program, partitioners, etrecord=Path(etrecord))
    Path(pte).write_bytes(data)
