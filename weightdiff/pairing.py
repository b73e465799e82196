"""Pairing: from the two checkpoints' header listings to a comparison plan. A pure function of two maps.

The plan says, before any tensor data is read, which tensors will be compared (in natural layer order), which
exist on one side only, which differ in shape (listed and skipped) or dtype (compared after exact upcasting),
and which are not floating point (listed and skipped: the metrics are defined on numbers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from weightdiff.naming import natural_key
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo


@dataclass(frozen=True)
class Pair:
    """One tensor present in both checkpoints with the same shape."""

    name: str
    base: TensorInfo
    tuned: TensorInfo

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.tuned.nbytes


@dataclass
class Plan:
    """What a comparison will do, known from headers alone."""

    pairs: list[Pair] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_tuned: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtype_mismatch: list[tuple[str, str, str]] = field(default_factory=list)
    not_float: list[str] = field(default_factory=list)
    excluded: int = 0
    # Filled by weightdiff.matching for real-world checkpoint pairs (empty from make_plan alone):
    # tuned names paired under another base name ({base, tuned, by}), tied output heads, vocabulary resizes
    # compared on their shared rows, FP8 scale tensors folded into their weights, and free-text remarks.
    renamed: list[dict[str, str]] = field(default_factory=list)
    tied: list[dict[str, Any]] = field(default_factory=list)
    resized: list[dict[str, Any]] = field(default_factory=list)
    consumed_scales: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.pairs)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready description (report metadata, --json)."""
        return {
            "compared": len(self.pairs),
            "excluded_by_filters": self.excluded,
            "only_base": self.only_base,
            "only_tuned": self.only_tuned,
            "shape_mismatch": [
                {"name": n, "base": list(a), "tuned": list(b)} for n, a, b in self.shape_mismatch
            ],
            "dtype_mismatch": [{"name": n, "base": a, "tuned": b} for n, a, b in self.dtype_mismatch],
            "not_float": self.not_float,
            "renamed": self.renamed,
            "tied": self.tied,
            "resized": self.resized,
            "consumed_scales": self.consumed_scales,
            "notes": self.notes,
        }


def selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether ``name`` passes the --include / --exclude globs (include: any matches; exclude: none matches)."""
    if include and not any(fnmatchcase(name, g) for g in include):
        return False
    return not any(fnmatchcase(name, g) for g in exclude)


def sort_names(names: Iterable[str]) -> list[str]:
    """Names in natural layer order (layers.10 after layers.9), then by name."""
    return sorted(names, key=lambda n: (natural_key(n), n))


def make_plan(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Plan:
    """Pair tensors by name; see the module docstring for how each kind of mismatch is handled."""
    plan = Plan()
    names = set(base) | set(tuned)
    for name in sort_names(names):
        if not selected(name, include, exclude):
            plan.excluded += 1
            continue
        b, t = base.get(name), tuned.get(name)
        if t is None:
            plan.only_base.append(name)
        elif b is None:
            plan.only_tuned.append(name)
        elif b.shape != t.shape:
            plan.shape_mismatch.append((name, b.shape, t.shape))
        elif b.dtype not in FLOAT_DTYPES or t.dtype not in FLOAT_DTYPES:
            plan.not_float.append(name)
        else:
            if b.dtype != t.dtype:
                plan.dtype_mismatch.append((name, b.dtype, t.dtype))
            plan.pairs.append(Pair(name, b, t))
    return plan
