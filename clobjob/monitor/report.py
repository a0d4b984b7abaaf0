"""The self-contained HTML report of ``clobjob verify --report``: inline CSS and SVG, no scripts or assets."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from clobjob.monitor.status import pct

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:24px 32px;}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:600}
.pass,.ready{background:#2e7d32}.fail,.notready{background:#c62828}.na{background:#78828c}
.meta{color:#5b6573;margin:0 0 12px}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e6ea}
th{background:#f4f6f8;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.q{color:#5b6573} code{font-size:12px}
"""


def _bar_chart(months: Sequence[Mapping[str, Any]]) -> str:
    """An inline SVG stacked bar chart of covered / not covered markets per end month."""
    width, height, left, bottom, top = 1100, 310, 56, 50, 16
    plot_w, plot_h = width - left - 16, height - top - bottom
    peak = max((m["covered"] + m["not_covered"] for m in months), default=0) or 1
    step = 10 ** math.floor(math.log10(peak))
    tick = next(c for c in sorted({max(1, int(step * k)) for k in (0.1, 0.2, 0.5, 1, 2, 5, 10)}) if peak / c <= 5)
    y_max = math.ceil(peak / tick) * tick
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="coverage by market end month">']
    for value in range(0, y_max + 1, tick):
        y = top + plot_h * (1 - value / y_max)
        parts.append(f'<line x1="{left}" x2="{width - 16}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6573">'
                     f'{value:,}</text>')
    slot = plot_w / max(len(months), 1)
    label_every = math.ceil(len(months) / 14) or 1
    for i, m in enumerate(months):
        x, bar_w = left + i * slot + slot * 0.1, slot * 0.8
        y = top + plot_h
        for key, color in (("covered", "#2e7d32"), ("not_covered", "#c62828")):
            h = plot_h * m[key] / y_max
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{color}">'
                         f'<title>{html.escape(m["month"])}: {m[key]:,} {key.replace("_", " ")}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" font-size="11" '
                         f'text-anchor="middle" fill="#5b6573">{html.escape(m["month"])}</text>')
    parts.append(f'<rect x="{left}" y="{height - 14}" width="10" height="10" fill="#2e7d32"/>'
                 f'<text x="{left + 14}" y="{height - 5}" font-size="12">covered (complete or zero-fill)</text>'
                 f'<rect x="{left + 230}" y="{height - 14}" width="10" height="10" fill="#c62828"/>'
                 f'<text x="{left + 244}" y="{height - 5}" font-size="12">'
                 'not covered (missing, incomplete or unknown)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int] = frozenset()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report_html(verify_result: Mapping[str, Any], coverage_by_month: Sequence[Mapping[str, Any]],
                       worst_gaps: Sequence[Mapping[str, Any]]) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts or external assets)."""
    esc = html.escape
    ready = verify_result["ready"]
    m = verify_result["markets"]
    criteria = _table(["status", "criterion", "detail"], [
        (f'<span class="badge {c["status"].replace("/", "")}">{esc(c["status"].upper())}</span>', esc(c["name"]),
         esc(c["detail"]) + "".join(f'<br><code>{esc(e)}</code>' for e in c["examples"][:5] if c["status"] == "fail"))
        for c in verify_result["criteria"]])
    gaps = _table(["market", "end date", "expected", "stored", "missing"], [
        (f'<code>{esc(g["condition_id"])}</code><br><span class="q">{esc(g["question"])}</span>',
         esc((g["end_date"] or "-")[:10]), f'{g["expected"]:,}', f'{g["stored"]:,}', f'{g["missing"]:,}')
        for g in worst_gaps], numeric=frozenset({2, 3, 4})) if worst_gaps else "<p>No market is missing fills.</p>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clobjob coverage report</title>'
        f"<style>{_CSS}</style></head><body>"
        f'<h1>Readiness for P&amp;L: <span class="badge {"ready" if ready else "notready"}">'
        f'{"READY" if ready else "NOT READY"}</span></h1>'
        f'<p class="meta">generated {esc(verify_result["generated_at"])} · {m["universe"]:,} markets · '
        f'coverage {pct(m["coverage"])} (threshold {pct(verify_result["min_coverage"])}) · '
        f'complete {m["complete"]:,} · zero-fill {m["zero_fill"]:,} · missing {m["missing"]:,} · '
        f'incomplete {m["incomplete"]:,} · unknown {m["unknown"]:,}</p>'
        f"<h2>Coverage by market end month</h2>{_bar_chart(coverage_by_month)}"
        f"<h2>Criteria</h2>{criteria}"
        f"<h2>Worst gaps (most expected fills not stored)</h2>{gaps}"
        "</body></html>"
    )
