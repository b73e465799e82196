"""Rich rendering of plans and summaries for people at a terminal.

Consumes the numbers computed in ``summary`` and never computes metrics of its own. Colour follows rich's
rules (NO_COLOR, non-TTY output); nothing here decides exit codes or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from weightdiff import summary as S
from weightdiff.pairing import Plan

_SHADES = ("█", "▇", "▆", "▅", "▄", "▃", "▂", "▁", " ")


def _pct(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, fmt: str = ".3g") -> str:
    return "—" if v is None else format(v, fmt)


def render_plan(plan: Plan, console: Console, base: str, tuned: str) -> None:
    """One line of counts, then the mismatches (at most a few of each kind, with totals)."""
    gb = plan.total_bytes / 1e9
    console.print(
        f"[bold]Plan[/]: {len(plan.pairs)} tensor pairs ({gb:.2f} GB) from {base} and {tuned}"
        + (f"; {plan.excluded} excluded by filters" if plan.excluded else "")
    )
    for label, items in (
        ("only in base", plan.only_base),
        ("only in tuned", plan.only_tuned),
        ("not floating point, skipped", plan.not_float),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            console.print(f"  {len(items)} {label}: {', '.join(items[:5])}{more}")
    if plan.shape_mismatch:
        shown = ", ".join(f"{n} {list(a)} vs {list(b)}" for n, a, b in plan.shape_mismatch[:5])
        more = f" (+{len(plan.shape_mismatch) - 5} more)" if len(plan.shape_mismatch) > 5 else ""
        console.print(f"  {len(plan.shape_mismatch)} shape mismatches, skipped: {shown}{more}")
    if plan.dtype_mismatch:
        shown = ", ".join(f"{n} {a} vs {b}" for n, a, b in plan.dtype_mismatch[:3])
        more = f" (+{len(plan.dtype_mismatch) - 3} more)" if len(plan.dtype_mismatch) > 3 else ""
        console.print(
            f"  {len(plan.dtype_mismatch)} dtype mismatches, compared after exact upcasting: {shown}{more}"
        )
    from weightdiff.matching import plan_lines

    for line in plan_lines(plan):
        console.print(f"  {line}", markup=False, highlight=False)


def _overall_panel(ov: dict[str, Any], base: str, tuned: str) -> Panel:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("tensors compared", f"{ov['tensors']:,} ({ov['tensors_unchanged']:,} bit-identical)")
    t.add_row("parameters", f"{ov['numel']:,}")
    t.add_row("bf16-aware sparsity", f"{_pct(ov['sparsity_bf16'])}  ({ov['changed_bf16']:,} changed)")
    t.add_row("exact sparsity", f"{_pct(ov['sparsity_exact'])}  ({ov['changed_exact']:,} changed)")
    t.add_row("atol sparsity", f"{_pct(ov['sparsity_atol'])}  ({ov['changed_atol']:,} changed)")
    t.add_row("hidden by bf16 rounding", f"{ov['hidden_by_bf16']:,}")
    t.add_row("relative update |dW|/|W0|", _num(ov["rel_delta"]))
    if ov["nonfinite_base"] or ov["nonfinite_tuned"]:
        t.add_row("non-finite values", f"base {ov['nonfinite_base']:,}, tuned {ov['nonfinite_tuned']:,}")
    return Panel(t, title=f"[bold]{base}[/] → [bold]{tuned}[/]", expand=False)


def _module_table(mods: list[dict[str, Any]], spectral: bool) -> Table:
    t = Table(title="Per module", title_justify="left", header_style="bold")
    t.add_column("module")
    t.add_column("tensors", justify="right")
    t.add_column("params", justify="right")
    t.add_column("sparsity bf16", justify="right")
    t.add_column("sparsity exact", justify="right")
    t.add_column("rel Δ (median)", justify="right")
    if spectral:
        t.add_column("max angle U/V (median, °)", justify="right")
        t.add_column("sv drift (median)", justify="right")
        t.add_column("principal overlap / density", justify="right")
    for m in mods:
        cells = [
            m["module"],
            str(m["tensors"]),
            f"{m['numel']:,}",
            _pct(m["sparsity_bf16"]),
            _pct(m["sparsity_exact"]),
            _num(m["rel_delta_median"]),
        ]
        if spectral:
            cells += [
                f"{_num(m['angle_u_max_deg_median'], '.3f')} / {_num(m['angle_v_max_deg_median'], '.3f')}",
                _num(m["sv_drift_median"]),
                _num(m["principal_overlap_ratio_median"], ".2f"),
            ]
        t.add_row(*cells)
    return t


def _heatmap(hm: dict[str, Any]) -> Table | None:
    if not hm["layers"]:
        return None
    values = [v for line in hm["values"] for v in line if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    sparsity = hm["column"].startswith("sparsity_")
    title = f"{hm['column']} by layer x module"
    title += (
        " (█ = most changed, blank = unchanged)" if sparsity else f" (█ = highest; range {lo:.3g}..{hi:.3g})"
    )
    t = Table(title=title, title_justify="left", header_style="bold", show_edge=False, pad_edge=False)
    t.add_column("layer", justify="right", no_wrap=True)
    for m in hm["modules"]:
        # Short headers keep many modules on one screen; the per-module table above has the full names.
        t.add_column(m.split(".")[-1][:7], justify="right", no_wrap=True, overflow="crop")
    for layer, line in zip(hm["layers"], hm["values"], strict=False):
        cells = []
        for v in line:
            if v is None:
                cells.append(Text("·", style="dim"))
                continue
            # For sparsities 1.0 (nothing changed) is blank and fully changed a full block; the number stays
            # readable without colour, and the block and background carry the scale at a glance.
            frac = 1 - v if sparsity else (v - lo) / (hi - lo) if hi > lo else 0.0
            idx = min(len(_SHADES) - 1, int((1 - frac) * (len(_SHADES) - 1) + 0.5))
            shade = int(40 + 140 * max(0.0, min(1.0, frac)))
            cell = f"{_SHADES[idx]}{100 * v:.1f}" if sparsity else f"{_SHADES[idx]}{v:.3g}"
            cells.append(Text(cell, style=f"on rgb({shade},{shade // 3},{shade // 3})"))
        t.add_row(str(layer), *cells)
    return t


def _top_table(rows: Sequence[S.Row], spectral: bool) -> Table:
    t = Table(title="Most changed tensors", title_justify="left", header_style="bold")
    t.add_column("tensor")
    t.add_column("rel Δ", justify="right")
    t.add_column("changed bf16", justify="right")
    t.add_column("max |Δ|", justify="right")
    if spectral:
        t.add_column("max angle U (°)", justify="right")
    for r in rows:
        sp = r.get("sparsity_bf16")
        cells = [
            r["name"],
            _num(r.get("rel_delta")),
            _pct(None if sp is None else 1 - sp),
            _num(r.get("delta_max")),
        ]
        if spectral:
            cells.append(_num(r.get("angle_u_max_deg"), ".4f"))
        t.add_row(*cells)
    return t


def render_summary(
    rows: Sequence[S.Row],
    console: Console,
    base: str,
    tuned: str,
    heatmap_column: str = "sparsity_bf16",
    top: int = 10,
) -> None:
    """The full compare summary: overall panel, per-module table, heatmap, most-changed tensors."""
    spectral = any(r.get("rank_k") is not None for r in rows)
    parts: list[Any] = [
        _overall_panel(S.overall(rows), base, tuned),
        _module_table(S.per_module(rows), spectral),
    ]
    hm = _heatmap(S.heatmap(rows, heatmap_column))
    if hm is not None:
        parts.append(hm)
    parts.append(_top_table(S.top_changed(rows, top), spectral))
    console.print(Group(*parts))


_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """A log-scale sparkline of a descending spectrum, sampled at ``width`` evenly spaced indices."""
    import math

    vals = [v for v in values if v > 0]
    if not vals:
        return ""
    idx = [round(i * (len(vals) - 1) / max(1, width - 1)) for i in range(min(width, len(vals)))]
    logs = [math.log10(vals[i]) for i in idx]
    lo, hi = min(logs), max(logs)
    span = hi - lo or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1) + 0.5))] for v in logs)


def render_spectrum(rows: Sequence[dict[str, Any]], console: Console, title: str) -> None:
    """Per-module table of typical spectral figures with a sparkline of the module's median spectrum."""
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["module"], []).append(r)
    two = any(r.get("sv_drift") is not None for r in rows)
    t = Table(
        title=f"Spectra of {title} (medians per module; sparkline: log sigma_i, normalised)",
        title_justify="left",
        header_style="bold",
    )
    for col in ("module", "tensors", "sigma_1", "stable rank", "effective rank", "top-k energy"):
        t.add_column(col, justify="left" if col == "module" else "right")
    if two:
        t.add_column("sv drift", justify="right")
    t.add_column("spectrum")

    def med(g: list[dict[str, Any]], key: str) -> float | None:
        vals = [float(r[key]) for r in g if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    for module in sorted(groups, key=lambda m: m):
        g = groups[module]
        n = min(len(r["singular_values"]) for r in g)
        typical = (
            [
                statistics.median(
                    r["singular_values"][i] / r["singular_values"][0]
                    for r in g
                    if r["singular_values"][0] > 0
                )
                for i in range(n)
            ]
            if n
            else []
        )
        cells = [
            module,
            str(len(g)),
            _num(med(g, "spectral_norm")),
            _num(med(g, "stable_rank")),
            _num(med(g, "effective_rank")),
            _pct(med(g, "topk_energy_share"), 1),
        ]
        if two:
            cells.append(_num(med(g, "sv_drift")))
        cells.append(sparkline(typical))
        t.add_row(*cells)
    console.print(t)
