"""The profile report: what a run measured, reduced to timings, a per-operator table and bounds.

A runtime module (`executorch`, `onnxruntime`) turns a live run or a recorded profile into a
`Trace`: per execution of the model (one prefill call or one decoded token) its kind, tokens and
wall time, and per operator instance its time in every execution. `build_report` reduces a
trace to the report dict that the CLI prints, `--json` writes and `html` draws:

- prefill and decode tokens/s per repeat, their median and spread (min, max);
- the operator table of the decode: rows grouped by (operator, kind, layer) with calls and
  milliseconds per decoded token, the share of the operator total, and prefill milliseconds
  (`ops`), and the same summed over layers (`operators`);
- `op_time_coverage`: operator milliseconds per decoded token over the measured wall
  milliseconds per decoded token (what the per-operator table accounts for; the rest is the
  runtime's own dispatch and the Python call);
- per-layer and per-kind sums, the bandwidth bounds (`bound`), and notes saying what is missing.

This module knows no runtime; it never runs anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

REPORT_VERSION = 1


@dataclass(frozen=True)
class OpSample:
    """One operator instance (an instruction or node) and its time in each execution (ms)."""

    name: str
    kind: str
    layer: str | None   # "layers.3", "" (outside the decoder blocks), None (the runtime did not say)
    ms: tuple[float, ...]


@dataclass
class Trace:
    """What one profiled session yields, live or replayed from a recorded profile."""

    runtime: str                      # "executorch" / "onnxruntime"
    source: str                       # "live run" / "ETDump FILE" / "ORT profile FILE"
    exec_kinds: list[str]             # "prefill" / "decode", per execution
    exec_tokens: list[int]            # tokens fed per execution
    exec_repeat: list[int]            # which repeat each execution belongs to
    exec_wall_ms: list[float]         # wall time per execution
    ops: list[OpSample]
    wall_source: str                  # how exec_wall_ms was measured
    load_ms: float | None = None
    peak_rss_nbytes: int | None = None
    baseline_rss_nbytes: int | None = None
    files: dict[str, str] = field(default_factory=dict)   # profile files written (etdump, etrecord, ort json)
    notes: list[str] = field(default_factory=list)


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value (the repeats are few: no percentiles)."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def _per_repeat_rates(trace: Trace, kind: str) -> list[float]:
    tokens: dict[int, int] = {}
    ms: dict[int, float] = {}
    for k, n, r, t in zip(trace.exec_kinds, trace.exec_tokens, trace.exec_repeat, trace.exec_wall_ms):
        if k == kind:
            tokens[r] = tokens.get(r, 0) + n
            ms[r] = ms.get(r, 0.0) + t
    return [tokens[r] / (ms[r] / 1e3) for r in sorted(tokens) if ms[r] > 0]


def op_rows(trace: Trace) -> list[dict[str, Any]]:
    """Operator rows of the decode, grouped by (name, kind, layer), slowest first."""
    decode = [i for i, k in enumerate(trace.exec_kinds) if k == "decode"]
    prefill = [i for i, k in enumerate(trace.exec_kinds) if k == "prefill"]
    decode_tokens = sum(trace.exec_tokens[i] for i in decode) or 1
    groups: dict[tuple, dict[str, Any]] = {}
    for op in trace.ops:
        key = (op.name, op.kind, op.layer)
        row = groups.setdefault(key, {"name": op.name, "kind": op.kind, "layer": op.layer, "calls_per_token": 0,
                                      "decode_ms": 0.0, "prefill_ms": 0.0})
        row["calls_per_token"] += 1
        row["decode_ms"] += sum(op.ms[i] for i in decode if i < len(op.ms))
        row["prefill_ms"] += sum(op.ms[i] for i in prefill if i < len(op.ms))
    total = sum(r["decode_ms"] for r in groups.values()) or 1.0
    n_prefill = len({trace.exec_repeat[i] for i in prefill}) or 1
    rows = []
    for r in groups.values():
        rows.append({"name": r["name"], "kind": r["kind"], "layer": r["layer"], "calls_per_token": r["calls_per_token"],
                     "ms_per_token": r["decode_ms"] / decode_tokens, "share": r["decode_ms"] / total,
                     "prefill_ms": r["prefill_ms"] / n_prefill})
    rows.sort(key=lambda r: (-r["ms_per_token"], r["name"], str(r["layer"])))
    return rows


def _sum_by(rows: list[dict], *keys: str) -> list[dict[str, Any]]:
    """Rows summed over everything but `keys`, slowest first."""
    out: dict[Any, dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault(tuple(r[k] for k in keys), {**{k: r[k] for k in keys}, "ms_per_token": 0.0, "share": 0.0,
                                                       "calls_per_token": 0, "prefill_ms": 0.0})
        for f in ("ms_per_token", "share", "calls_per_token", "prefill_ms"):
            s[f] += r[f]
    return sorted(out.values(), key=lambda s: (-s["ms_per_token"], *(str(s[k]) for k in keys)))


def _layer_order(rows: list[dict]) -> list[dict]:
    """Per-layer sums in model order (layers.0, layers.1, ..., then the rest)."""
    sums = _sum_by(rows, "layer")

    def order(s):
        name = s["layer"]
        if isinstance(name, str) and name.startswith("layers."):
            return (0, int(name.split(".")[1]), "")
        return (1, 0, str(name))
    return sorted(sums, key=order)


def build_report(trace: Trace, *, artifact: str, settings: dict[str, Any], bounds: list[dict] | None = None,
                 device: dict | None = None) -> dict[str, Any]:
    """The report dict of `trace` (JSON-able, deterministic key order when dumped sorted)."""
    rows = op_rows(trace)
    decode = [i for i, k in enumerate(trace.exec_kinds) if k == "decode"]
    decode_tokens = sum(trace.exec_tokens[i] for i in decode)
    wall_per_token = sum(trace.exec_wall_ms[i] for i in decode) / decode_tokens if decode_tokens else None
    op_per_token = sum(r["ms_per_token"] for r in rows)
    coverage = op_per_token / wall_per_token if wall_per_token else None
    layers_known = any(r["layer"] is not None for r in rows)
    notes = list(trace.notes)
    if not layers_known:
        notes.append("no layer information in this profile: the operator table is not grouped by layer")
    return {
        "version": REPORT_VERSION,
        "artifact": artifact,
        "runtime": trace.runtime,
        "source": trace.source,
        "settings": settings,
        "device": device,
        "load_ms": trace.load_ms,
        "prefill_tokens_per_s": spread(_per_repeat_rates(trace, "prefill")),
        "decode_tokens_per_s": spread(_per_repeat_rates(trace, "decode")),
        "decode_wall_ms_per_token": wall_per_token,
        "decode_op_ms_per_token": op_per_token,
        "op_time_coverage": coverage,
        "wall_source": trace.wall_source,
        "executions": len(trace.exec_kinds),
        "decoded_tokens": decode_tokens,
        "peak_rss_nbytes": trace.peak_rss_nbytes,
        "baseline_rss_nbytes": trace.baseline_rss_nbytes,
        "ops": rows,
        "operators": _sum_by(rows, "name", "kind"),
        "kinds": _sum_by(rows, "kind"),
        "layers": _layer_order(rows) if layers_known else [],
        "bounds": bounds or [],
        "files": dict(trace.files),
        "notes": notes,
    }


def _layer_name(layer: str | None) -> str:
    return "(unknown)" if layer is None else (layer or "(outside)")


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _rate(s: dict) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.2f} tok/s (min {s['min']:.2f}, max {s['max']:.2f}, {len(s['values'])} repeats)"


def format_text(report: dict[str, Any], top: int = 25) -> str:
    """The report as the terminal shows it."""
    from liftedge.sizes import format_size

    mb = lambda n: "-" if n is None else format_size(n)
    lines = [f"profile of {report['artifact']} ({report['runtime']}, {report['source']})",
             f"  load              {_fmt(report['load_ms'], '.1f')} ms",
             f"  prefill           {_rate(report['prefill_tokens_per_s'])}",
             f"  decode            {_rate(report['decode_tokens_per_s'])}",
             f"  peak RSS          {mb(report['peak_rss_nbytes'])} (process before loading: "
             f"{mb(report['baseline_rss_nbytes'])})",
             f"  operator time     {_fmt(report['decode_op_ms_per_token'], '.3f')} ms of "
             f"{_fmt(report['decode_wall_ms_per_token'], '.3f')} ms per decoded token "
             f"(coverage {_fmt(report['op_time_coverage'], '.1%')}; wall: {report['wall_source']})"]
    lines.append("")
    lines.append(f"{'OPERATOR (decode, all layers)':<46} {'KIND':<26} {'CALLS':>5} {'MS/TOKEN':>9} {'SHARE':>6}")
    for r in report["operators"][:top]:
        lines.append(f"{r['name'][:46]:<46} {r['kind'][:26]:<26} {r['calls_per_token']:>5} "
                     f"{r['ms_per_token']:>9.3f} {r['share']:>6.1%}")
    if len(report["operators"]) > top:
        rest = report["operators"][top:]
        lines.append(f"{f'... {len(rest)} more rows':<46} {'':<26} {sum(r['calls_per_token'] for r in rest):>5} "
                     f"{sum(r['ms_per_token'] for r in rest):>9.3f} {sum(r['share'] for r in rest):>6.1%}")
    if report["layers"]:
        lines.append("(per layer: the JSON's 'ops' rows, and the HTML report)")
    lines.append("")
    lines.append("by kind: " + ", ".join(f"{k['kind']} {k['share']:.1%}" for k in report["kinds"]))
    if report["layers"]:
        lines.append("by layer (ms/token): " + ", ".join(
            f"{_layer_name(s['layer'])} {s['ms_per_token']:.2f}" for s in report["layers"]))
    if report["bounds"]:
        lines.append("")
        lines.append(f"{'DECODE BOUND':<40} {'GB/s':>7} {'MB/TOKEN':>9} {'BOUND TOK/S':>12} {'MEASURED':>9}")
        for b in report["bounds"]:
            lines.append(f"{b['label'][:40]:<40} {b['bandwidth_gbps']:>7.1f} {b['read_nbytes_per_token'] / 1e6:>9.1f} "
                         f"{b['tokens_per_s']:>12.1f} {_fmt(b['measured_tokens_per_s'], '9.2f'):>9}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
