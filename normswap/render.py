"""Plans and reports for people: rich tables in the terminal, plain text and Markdown elsewhere."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .types import Plan, Report


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
            where = f"{shape} ({s.layout}{'?' if s.layout_inferred else ''}, {s.learned_by})"
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
    if plan.trace_error:
        lines.append(f"fx trace failed, sites learned from forward hooks: {plan.trace_error}")
    if plan.unmatched_rules:
        lines.append(f"rules that matched nothing: {', '.join(plan.unmatched_rules)}")
    if plan.other_norms:
        kinds: dict[str, int] = {}
        for o in plan.other_norms:
            name = o.cls.rsplit(".", 1)[-1]
            kinds[name] = kinds.get(name, 0) + 1
        lines.append("other norm layers present: " + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())))
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


def report_lines(report: Report) -> list[str]:
    lines = [
        f"{report.model_cls.rsplit('.', 1)[-1]} · recipe {report.recipe} · "
        f"{len(report.swaps)} sites converted · BatchNorm left: {len(report.batchnorm_left)}"
    ]
    lines.append(
        f"parameters {report.params_before:,} → {report.params_after:,}; "
        f"buffers {report.buffers_before:,} → {report.buffers_after:,}"
    )
    if report.drift:
        lines.append(
            "output drift (eval, example inputs): " + ", ".join(f"{k} {v:.4g}" for k, v in report.drift.items())
        )
    lines.append("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in report.timings.items()))
    lines += [f"warning: {w}" for w in report.warnings]
    return lines


def report_markdown(report: Report, plan: Plan) -> str:
    out = [
        f"# normswap report: {report.model_cls}",
        "",
        *[f"- {line}" for line in report_lines(report)],
        "",
        "| site | from | to | transfer |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {s.path} | {s.old_cls.rsplit('.', 1)[-1]} | {s.new_cls.rsplit('.', 1)[-1]} | {s.transfer} |"
        for s in report.swaps
    ]
    out += ["", "## Plan", "", "```", plan_text(plan).rstrip(), "```", ""]
    return "\n".join(out)


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
