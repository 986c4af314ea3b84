"""A self-contained HTML report: inline CSS and SVG plots, no scripts, nothing fetched; opens offline."""

from __future__ import annotations

import math
from html import escape

from .render import drift_lines, fmt, report_lines
from .types import DriftReport, Plan, Report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}table{border-collapse:collapse;font-size:.85em}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f4f4}
.pass{color:#1a7f37}.fail{color:#c62828}.measured{color:#555}li{margin:2px 0}
svg text{font-size:11px;fill:#333}.note{color:#666;font-size:.85em}
"""

_W, _H, _PAD = 900, 280, 48


def _log_scale(values: list[float]) -> tuple[float, float]:
    logs = [math.log10(max(v, 1e-12)) for v in values]
    low, high = math.floor(min(logs)), math.ceil(max(logs))
    return (low, high) if high > low else (low - 1, high + 1)


def depth_plot(drift: DriftReport) -> str:
    """Per-site drift along execution order: cumulative and local relative L2, log scale."""
    sites = [s for s in drift.sites if s.order >= 0]
    series = {
        "cumulative": [(s.order, s.relative_l2) for s in sites if s.relative_l2 is not None],
        "local": [(s.order, s.local_relative_l2) for s in sites if s.local_relative_l2 is not None],
    }
    values = [v for points in series.values() for _, v in points if v is not None]
    if not values:
        return "<p class='note'>no per-site figures</p>"
    low, high = _log_scale(values)
    n = max(len(sites) - 1, 1)

    def x(i: int) -> float:
        return _PAD + (_W - 2 * _PAD) * i / n

    def y(v: float) -> float:
        return _H - _PAD - (_H - 2 * _PAD) * (math.log10(max(v, 1e-12)) - low) / (high - low)

    parts = [
        f'<svg role="img" aria-label="per-site drift along depth" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for exponent in range(int(low), int(high) + 1):
        yy = y(10.0**exponent)
        parts.append(
            f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
            f'<text x="4" y="{yy + 4:.1f}">1e{exponent}</text>'
        )
    colours = {"cumulative": "#1565c0", "local": "#e65100"}
    for name, points in series.items():
        if not points:
            continue
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in points)
        parts.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="1.5" points="{path}"/>')
        parts += [
            f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colours[name]}">'
            f"<title>{escape(sites[i].path if i < len(sites) else '')}: {v:.3g}</title></circle>"
            for i, v in points
        ]
    parts.append(f'<text x="{_W / 2 - 80}" y="{_H - 10}">converted sites in execution order →</text>')
    parts.append(
        f'<text x="{_W - 250}" y="16" fill="{colours["cumulative"]}">● cumulative rel L2 (vs original)</text>'
        f'<text x="{_W - 250}" y="32" fill="{colours["local"]}">● local rel L2 (site + its own conv)</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def agreement_plot(drift: DriftReport) -> str:
    """Bars for cosine and, for class-score leaves, top-1 and top-5 agreement, per output leaf; for
    detection records, the share of the original's detections matched."""
    bars = []
    for o in drift.outputs[:6]:
        bars.append((f"{o.name} cos", max(o.cosine or 0.0, 0.0)))
        if o.top1_agreement is not None:
            bars += [(f"{o.name} top-1", o.top1_agreement), (f"{o.name} top-5", o.top5_agreement or 0.0)]
    bars += [(f"{d.name} matched", d.matched_share or 0.0) for d in drift.detections[:3]]
    row, width = 22, 500
    height = row * len(bars) + 10
    parts = [
        f'<svg role="img" aria-label="output agreement" width="{width + 260}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (label, value) in enumerate(bars):
        yy = 5 + i * row
        parts.append(
            f'<text x="0" y="{yy + 14}">{escape(label)}</text>'
            f'<rect x="200" y="{yy}" width="{width}" height="16" fill="#eee"/>'
            f'<rect x="200" y="{yy}" width="{width * value:.1f}" height="16" fill="#2e7d32"/>'
            f'<text x="{205 + width}" y="{yy + 13}">{100 * value:.1f}%</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def report_html(report: Report, plan: Plan | None = None) -> str:
    title = f"normswap report: {report.model_cls.rsplit('.', 1)[-1]} · recipe {report.recipe}"
    body = [f"<h1>{escape(title)}</h1>", "<ul>", *[f"<li>{escape(x)}</li>" for x in report_lines(report)], "</ul>"]
    drift = report.drift
    if drift is not None:
        body += [
            f"<h2 class='{drift.verdict}'>Drift: {drift.verdict.upper()}</h2>",
            "<ul>",
            *[f"<li>{escape(x)}</li>" for x in drift_lines(drift)[1:]],
            "</ul>",
            "<h2>Per-site drift along depth</h2>",
            depth_plot(drift),
            "<h2>Output agreement</h2>",
            agreement_plot(drift),
            *_findings_table(drift),
            "<h2>Sites</h2>",
            _site_table(drift),
        ]
    body += ["<h2>Swaps</h2>", "<table><tr><th>site</th><th>from</th><th>to</th><th>transfer</th></tr>"]
    body += [
        f"<tr><td>{escape(s.path)}</td><td>{escape(s.old_cls.rsplit('.', 1)[-1])}</td>"
        f"<td>{escape(s.new_cls.rsplit('.', 1)[-1])}</td><td>{escape(s.transfer)}</td></tr>"
        for s in report.swaps
    ]
    body.append("</table>")
    if plan is not None:
        from .render import plan_text

        body += ["<h2>Plan</h2>", f"<pre>{escape(plan_text(plan))}</pre>"]
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _site_table(drift: DriftReport) -> str:
    rows = [
        "<table><tr><th>#</th><th>site</th><th>target</th><th>local rel L2</th><th>cumulative rel L2</th>"
        "<th>cumulative cos</th></tr>"
    ]
    rows += [
        f"<tr><td>{s.order}</td><td>{escape(s.path)}</td><td>{escape(s.target)}</td>"
        f"<td>{fmt(s.local_relative_l2, 3)}</td><td>{fmt(s.relative_l2, 3)}</td><td>{fmt(s.cosine, 3)}</td></tr>"
        for s in drift.sites
    ]
    rows.append("</table>")
    return "".join(rows)


def _findings_table(drift: DriftReport) -> list[str]:
    if not drift.findings:
        return []
    rows = ["<h2>Output leaves not compared element by element</h2>",
            "<table><tr><th>leaf</th><th>kind</th><th>original</th><th>converted</th><th>batches</th><th>what</th></tr>"]
    rows += [
        f"<tr><td>{escape(f.name)}</td><td>{escape(f.kind)}</td><td>{escape(str(f.original_shape))}</td>"
        f"<td>{escape(str(f.converted_shape))}</td><td>{f.batches}</td><td>{escape(f.message)}</td></tr>"
        for f in drift.findings
    ]
    rows.append("</table>")
    return rows
