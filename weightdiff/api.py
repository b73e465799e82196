"""The Python API: ``compare(base, tuned, ...)`` runs a whole comparison and returns a ``Report``.

This is the one place that wires sources, pairing, the engine, the schema and the writers together; the CLI
calls it and adds only presentation. It raises ``weightdiff.errors`` exceptions and never prints.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from weightdiff import distributed, schema
from weightdiff.engine import EngineOptions, Timings, compare_pairs
from weightdiff.errors import NothingComparableError
from weightdiff.matching import RenameRule, parse_renames
from weightdiff.pairing import Pair, Plan
from weightdiff.realworld import add_columns, open_tuned, plan_for
from weightdiff.sources import open_source
from weightdiff.sources.base import Source
from weightdiff.summary import summary_dict
from weightdiff.writers import ParquetReportWriter, check_output_path


@dataclass
class Report:
    """The result of a comparison: the report table, the plan and the metadata written into the file."""

    table: pa.Table
    plan: Plan
    metadata: dict[str, Any]
    timings: Timings = field(default_factory=Timings)
    spectra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    def to_pandas(self) -> Any:
        return self.table.to_pandas()

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary (what ``--json`` writes)."""
        return summary_dict(self.rows, self.plan.as_dict(), self.metadata)


def _version() -> str:
    from weightdiff import __version__

    return __version__


def build_metadata(
    base: Source, tuned: Source, plan: Plan, options: EngineOptions, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "weightdiff_version": _version(),
        "base": base.describe(),
        "tuned": tuned.describe(),
        "options": {**options.as_dict(), **extra},
        "plan": plan.as_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@distributed.collective
def compare(
    base: str | Source,
    tuned: str | Source,
    *,
    output: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    renames: Sequence[str] = (),
    atol: float = 1e-5,
    device: str = "auto",
    spectral: bool = True,
    rank: int = 64,
    principal_rank: int = 64,
    alpha: float = 0.5,
    svd: str = "auto",
    spectra_output: str | None = None,
    base_revision: str | None = None,
    tuned_revision: str | None = None,
    token: str | None = None,
    download: bool = False,
    prefetch_bytes: int | None = None,
    max_memory: int | None = None,
    on_plan: Callable[[Plan, Source, Source], None] | None = None,
    on_progress: Callable[[Pair], None] | None = None,
) -> Report:
    """Compare two checkpoints tensor by tensor; write the Parquet report to ``output`` when given.

    ``base`` and ``tuned`` are local paths, Hub repo ids, or already opened ``Source`` objects. Raises
    ``NothingComparableError`` when no tensor pair can be compared, other ``WeightdiffError`` subclasses for bad
    input; on any error no file is left at ``output``. ``tuned`` may be a LoRA adapter directory (merged onto
    ``base``); ``renames`` are ``REGEX=REPLACEMENT`` rules for tuned-side names (docs/real-world-checkpoints.md).
    """
    options = EngineOptions(
        atol=atol,
        device=device,
        spectral=spectral,
        rank=rank,
        principal_rank=principal_rank,
        alpha=alpha,
        svd=svd,
        prefetch_bytes=prefetch_bytes,
        keep_spectra=spectra_output is not None,
        max_memory=max_memory,
    )
    _validate(options)
    rules = parse_renames(renames)
    # Under torchrun only rank 0 writes, so only its paths matter (distributed.py tells the others if bad).
    if output is not None and distributed.is_leader():
        check_output_path(output)
    if spectra_output is not None and distributed.is_leader():
        check_output_path(spectra_output, "--spectra")
    base_src = base if isinstance(base, Source) else open_source(base, base_revision, token, download)
    try:
        tuned_src = (
            tuned
            if isinstance(tuned, Source)
            else open_tuned(tuned, base_src, tuned_revision, token, download)
        )
    except BaseException:
        base_src.close()
        raise
    try:
        return _run(
            base_src,
            tuned_src,
            options,
            include,
            exclude,
            output,
            spectra_output,
            on_plan,
            on_progress,
            rules,
        )
    finally:
        base_src.close()
        tuned_src.close()


def _validate(options: EngineOptions) -> None:
    from weightdiff.errors import InputError

    if not options.atol >= 0:
        raise InputError(f"--atol must be a non-negative number, got {options.atol}")
    if options.rank < 1:
        raise InputError(f"--rank must be at least 1, got {options.rank}")
    if options.principal_rank < 1:
        raise InputError(f"--principal-rank must be at least 1, got {options.principal_rank}")
    if not 0 < options.alpha <= 1:
        raise InputError(f"--alpha must be in (0, 1], got {options.alpha}")
    if options.svd not in ("auto", "exact", "fast", "gram"):
        raise InputError(f"--svd must be one of auto, exact, gram, fast; got {options.svd!r}")


def _run(
    base: Source,
    tuned: Source,
    options: EngineOptions,
    include: Sequence[str],
    exclude: Sequence[str],
    output: str | None,
    spectra_output: str | None,
    on_plan: Callable[[Plan, Source, Source], None] | None,
    on_progress: Callable[[Pair], None] | None,
    rules: Sequence[RenameRule] = (),
) -> Report:
    plan = plan_for(base, tuned, include, exclude, rules)
    metadata = build_metadata(
        base,
        tuned,
        plan,
        options,
        {"include": list(include), "exclude": list(exclude), "rename": [r.text for r in rules]},
    )
    # Under torchrun (distributed.py) this rank computes its share of the pairs on its own device; rank 0 gets
    # every rank's rows back in plan order and is the only one that prints and writes.
    shard = distributed.current()
    work, work_options = plan, options
    if shard is not None:
        mine = shard.select(
            plan.pairs,
            lambda p: distributed.pair_cost(p.base.shape, p.nbytes, options.spectral),
            lambda p: p.name,
        )
        work = dataclasses.replace(plan, pairs=mine)
        work_options = dataclasses.replace(options, device=shard.device(options.device))
    if on_plan is not None and distributed.is_leader():
        on_plan(plan, base, tuned)
    if not plan.pairs:
        raise NothingComparableError(
            f"nothing to compare between {base.given} and {tuned.given}: no tensor is present in both with the "
            "same shape" + (" after --include/--exclude" if include or exclude else "")
        )
    arrow_schema = schema.arrow_schema(metadata=metadata)
    writer = (
        ParquetReportWriter(output, arrow_schema) if output is not None and distributed.is_leader() else None
    )
    rows: list[dict[str, Any]] = []
    timings = Timings()
    spectra: list[dict[str, Any]] = []
    try:
        pair_rows = compare_pairs(base, tuned, work, work_options, on_progress, timings, spectra)
        row_iter = add_columns(pair_rows, base, tuned, work)
        for row in row_iter if shard is None else shard.merged(row_iter, spectra):
            rows.append(row)
            if writer is not None:
                writer.write(row)
        if spectra_output is not None and distributed.is_leader():
            from weightdiff.metrics.spectral import spectra_table
            from weightdiff.writers import write_table

            write_table(spectra_output, spectra_table(spectra, metadata))
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    table = schema.rows_to_table(rows, arrow_schema)
    return Report(table=table, plan=plan, metadata=metadata, timings=timings, spectra=spectra)
