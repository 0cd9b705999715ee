"""The profile report as one self-contained HTML file: inline SVG charts, inline CSS, no scripts.

`render_html(report)` draws (1) the decode time per operator (the slowest rows, coloured by
kind), (2) the decode bound of each memory system beside the measured speed, (3) the time
per model layer where the profile has layers, then the summary and the full operator table.
Nothing is fetched from the network; the file opens offline in any browser.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

KIND_COLOURS = {"lift-project kernel": "#d62728", "lift-project (stock ops)": "#d62728", "liftedge kernel": "#ff9896",
                "XNNPACK": "#1f77b4", "portable": "#7f7f7f", "runtime (prim op)": "#c7c7c7", "MatMulNBits": "#9467bd",
                "ORT CPU": "#2ca02c"}
OTHER_COLOUR = "#bcbd22"
BAR_HEIGHT = 18
LABEL_WIDTH = 330
CHART_WIDTH = 1100


def _bars(rows: list[tuple[str, float, str, str]], unit: str, title: str, log: bool = False) -> str:
    """A horizontal bar chart: (label, value, colour, annotation) per row; `log` scales the bars
    logarithmically from half the smallest value (bounds and measurements differ by 100x or more)."""
    if not rows:
        return ""
    top = max(v for _, v, _, _ in rows) or 1.0
    floor = min(v for _, v, _, _ in rows if v > 0) / 2 if log and any(v > 0 for _, v, _, _ in rows) else 0.0
    scale = (lambda v: math.log(max(v, floor) / floor) / math.log(top / floor)) if floor else (lambda v: v / top)
    plot = CHART_WIDTH - LABEL_WIDTH - 170
    height = 30 + BAR_HEIGHT * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="0" y="16" class="t">{escape(title)}</text>']
    for i, (label, value, colour, note) in enumerate(rows):
        y = 28 + i * BAR_HEIGHT
        w = max(1.0, plot * scale(value))
        parts.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + 13}" text-anchor="end" class="l">{escape(label[:52])}</text>'
                     f'<rect x="{LABEL_WIDTH}" y="{y + 2}" width="{w:.1f}" height="{BAR_HEIGHT - 4}" fill="{colour}"/>'
                     f'<text x="{LABEL_WIDTH + w + 6:.1f}" y="{y + 13}" class="l">{value:.3g} {unit}{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _legend(kinds: list[dict]) -> str:
    return " ".join(f'<span class="k"><span class="sw" style="background:{KIND_COLOURS.get(k["kind"], OTHER_COLOUR)}">'
                    f'</span>{escape(k["kind"])} {k["share"]:.1%}</span>' for k in kinds)


def _summary(report: dict[str, Any]) -> str:
    from liftedge.profile.report import _rate
    from liftedge.sizes import format_size

    mb = lambda n: "-" if n is None else format_size(n)
    cov = report["op_time_coverage"]
    items = [("artifact", report["artifact"]), ("runtime", f"{report['runtime']} ({report['source']})"),
             ("load", "-" if report["load_ms"] is None else f"{report['load_ms']:.1f} ms"),
             ("prefill", _rate(report["prefill_tokens_per_s"])), ("decode", _rate(report["decode_tokens_per_s"])),
             ("peak RSS", f"{mb(report['peak_rss_nbytes'])} (before loading {mb(report['baseline_rss_nbytes'])})"),
             ("operator time / wall time per token",
              f"{report['decode_op_ms_per_token']:.3f} / {report['decode_wall_ms_per_token']:.3f} ms "
              f"(coverage {'-' if cov is None else f'{cov:.1%}'})"),
             ("settings", ", ".join(f"{k} {v}" for k, v in report["settings"].items() if v is not None))]
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in items) + "</table>"


def _op_table(report: dict[str, Any]) -> str:
    head = "<tr><th>operator</th><th>kind</th><th>layer</th><th>calls/token</th><th>ms/token</th><th>share</th>" \
           "<th>prefill ms</th></tr>"
    body = "".join(f"<tr><td>{escape(r['name'])}</td><td>{escape(r['kind'])}</td>"
                   f"<td>{'-' if r['layer'] is None else escape(r['layer'] or 'outside')}</td>"
                   f"<td class=n>{r['calls_per_token']}</td><td class=n>{r['ms_per_token']:.4f}</td>"
                   f"<td class=n>{r['share']:.1%}</td><td class=n>{r['prefill_ms']:.3f}</td></tr>" for r in report["ops"])
    return f"<table class=ops>{head}{body}</table>"


def render_html(report: dict[str, Any], top: int = 25) -> str:
    ops = report["operators"][:top]
    op_chart = _bars([(r["name"], r["ms_per_token"], KIND_COLOURS.get(r["kind"], OTHER_COLOUR),
                       f" ({r['share']:.1%}, {r['calls_per_token']} calls)") for r in ops], "ms",
                     f"Decode time per operator, all layers (ms per token, {len(ops)} slowest)")
    bound_rows = [(b["label"], b["tokens_per_s"], "#aec7e8", " bound") for b in report["bounds"]]
    measured = report["decode_tokens_per_s"]["median"]
    if measured is not None:
        where = "here" if report["source"] == "live run" else "in the recorded profile"
        bound_rows.append((f"measured {where} (median decode)", measured, "#d62728", ""))
    bound_chart = _bars(bound_rows, "tok/s", "Decode speed: memory-bandwidth bound vs measured (tokens/s, log scale)",
                        log=True)
    here = next((b for b in report["bounds"] if b.get("efficiency") is not None), None)
    if here is not None:
        bound_chart += (f"<p>Measured decode reaches {here['efficiency']:.1%} of the bound of {escape(here['label'])} "
                        f"({here['read_nbytes_per_token'] / 1e6:.1f} MB read per token at {here['bandwidth_gbps']:.1f} GB/s)."
                        "</p>")
    layer_chart = _bars([("unknown layer" if s["layer"] is None else (s["layer"] or "outside the blocks"),
                          s["ms_per_token"], "#17becf", "")
                         for s in report["layers"]], "ms", "Decode time per model layer (ms per token)")
    notes = "".join(f"<li>{escape(n)}</li>" for n in report["notes"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>liftedge profile: {escape(report['artifact'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
svg .t {{ font-size: 14px; font-weight: bold; }} svg .l {{ font-size: 12px; }}
.k {{ margin-right: 14px; font-size: 13px; }} .sw {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }}
</style></head><body>
<h1>liftedge profile</h1>
{_summary(report)}
<h2>Per-operator time (decode)</h2>
<p>{_legend(report['kinds'])}</p>
{op_chart}
<h2>Bound vs measured</h2>
{bound_chart or '<p>No bound: the model shape is unknown (see notes).</p>'}
{('<h2>Per layer</h2>' + layer_chart) if layer_chart else ''}
<h2>Notes</h2><ul>{notes}</ul>
<h2>All operators, per layer</h2>
{_op_table(report)}
</body></html>
"""
