"""Rendering of a gate ``Verdict``: the rich panel for a terminal, the JSON document, the Markdown summary.

The Markdown is written for ``$GITHUB_STEP_SUMMARY``: a verdict line, one table row per rule, the headline
figures of ``summary.overall`` and the most-changed tensors of ``summary.top_changed``, so that a CI run's
summary page tells a reviewer why the gate failed without opening the report. Everything here is a pure
function of the verdict and report rows; nothing computes a metric, evaluates a rule, writes a file or
decides an exit code (``weightdiff.gate`` evaluates, ``weightdiff.cli`` writes and exits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from weightdiff import summary as S
from weightdiff.gate import RuleResult, Verdict

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "off": "dim"}
_ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
#: How many most-changed tensors the Markdown summary lists (the terminal summary has its own --top).
MARKDOWN_TOP = 5


def fmt_value(v: float | int | None) -> str:
    """A measured value, exact enough to see why it crossed the threshold (0.4999996 is not 0.5)."""
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return format(v, ".6g")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def headline(verdict: Verdict) -> str:
    """One line: PASS or FAIL, and what made it so."""
    failed = sum(1 for r in verdict.rules if r.result == "fail")
    n = len(verdict.rules)
    parts = []
    if failed:
        parts.append(f"{failed} of {n} rules failed")
    elif n:
        parts.append(f"none of {n} rules failed" if verdict.warnings else f"all {n} rules passed")
    if verdict.warnings:
        parts.append(f"{verdict.warnings} warning" + ("s" if verdict.warnings != 1 else ""))
    if verdict.strict.enabled:
        parts.append(
            f"strict: {verdict.strict.mismatches} mismatches" if verdict.strict.mismatches else "strict: ok"
        )
    return f"{verdict.result.upper()}: " + ", ".join(parts)


def _label(r: RuleResult) -> str:
    return f"{r.rule.name}: {r.rule.text}" if r.rule.name else r.rule.text


def _measured(r: RuleResult) -> str:
    if r.rule.aggregate in ("any", "all"):
        return f"{r.value:,} of {r.tensors:,} tensors"
    return fmt_value(r.value)


def _offenders(r: RuleResult, limit: int | None = None) -> list[str]:
    return [f"{name} ({fmt_value(v)})" for name, v in r.offenders[:limit]]


def _strict_lines(verdict: Verdict) -> list[str]:
    st = verdict.strict
    lines = []
    if st.only_base:
        lines.append(f"{len(st.only_base)} only in base: {', '.join(st.only_base)}")
    if st.only_tuned:
        lines.append(f"{len(st.only_tuned)} only in tuned: {', '.join(st.only_tuned)}")
    if st.shape_mismatch:
        shown = ", ".join(f"{m['name']} {m['base']} vs {m['tuned']}" for m in st.shape_mismatch)
        lines.append(f"{len(st.shape_mismatch)} shape mismatches: {shown}")
    return lines


def render_panel(verdict: Verdict, console: Console, subject: str | None = None) -> None:
    """The verdict as a rich panel: one row per rule with its measured value and worst tensors."""
    t = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    t.add_column("result")
    t.add_column("rule")
    t.add_column("value", justify="right")
    t.add_column("worst tensors")
    for r in verdict.rules:
        t.add_row(
            Text(r.result.upper(), style=_STYLE[r.result]),
            _label(r)
            if not r.rule.description
            else Text.assemble(_label(r), "\n", (r.rule.description, "dim")),
            _measured(r),
            "\n".join(_offenders(r)) or Text("—", style="dim"),
        )
    parts: list[Any] = [t] if verdict.rules else []
    st = verdict.strict
    if st.enabled or st.mismatches:
        strict_title = Text.assemble(
            ("strict ", "bold"),
            (st.result.upper(), _STYLE[st.result]),
            ("" if st.enabled else " (mismatches listed; --strict makes them fail)", "dim"),
        )
        parts.append(strict_title)
        parts += [Text("  " + line) for line in _strict_lines(verdict)]
    title = Text.assemble(("gate ", "bold"), (headline(verdict), _STYLE[verdict.result]))
    console.print(
        Panel(
            Group(*parts) if parts else Text("no rules"),
            title=title,
            subtitle=subject,
            title_align="left",
            expand=False,
            border_style=_STYLE[verdict.result],
        )
    )


def to_json(verdict: Verdict) -> dict[str, Any]:
    """The ``--json`` document of ``weightdiff check`` (``compare --json`` nests it under "verdict")."""
    return verdict.as_dict()


def _md_cell(text: str) -> str:
    # A pipe would end the table cell; backticks keep tensor names and globs literal.
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_md_cell(text)}`"


def to_markdown(
    verdict: Verdict | None,
    rows: Sequence[S.Row],
    metadata: dict[str, Any],
    *,
    top: int = MARKDOWN_TOP,
) -> str:
    """Compact Markdown for ``$GITHUB_STEP_SUMMARY``; ``verdict`` is None when no rule was given."""
    base = (metadata.get("base") or {}).get("given", "base")
    tuned = (metadata.get("tuned") or {}).get("given", "tuned")
    lines = []
    if verdict is None:
        lines += ["## weightdiff: no gate rules", ""]
    else:
        lines += [f"## {_ICON[verdict.result]} weightdiff gate {headline(verdict)}", ""]
    lines += [f"{_code(str(base))} → {_code(str(tuned))}", ""]
    if verdict is not None and verdict.rules:
        lines += ["| result | rule | value | worst tensors |", "|---|---|--:|---|"]
        for r in verdict.rules:
            rule = _code(r.rule.text) + (f" ({_md_cell(r.rule.name)})" if r.rule.name else "")
            if r.rule.description:
                rule += f"<br>{_md_cell(r.rule.description)}"
            worst = ", ".join(f"{_code(n)} {fmt_value(v)}" for n, v in r.offenders) or "—"
            lines.append(f"| {_ICON[r.result]} {r.result} | {rule} | {_measured(r)} | {worst} |")
        lines.append("")
    if verdict is not None and (verdict.strict.enabled or verdict.strict.mismatches):
        st = verdict.strict
        state = st.result if st.enabled else "off (mismatches listed, not failing)"
        lines.append(f"**Strict**: {state}" + ("" if st.mismatches else ", no mismatches"))
        lines += [f"- {_md_cell(line)}" for line in _strict_lines(verdict)]
        lines.append("")
    if rows:
        ov = S.overall(rows)
        lines += [
            "| tensors | parameters | bf16-aware sparsity | exact sparsity | atol sparsity | hidden by bf16 "
            "| rel. update |",
            "|--:|--:|--:|--:|--:|--:|--:|",
            f"| {ov['tensors']:,} | {ov['numel']:,} | {_pct(ov['sparsity_bf16'])} | "
            f"{_pct(ov['sparsity_exact'])} | {_pct(ov['sparsity_atol'])} | {ov['hidden_by_bf16']:,} | "
            f"{fmt_value(ov['rel_delta'])} |",
            "",
            f"<details><summary>Most changed tensors (top {min(top, len(rows))})</summary>",
            "",
            "| tensor | rel Δ | changed bf16 | max abs Δ |",
            "|---|--:|--:|--:|",
        ]
        for row in S.top_changed(rows, top):
            sp = row.get("sparsity_bf16")
            lines.append(
                f"| {_code(row['name'])} | {fmt_value(row.get('rel_delta'))} | "
                f"{_pct(None if sp is None else 1 - sp)} | {fmt_value(row.get('delta_max'))} |"
            )
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"
