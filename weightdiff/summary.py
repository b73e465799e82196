"""Aggregates of a compare report: overall figures, per-module table, layer x module grid, top tensors.

Pure functions of report rows (dicts keyed by schema column names); the terminal summary, the JSON summary and
the CI gate all read these numbers, so they agree by construction. Parameter-weighted sparsity is computed from
the exact integer counts (1 - sum(changed) / sum(numel)), never by averaging per-tensor ratios.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from weightdiff.naming import natural_key

Row = dict[str, Any]


def weighted_sparsity(rows: Iterable[Row], count_column: str) -> float | None:
    rows = list(rows)
    n = sum(int(r["numel"]) for r in rows)
    if n == 0:
        return None
    return 1 - sum(int(r[count_column]) for r in rows) / n


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def _overlap_ratio(row: Row, overlap: str, density: str) -> float | None:
    o, d = row.get(overlap), row.get(density)
    if o is None or d is None or d == 0:
        return None
    return float(o) / float(d)


def overall(rows: Sequence[Row]) -> dict[str, Any]:
    numel = sum(int(r["numel"]) for r in rows)
    delta2 = sum(float(r["delta_fro"]) ** 2 for r in rows)
    base2 = sum(float(r["base_fro"]) ** 2 for r in rows)
    return {
        "tensors": len(rows),
        "numel": numel,
        "changed_exact": sum(int(r["changed_exact"]) for r in rows),
        "changed_bf16": sum(int(r["changed_bf16"]) for r in rows),
        "changed_atol": sum(int(r["changed_atol"]) for r in rows),
        "hidden_by_bf16": sum(int(r["hidden_by_bf16"]) for r in rows),
        "sparsity_exact": weighted_sparsity(rows, "changed_exact"),
        "sparsity_bf16": weighted_sparsity(rows, "changed_bf16"),
        "sparsity_atol": weighted_sparsity(rows, "changed_atol"),
        "rel_delta": math.sqrt(delta2) / math.sqrt(base2) if base2 > 0 else None,
        "tensors_unchanged": sum(1 for r in rows if int(r["changed_exact"]) == 0),
        "nonfinite_base": sum(int(r["nonfinite_base"]) for r in rows),
        "nonfinite_tuned": sum(int(r["nonfinite_tuned"]) for r in rows),
    }


def per_module(rows: Sequence[Row]) -> list[dict[str, Any]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r["module"], []).append(r)
    out = []
    for module in sorted(groups, key=natural_key):
        g = groups[module]
        out.append(
            {
                "module": module,
                "tensors": len(g),
                "numel": sum(int(r["numel"]) for r in g),
                "sparsity_exact": weighted_sparsity(g, "changed_exact"),
                "sparsity_bf16": weighted_sparsity(g, "changed_bf16"),
                "hidden_by_bf16": sum(int(r["hidden_by_bf16"]) for r in g),
                "rel_delta_median": _median(r.get("rel_delta") for r in g),
                "angle_u_max_deg_median": _median(r.get("angle_u_max_deg") for r in g),
                "angle_v_max_deg_median": _median(r.get("angle_v_max_deg") for r in g),
                "sv_drift_median": _median(
                    r.get("sv_drift") if r.get("sv_drift") is not None else r.get("sv_drift_topk") for r in g
                ),
                "principal_overlap_ratio_median": _median(
                    _overlap_ratio(r, "principal_overlap", "principal_mask_density") for r in g
                ),
            }
        )
    return out


def heatmap(rows: Sequence[Row], column: str = "sparsity_bf16") -> dict[str, Any]:
    """Layer x module grid of ``column`` (parameter-weighted for sparsities, median otherwise)."""
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    modules = sorted({r["module"] for r in rows if r.get("layer") is not None}, key=natural_key)
    cells: dict[tuple[int, str], list[Row]] = {}
    for r in rows:
        if r.get("layer") is not None:
            cells.setdefault((r["layer"], r["module"]), []).append(r)
    grid: list[list[float | None]] = []
    for layer in layers:
        line: list[float | None] = []
        for module in modules:
            g = cells.get((layer, module), [])
            if not g:
                line.append(None)
            elif column.startswith("sparsity_"):
                line.append(weighted_sparsity(g, column.replace("sparsity_", "changed_")))
            elif column.endswith("_overlap_ratio"):
                kind = column.removesuffix("_overlap_ratio")
                line.append(_median(_overlap_ratio(r, f"{kind}_overlap", f"{kind}_mask_density") for r in g))
            else:
                line.append(_median(r.get(column) for r in g))
        grid.append(line)
    return {"column": column, "layers": layers, "modules": modules, "values": grid}


def top_changed(rows: Sequence[Row], n: int = 10) -> list[Row]:
    """The tensors whose relative change is largest (ties broken by changed fraction, then name)."""

    def key(r: Row) -> tuple[float, float, str]:
        rel = r.get("rel_delta")
        sparsity = r.get("sparsity_bf16")
        frac = 1.0 - (sparsity if sparsity is not None else 1.0)
        return (-(rel if rel is not None else math.inf if r["delta_fro"] > 0 else 0.0), -frac, r["name"])

    return sorted(rows, key=key)[:n]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def summary_dict(rows: Sequence[Row], plan: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable summary written by --json."""
    return _clean(
        {
            "schema_version": metadata.get("schema_version"),
            "weightdiff_version": metadata.get("weightdiff_version"),
            "base": metadata.get("base"),
            "tuned": metadata.get("tuned"),
            "options": metadata.get("options"),
            "plan": plan,
            "overall": overall(rows),
            "modules": per_module(rows),
            "top_changed": [
                {k: r.get(k) for k in ("name", "rel_delta", "sparsity_bf16", "delta_max", "angle_u_max_deg")}
                for r in top_changed(rows)
            ],
        }
    )
