"""Plans and reports for people: rich tables in the terminal, plain text and Markdown elsewhere."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .types import BATCHNORM1D_LAYOUTS, DetectionDrift, DriftReport, OutputDrift, OutputFinding, Plan, Report, Site


def plan_table(plan: Plan, max_rows: int | None = None, wide: bool = True) -> Table:
    """One row per site. ``wide`` adds the match reason; the narrow form fits 80 columns."""
    table = Table(
        title=f"normswap plan: {plan.model_cls.rsplit('.', 1)[-1]} · recipe {plan.recipe}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        expand=False,
    )
    columns = (
        ("site", "class", "input (layout, by)", "action", "rule", "reason")
        if wide
        else ("site", "class", "input", "action")
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    entries = plan.entries if max_rows is None else plan.entries[:max_rows]
    for e in entries:
        s = e.site
        shape = "×".join(map(str, s.input_shape)) if s.input_shape else "?"
        action = f"→ {e.target}" if e.action == "convert" else "keep"
        opts = {k: v for k, v in e.options.items() if k not in ("transfer", "affine")}
        if opts:
            action += " " + ",".join(f"{k}={v}" for k, v in opts.items())
        if e.action == "convert":
            action += f" [{e.options.get('transfer', '')}]"
        if wide:
            where = f"{shape} ({_layout_text(s)}, {s.learned_by})"
            table.add_row(s.path, s.short_cls, where, action, e.rule or "-", e.reason)
        else:
            table.add_row(s.path, s.short_cls, shape, action)
    if max_rows is not None and len(plan.entries) > max_rows:
        table.caption = f"… {len(plan.entries) - max_rows} more sites"
    return table


def plan_footer(plan: Plan) -> list[str]:
    lines = [
        f"{len(plan.entries)} sites (trace: {plan.trace}); "
        + ", ".join(f"{k}: {v}" for k, v in sorted(plan.summary().items()))
    ]
    if plan.trace_error and plan.trace == "parts":
        traced = sum(1 for e in plan.entries if e.site.traced)
        lines.append(f"the whole model did not trace ({plan.trace_error}); {traced} of {len(plan.entries)} sites "
                     f"learned from traces of its parts (fx:<part>), the rest from forward hooks")
    elif plan.trace_error:
        lines.append(f"fx trace failed, sites learned from forward hooks: {plan.trace_error}")
    if plan.unmatched_rules:
        lines.append(f"rules that matched nothing: {', '.join(plan.unmatched_rules)}")
    if plan.other_norms:
        kinds: dict[str, int] = {}
        for o in plan.other_norms:
            name = o.cls.rsplit(".", 1)[-1]
            kinds[name] = kinds.get(name, 0) + 1
        lines.append("other norm layers present: " + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())))
    if plan.recovery.lr is not None:
        lines.append(f"recovery (normswap.recover, --recover-steps) defaults to lr {plan.recovery.lr:g}, from the "
                     f"recipe {plan.recipe}")
    return lines


def plan_text(plan: Plan, width: int = 140) -> str:
    console = Console(width=width, record=True, file=_Null(), color_system=None)
    console.print(plan_table(plan))
    for line in plan_footer(plan):
        console.print(line, highlight=False)
    return console.export_text()


def print_plan(plan: Plan, console: Console | None = None, max_rows: int | None = None) -> None:
    console = console or Console()
    console.print(plan_table(plan, max_rows, wide=console.width >= 120))
    for line in plan_footer(plan):
        console.print(line, highlight=False)


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def output_line(o: OutputDrift) -> str:
    line = f"{o.name}: rel L2 {fmt(o.relative_l2)} · cos {fmt(o.cosine)} · max abs {fmt(o.max_abs)}"
    if o.top1_agreement is not None:
        line += f" · top-1 {pct(o.top1_agreement)} · top-5 {pct(o.top5_agreement)} · KL {fmt(o.kl_divergence)}"
    return line


def finding_line(f: OutputFinding) -> str:
    return f"{f.name}: {f.message}"


def detection_line(d: DetectionDrift) -> str:
    """What a detection user acts on: how many of the original's detections are found again, how
    well they overlap, how far their scores moved."""
    line = (f"detections {d.name}: {d.original_detections} → {d.converted_detections} over {d.images} images; "
            f"matched {d.matched} (IoU ≥ {d.iou_threshold:g}, same label) = {pct(d.matched_share)} of the "
            f"original's")
    if d.matched:
        line += f" · mean IoU {fmt(d.mean_iou, 3)} · mean |score diff| {fmt(d.mean_score_abs_diff, 3)}"
    if d.images_compared < d.images:
        line += f" · {d.images - d.images_compared} images with detections on one side only or neither"
    return line


def feature_line(drift: DriftReport) -> str | None:
    """For detectors: where backbone/FPN feature drift is read (the per-site cumulative drift)."""
    deepest = max((s for s in drift.sites if s.relative_l2 is not None), key=lambda s: s.order, default=None)
    if not drift.detections or deepest is None:
        return None
    return (f"backbone/neck features: the per-site cumulative drift (sites table) is the feature drift; "
            f"deepest converted site {deepest.path}: rel L2 {fmt(deepest.relative_l2, 3)}")


MAX_FINDING_LINES = 4


def drift_lines(drift: DriftReport) -> list[str]:
    """The drift figures as plain lines (terminal, Markdown)."""
    lines = [f"verdict: {drift.verdict.upper()} · inputs: {drift.input_description} ({drift.input_source})"]
    lines += [output_line(o) for o in drift.outputs[:4]]
    if len(drift.outputs) > 4:
        lines.append(f"… {len(drift.outputs) - 4} more output leaves (worst rel L2 {fmt(drift.worst_relative_l2)})")
    if not drift.outputs:
        lines.append("no output leaf kept its shape: nothing compared element by element (see below)")
    lines += [finding_line(f) for f in drift.findings[:MAX_FINDING_LINES]]
    if len(drift.findings) > MAX_FINDING_LINES:
        kinds = sorted({f.kind for f in drift.findings[MAX_FINDING_LINES:]})
        lines.append(f"… {len(drift.findings) - MAX_FINDING_LINES} more output leaves not compared "
                     f"({', '.join(kinds)}; all in report.json)")
    lines += [detection_line(d) for d in drift.detections]
    features = feature_line(drift)
    if features:
        lines.append(features)
    o, c = drift.original, drift.converted
    lines.append(
        f"batch dependence (train, 0 = independent): {fmt(o.batch_dependence, 3)} → {fmt(c.batch_dependence, 3)}"
    )
    if o.batch_dependence_note and o.batch_dependence_note == c.batch_dependence_note:
        lines.append(f"  both: {o.batch_dependence_note}")
    else:
        lines += [f"  {who}: {stats.batch_dependence_note}" for who, stats in (("original", o), ("converted", c))
                  if stats.batch_dependence_note]
    lines.append(f"train/eval gap of the converted model: {fmt(drift.train_eval_gap, 3)}")
    if drift.train_eval_note:
        lines.append(f"  {drift.train_eval_note}")
    lines.append(
        f"latency per batch: {ms(o.latency_s)} → {ms(c.latency_s)} · "
        f"peak forward memory: {size(o.peak_memory_bytes)} → {size(c.peak_memory_bytes)}"
    )
    lines.append(f"parameters {o.parameters:,} → {c.parameters:,} · buffers {o.buffers:,} → {c.buffers:,}")
    lines += [f"FAILED: {f}" for f in drift.failures]
    lines += [f"warning: {w}" for w in drift.warnings]
    return lines


def worst_sites_table(drift: DriftReport, n: int = 5) -> Table:
    table = Table(title="where drift enters (worst local drift)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("#", "site", "target", "local rel L2", "cumulative rel L2"):
        table.add_column(column, overflow="fold")
    for s in drift.worst_sites(n):
        table.add_row(str(s.order), s.path, s.target, fmt(s.local_relative_l2, 3), fmt(s.relative_l2, 3))
    return table


def report_lines(report: Report) -> list[str]:
    lines = [
        f"{report.model_cls.rsplit('.', 1)[-1]} · recipe {report.recipe} · "
        f"{len(report.swaps)} sites converted · BatchNorm left: {len(report.batchnorm_left)}"
    ]
    lines.append("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in report.timings.items()))
    calibration = report.calibration or {}
    if "fit" in calibration:
        lines.append(calibration_line(calibration))
    if "recovery" in calibration:
        lines.append(recovery_line(calibration["recovery"]))
    lines += [f"warning: {w}" for w in report.warnings]
    return lines


def calibration_line(info: dict[str, Any]) -> str:
    """What calibration did, from the report's JSON: fit, data, and the output error it moved."""
    if not info.get("calibrated"):
        skipped = info.get("skipped") or []
        why = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        why += f"; … {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return f"calibration: nothing to refit ({why or 'no site was converted'}); the calibration data went unused"
    errors = info.get("output_error") or []
    # On the calibration data itself a fit can memorise: say which data, or it reads as held-out.
    where = "these samples" if not info.get("held_back") else f"{info['held_back']} held-back samples"
    moved = (f"; output error on {where} {fmt(errors[0])} → {fmt(errors[info.get('kept_sweeps', 0)])}"
             if errors else "")
    undone = " (made it worse: undone)" if errors and not info.get("kept_sweeps") else ""
    return (f"calibration: {info.get('fit')} on {info.get('samples')} samples ({info.get('source')}), "
            f"{len(info.get('calibrated', []))} sites{moved}{undone}")


def recovery_line(info: dict[str, Any]) -> str:
    """What distillation did, from the report's JSON; with a holdout, which state it kept and why."""
    source = f" ({info['lr_source']})" if info.get("lr_source", "argument") != "argument" else ""
    source += f" after {info['warmup_steps']} warm-up steps" if info.get("warmup_steps") else ""
    line = (f"recovery: {info.get('steps')} distillation steps at lr {fmt(info.get('lr'), 2)}{source} in "
            f"{info.get('seconds', 0):.1f}s, loss {fmt(info.get('first_loss'))} → {fmt(info.get('final_loss'))}")
    if info.get("augment"):
        line += f", on views made by {info['augment']}"
    judged = {int(step): error for step, error in info.get("holdout_error") or []}
    kept = info.get("kept_step")
    if judged and kept is not None:
        line += (f"; output error on {info.get('held_back')} held-back samples {fmt(judged[min(judged)])} → "
                 f"{fmt(judged[kept])} (state after step {kept} of {max(judged)} kept)")
    return line


def print_report(report: Report, console: Console | None = None) -> None:
    """The terminal summary: verdict, main figures, the worst sites; readable in 80 columns."""
    console = console or Console()
    for line in report_lines(report):
        console.print(line, highlight=False)
    if report.drift is not None:
        print_drift(report.drift, console)


def print_drift(drift: DriftReport, console: Console | None = None) -> None:
    console = console or Console()
    style = {"pass": "bold green", "fail": "bold red"}.get(drift.verdict, "bold")
    lines = drift_lines(drift)
    console.print(lines[0], style=style, highlight=False)
    for line in lines[1:]:
        console.print(line, highlight=False, style="red" if line.startswith("FAILED") else None)
    if drift.worst_sites():
        console.print(worst_sites_table(drift))


def report_markdown(report: Report, plan: Plan | None = None) -> str:
    out = [f"# normswap report: {report.model_cls}", "", *[f"- {line}" for line in report_lines(report)], ""]
    if report.drift is not None:
        out += ["## Drift", "", *[f"- {line}" for line in drift_lines(report.drift)], ""]
        if report.drift.findings:
            out += ["### Output leaves not compared element by element", "",
                    "| leaf | kind | original | converted | batches | what |", "|---|---|---|---|---|---|"]
            out += [f"| {f.name} | {f.kind} | {f.original_shape} | {f.converted_shape} | {f.batches} | {f.message} |"
                    for f in report.drift.findings]
            out.append("")
        out += [
            "### Per site, in execution order",
            "",
            "| # | site | target | local rel L2 | cumulative rel L2 | cumulative cos |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {s.order} | {s.path} | {s.target} | {fmt(s.local_relative_l2, 3)} | {fmt(s.relative_l2, 3)} | "
            f"{fmt(s.cosine, 3)} |"
            for s in report.drift.sites
        ]
        out.append("")
    out += ["## Swaps", "", "| site | from | to | transfer |", "|---|---|---|---|"]
    out += [
        f"| {s.path} | {s.old_cls.rsplit('.', 1)[-1]} | {s.new_cls.rsplit('.', 1)[-1]} | {s.transfer} |"
        for s in report.swaps
    ]
    if plan is not None:
        out += ["", "## Plan", "", "```", plan_text(plan).rstrip(), "```"]
    out.append("")
    return "\n".join(out)


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _layout_text(site: Site) -> str:
    if not site.layout_inferred:
        return site.layout
    # A BatchNorm1d not run because the recipe treats both of its layouts alike (planner.layout_matters).
    return "features|sequence?" if site.layout in BATCHNORM1D_LAYOUTS else f"{site.layout}?"
