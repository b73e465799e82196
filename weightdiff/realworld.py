"""Wiring for real-world checkpoint pairs between the sources, the plan and the report rows.

``compare`` (api.py) calls three things from here: ``open_tuned`` (a LoRA adapter directory becomes an
``AdapterSource`` over the opened base; anything else goes through ``open_source``), ``plan_for`` (the plan of
``matching.build_plan`` from two sources: their listings, their configs' tie flags, their FP8 block scales) and
``add_columns`` (the report columns the engine does not compute: ``rows_compared``, ``rows_added`` and
``added_rows_fro`` for resized vocabularies, ``changed_stored`` for FP8 tensors).

The extra columns read a little more data after the engine has compared a pair: the rows only one side has,
and the stored fp8 codes (one byte per element) of FP8 pairs. Nothing here computes the main metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from weightdiff.matching import (
    HEAD_NAMES,
    RenameRule,
    ResizedPair,
    build_plan,
    is_embedding_name,
    is_head_name,
    tie_flag,
)
from weightdiff.pairing import Pair, Plan, selected
from weightdiff.sources import open_source
from weightdiff.sources.adapter import AdapterSource, is_adapter_dir
from weightdiff.sources.base import Source
from weightdiff.sources.quant import FP8_DTYPES, Fp8Source, read_stored
from weightdiff.sources.rows import row_slice

if TYPE_CHECKING:
    import torch

#: Elements per chunk when counting or summing on the host: bounds the temporaries, not the result.
_CHUNK = 1 << 24


def open_tuned(spec: str, base: Source, revision: str | None, token: str | None, download: bool) -> Source:
    """The tuned checkpoint: a LoRA adapter directory merged onto ``base``, else whatever ``spec`` names."""
    if is_adapter_dir(spec):
        return AdapterSource(base, spec, given=spec)
    return open_source(spec, revision, token, download)


def plan_for(
    base: Source,
    tuned: Source,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rules: Sequence[RenameRule] = (),
) -> Plan:
    """The comparison plan of two opened sources (see ``matching.build_plan``)."""

    def scaled(src: Source) -> set[str]:
        return set(src.scales) if isinstance(src, Fp8Source) else set()

    def consumed(src: Source) -> list[str]:
        return src.consumed_scales if isinstance(src, Fp8Source) else []

    # The configs' tie flags only decide how an output head and the token embedding pair up; when the filters
    # leave both out they cannot change a row, and a Hub source is spared one request per side.
    ties = _ties_matter(base, tuned, include, exclude)
    plan = build_plan(
        base.tensors(),
        tuned.tensors(),
        include=include,
        exclude=exclude,
        rules=rules,
        base_tied=tie_flag(base.config()) if ties else None,
        tuned_tied=tie_flag(tuned.config()) if ties else None,
        base_scaled=scaled(base),
        tuned_scaled=scaled(tuned),
        consumed_scales=[*consumed(base), *consumed(tuned)],
    )
    if isinstance(tuned, AdapterSource):
        d = tuned.describe()
        plan.notes.insert(
            0,
            f"LoRA adapter {tuned.given} merged onto {base.given}: {d['modules_merged']} modules "
            f"(r={d['r']}, lora_alpha={d['lora_alpha']}{', rsLoRA' if d['use_rslora'] else ''}), "
            f"{len(d['tensors_replaced'])} tensors replaced whole",
        )
    return plan


def _ties_matter(base: Source, tuned: Source, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether the filters select an output head or a token embedding (under its own name or, for a head, any
    spelling of lm_head), so that tied embeddings can matter; always true without filters."""
    if not include and not exclude:
        return True
    for src in (base, tuned):
        for name in src.tensors():
            if is_head_name(name) and any(selected(n, include, exclude) for n in (name, *HEAD_NAMES)):
                return True
            if is_embedding_name(name) and selected(name, include, exclude):
                return True
    return False


def _sum_squares_finite(t: torch.Tensor) -> float:
    import torch

    flat = t.reshape(-1)
    total = 0.0
    for s in range(0, flat.numel(), _CHUNK):
        x = flat[s : s + _CHUNK].to(torch.float64)
        x = torch.where(torch.isfinite(x), x, 0.0)
        total += float(torch.dot(x, x))
    return total


def _count_bits_changed(x: torch.Tensor, y: torch.Tensor) -> int:
    import torch

    a, b = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
    return sum(int((a[s : s + _CHUNK] != b[s : s + _CHUNK]).sum()) for s in range(0, a.numel(), _CHUNK))


def extra_columns(pair: Pair, base: Source, tuned: Source) -> dict[str, Any]:
    """``rows_compared``, ``rows_added``, ``added_rows_fro`` and ``changed_stored`` of one pair (null when n/a)."""
    out: dict[str, Any] = dict.fromkeys(("rows_compared", "rows_added", "added_rows_fro", "changed_stored"))
    if isinstance(pair, ResizedPair):
        rows = pair.base.shape[0]
        added = pair.tuned_full.shape[0] - pair.base_full.shape[0]
        src, full = (tuned, pair.tuned_full) if added > 0 else (base, pair.base_full)
        extra = row_slice(full, rows, full.shape[0])
        out.update(
            rows_compared=rows,
            rows_added=added,
            added_rows_fro=math.sqrt(_sum_squares_finite(src.read(extra))),
        )
        src.release(extra)
    if pair.base.dtype == pair.tuned.dtype and pair.base.dtype in FP8_DTYPES:
        x, y = read_stored(base, pair.base), read_stored(tuned, pair.tuned)
        out["changed_stored"] = _count_bits_changed(x, y)
        del x, y
        base.release(pair.base)
        tuned.release(pair.tuned)
    return out


def add_columns(
    rows: Iterator[dict[str, Any]], base: Source, tuned: Source, plan: Plan
) -> Iterator[dict[str, Any]]:
    """The engine's rows with the extra columns of ``extra_columns`` added, in the same order."""
    by_name = {p.name: p for p in plan.pairs}
    for row in rows:
        row.update(extra_columns(by_name[row["name"]], base, tuned))
        yield row
