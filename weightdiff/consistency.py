"""Cross-run consistency (metrics.md section 3): do several fine-tunes of one base update the same weights?

For every tensor present with one shape in the base and in all R runs, each run's bf16 update mask M_r
(``round_to_bf16(base) != round_to_bf16(run)``, compared as numbers, NaN counting as changed) is compared with
every other run's: pairwise Jaccard against the independent-Bernoulli baseline, MUK's one-sided overlap against
its baseline, the consensus map C = (1/R) sum_r M_r and the share of elements every run changed. ``--stripes``
adds the row and column means of C (PNT's stripes) as a long table.

Layers of this module, from pure to wired:

- ``mask_agreement`` / ``mask_counts`` / ``agreement_from_counts``: pure functions of bool masks and integer
  counts. Every count is an exact integer; every ratio is one int / int division (correctly rounded float64)
  or a ``math.fsum`` mean of such ratios.
- ``make_consistency_plan``: pure function of header listings (which tensors are compared, which are missing
  from some checkpoint, differ in shape or are not floating point).
- ``iter_consistency_rows``: streams one tensor name at a time through all R + 1 checkpoints, reading ahead on
  a background thread bounded by bytes, like ``weightdiff.engine``. Masks are built chunk by chunk and only
  their counts are kept, so beyond the R + 1 tensors being read, memory holds a few chunk-sized bool masks.
- ``consistency``: the Python API (opens sources, checks output paths first, writes Parquet atomically).
- ``summary_dict`` / ``render_plan`` / ``render_summary``: aggregates and rich rendering for the CLI.

This module does not compute the compare report's metrics, decide exit codes (``weightdiff.errors`` carries
them, ``weightdiff.cli`` maps them) or parse command lines.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from weightdiff import distributed, schema
from weightdiff.engine import Reader, ReadJob
from weightdiff.errors import InputError, NothingComparableError, OutputError, WeightdiffError
from weightdiff.metrics.elementwise import round_to_bf16
from weightdiff.naming import expert_of, layer_of, module_of, natural_key
from weightdiff.pairing import selected, sort_names
from weightdiff.sources.base import Source
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo

Row = dict[str, Any]

# Elements per chunk when building masks. On the CPU a chunk's R masks (1 byte per element each) plus the bf16
# temporaries stay within a few tens of MiB and mostly in cache; on a GPU bigger chunks just mean fewer launches.
_CPU_CHUNK = 1 << 20
_GPU_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------------------------------
# Pure metrics on masks
# --------------------------------------------------------------------------------------------------------------


def run_pairs(runs: int) -> list[tuple[int, int]]:
    """The unordered pairs (r, s), r < s, in the order ``mask_counts`` reports their intersections."""
    return [(r, s) for r in range(runs) for s in range(r + 1, runs)]


def mask_counts(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact counts of R same-shape bool masks, as one int64 tensor on the masks' device.

    Layout: ``[|M_1|, ..., |M_R|, |M_r & M_s| for (r, s) in run_pairs(R), |M_1 & ... & M_R|]``. Kept on the
    device so that a caller summing chunks syncs with the host once per tensor, not once per count.
    """
    flat = [m.reshape(-1) for m in masks]
    # count_nonzero, not sum(): summing bools goes through an int64 conversion and is several times slower.
    counts = [torch.count_nonzero(m) for m in flat]
    scratch = torch.empty_like(flat[0])
    for r, s in run_pairs(len(flat)):
        counts.append(torch.count_nonzero(torch.logical_and(flat[r], flat[s], out=scratch)))
    scratch.copy_(flat[0])
    for m in flat[1:]:
        scratch.logical_and_(m)
    counts.append(torch.count_nonzero(scratch))
    return torch.stack(counts)


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def agreement_from_counts(numel: int, counts: Sequence[int]) -> dict[str, Any]:
    """Section 3's per-tensor columns from the exact counts laid out as ``mask_counts`` returns them.

    Pairs whose union is empty (neither run changed anything) have no Jaccard index and are left out of both
    ``jaccard_mean`` and ``jaccard_random``; ordered pairs (r, s) with empty M_r are left out of the overlap
    means. A mean over no pairs is None.
    """
    n = int(numel)
    total = len(counts)
    # R + R(R-1)/2 + 1 counts: solve for R.
    runs = round((-1 + math.sqrt(1 + 8 * (total - 1))) / 2)
    if runs < 1 or runs + runs * (runs - 1) // 2 + 1 != total:
        raise ValueError(f"{total} counts do not match the layout of mask_counts for any number of runs")
    changed = [int(c) for c in counts[:runs]]
    inter = {pair: int(c) for pair, c in zip(run_pairs(runs), counts[runs:-1], strict=True)}
    unanimous = int(counts[-1])

    jaccard: list[float] = []
    baseline: list[float] = []
    for (r, s), both in inter.items():
        a, b = changed[r], changed[s]
        union = a + b - both
        if union == 0:
            continue
        jaccard.append(both / union)
        # p q / (p + q - p q) with p = a/N, q = b/N, multiplied through by N^2: one exact integer ratio instead
        # of a float expression that cancels badly for tiny densities. Positive because the union is not empty.
        baseline.append(a * b / (n * (a + b) - a * b))
    overlap: list[float] = []
    overlap_base: list[float] = []
    for r in range(runs):
        if changed[r] == 0:
            continue
        for s in range(runs):
            if s != r:
                overlap.append(inter[(min(r, s), max(r, s))] / changed[r])
                overlap_base.append(changed[s] / n)
    j_mean, j_random = _mean(jaccard), _mean(baseline)
    return {
        "numel": n,
        "runs": runs,
        "changed": changed,
        "density": [c / n if n else None for c in changed],
        "jaccard_mean": j_mean,
        "jaccard_random": j_random,
        "jaccard_ratio": j_mean / j_random if j_mean is not None and j_random else None,
        "overlap_mean": _mean(overlap),
        "overlap_random": _mean(overlap_base),
        "consensus_mean": sum(changed) / (runs * n) if n else None,
        "unanimous": unanimous,
        "unanimous_fraction": unanimous / n if n else None,
    }


def mask_agreement(masks: list[torch.Tensor]) -> dict[str, Any]:
    """Section 3's metrics of R >= 2 same-shape bool masks (one per run): see ``agreement_from_counts``.

    Returns numel, runs, changed, density, jaccard_mean, jaccard_random, jaccard_ratio, overlap_mean,
    overlap_random, consensus_mean, unanimous and unanimous_fraction. Pure: no I/O; any device.
    """
    if len(masks) < 2:
        raise ValueError(f"mask_agreement needs at least two masks, got {len(masks)}")
    shape = masks[0].shape
    for m in masks:
        if m.dtype != torch.bool:
            raise ValueError(f"masks must be bool tensors, got {m.dtype}")
        if m.shape != shape:
            raise ValueError(f"masks differ in shape: {list(shape)} vs {list(m.shape)}")
    numel = masks[0].numel()
    if numel == 0:
        counts = [0] * (len(masks) + len(run_pairs(len(masks))) + 1)
    else:
        counts = mask_counts(masks).tolist()
    return agreement_from_counts(numel, counts)


def update_masks(base: torch.Tensor, runs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each run's bf16 update mask against ``base`` (same shape, any float dtypes, same device).

    Rounding each side straight to bf16 gives the same mask as compare's exact upcast to a common dtype first:
    every upcast is exact, and ``round_to_bf16`` rounds once from the exact value.
    """
    b16 = round_to_bf16(base)
    return [torch.ne(b16, round_to_bf16(run)) for run in runs]


# --------------------------------------------------------------------------------------------------------------
# Planning (pure, headers only)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTensors:
    """One tensor name present with the base's shape in every run."""

    name: str
    base: TensorInfo
    runs: tuple[TensorInfo, ...]

    @property
    def infos(self) -> tuple[TensorInfo, ...]:
        return (self.base, *self.runs)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)


def run_label(index: int) -> str:
    """``run1``, ``run2``, ...: how the plan names the runs, in command-line order."""
    return f"run{index + 1}"


@dataclass
class ConsistencyPlan:
    """What a consistency run will do, known from headers alone."""

    runs: int
    items: list[RunTensors] = field(default_factory=list)
    #: (name, the checkpoints lacking it: "base" and/or run labels)
    missing: list[tuple[str, list[str]]] = field(default_factory=list)
    #: (name, {checkpoint label: shape} for the base and every run holding the tensor)
    shape_mismatch: list[tuple[str, dict[str, tuple[int, ...]]]] = field(default_factory=list)
    #: (name, {checkpoint label: dtype}) for compared tensors whose dtypes differ (compared after rounding)
    dtype_mismatch: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    not_float: list[str] = field(default_factory=list)
    excluded: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (Parquet metadata, --json)."""
        return {
            "compared": len(self.items),
            "runs": self.runs,
            "excluded_by_filters": self.excluded,
            "missing": [{"name": n, "missing_from": w} for n, w in self.missing],
            "shape_mismatch": [
                {"name": n, "shapes": {k: list(v) for k, v in s.items()}} for n, s in self.shape_mismatch
            ],
            "dtype_mismatch": [{"name": n, "dtypes": d} for n, d in self.dtype_mismatch],
            "not_float": self.not_float,
        }


def make_consistency_plan(
    base: Mapping[str, TensorInfo],
    runs: Sequence[Mapping[str, TensorInfo]],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> ConsistencyPlan:
    """Match tensors by name across the base and every run, in natural layer order.

    A tensor is compared only when the base and every run hold it with one shape and a floating dtype; every
    other name (after --include/--exclude) is listed in the plan and skipped.
    """
    plan = ConsistencyPlan(runs=len(runs))
    labels = [run_label(i) for i in range(len(runs))]
    names: set[str] = set(base)
    for listing in runs:
        names.update(listing)
    for name in sort_names(names):
        if not selected(name, include, exclude):
            plan.excluded += 1
            continue
        held = {"base": base.get(name), **{lab: r.get(name) for lab, r in zip(labels, runs, strict=True)}}
        lacking = [lab for lab, info in held.items() if info is None]
        if lacking:
            plan.missing.append((name, lacking))
            continue
        infos = [info for info in held.values() if info is not None]
        if len({i.shape for i in infos}) > 1:
            plan.shape_mismatch.append((name, {lab: i.shape for lab, i in held.items() if i is not None}))
        elif any(i.dtype not in FLOAT_DTYPES for i in infos):
            plan.not_float.append(name)
        else:
            if len({i.dtype for i in infos}) > 1:
                plan.dtype_mismatch.append((name, {lab: i.dtype for lab, i in held.items() if i is not None}))
            plan.items.append(RunTensors(name, infos[0], tuple(infos[1:])))
    return plan


# --------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TensorAgreement:
    """One tensor's counts (``mask_counts`` layout) and, when asked for, its stripe counts.

    ``row_counts[i]`` = sum over runs of the changed elements in row i (for 1-D tensors: runs that changed
    element i); ``col_counts[j]`` likewise per column (2-D tensors only).
    """

    counts: list[int]
    row_counts: torch.Tensor | None = None
    col_counts: torch.Tensor | None = None


def tensor_agreement(
    base: torch.Tensor, runs: Sequence[torch.Tensor], stripes: bool = False, chunk: int = _CPU_CHUNK
) -> TensorAgreement:
    """Counts of one tensor across R runs, built chunk by chunk so that no full-size mask is ever held.

    With ``stripes`` a 2-D tensor is cut at whole rows so that each chunk's consensus counts can be reduced
    along both axes; 1-D tensors keep their per-element consensus counts; other shapes get no stripes.
    """
    n = base.numel()
    width = len(runs) + len(run_pairs(len(runs))) + 1
    total = torch.zeros(width, dtype=torch.int64, device=base.device)
    flat_base = base.reshape(-1)
    flat_runs = [r.reshape(-1) for r in runs]
    two_d = stripes and base.dim() == 2
    one_d = stripes and base.dim() == 1
    cols = base.shape[1] if two_d else 1
    step = max(1, chunk // cols) * cols if two_d else chunk
    row_parts: list[torch.Tensor] = []
    col_counts = torch.zeros(cols, dtype=torch.int64, device=base.device) if two_d else None
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        masks = update_masks(flat_base[lo:hi], [r[lo:hi] for r in flat_runs])
        total += mask_counts(masks)
        if two_d or one_d:
            # Consensus counts per element (how many runs changed it); int32 never overflows for any sane R.
            cnt = masks[0].to(torch.int32)
            for m in masks[1:]:
                cnt.add_(m)
            if two_d:
                block = cnt.view(-1, cols)
                row_parts.append(block.sum(1, dtype=torch.int64))
                assert col_counts is not None
                col_counts += block.sum(0, dtype=torch.int64)
            else:
                row_parts.append(cnt.to(torch.int64))
    result = TensorAgreement(counts=[int(c) for c in total.tolist()])
    if two_d or one_d:
        rows = torch.cat(row_parts) if row_parts else torch.zeros(0, dtype=torch.int64)
        result.row_counts = rows.cpu()
        result.col_counts = col_counts.cpu() if col_counts is not None else None
    return result


def stripes_table(name: str, shape: Sequence[int], runs: int, agreement: TensorAgreement) -> pa.Table:
    """The long-format stripes rows of one tensor: fraction = stripe count / (R * elements in the stripe).

    Empty tensors and tensors that are neither 1-D nor 2-D give no rows.
    """
    parts: list[tuple[str, torch.Tensor, int]] = []
    if math.prod(shape) > 0:
        if agreement.row_counts is not None:
            parts.append(("row", agreement.row_counts, shape[1] if len(shape) == 2 else 1))
        if agreement.col_counts is not None:
            parts.append(("col", agreement.col_counts, shape[0]))
    axes = [np.full(c.numel(), axis, dtype=object) for axis, c, _ in parts]
    indices = [np.arange(c.numel(), dtype=np.int64) for _, c, _ in parts]
    # Integer counts below 2^53 convert to float64 exactly, so each fraction is one correctly rounded division.
    fractions = [c.numpy().astype(np.float64) / float(runs * per) for _, c, per in parts]
    k = sum(len(a) for a in axes)
    data = {
        "name": pa.array([name] * k, pa.string()),
        "axis": pa.array(np.concatenate(axes) if parts else [], pa.string()),
        "index": pa.array(np.concatenate(indices) if parts else [], pa.int64()),
        "fraction": pa.array(np.concatenate(fractions) if parts else [], pa.float64()),
    }
    return pa.table(data, schema=_stripes_schema())


def _stripes_schema(metadata: dict[str, Any] | None = None) -> pa.Schema:
    return schema.arrow_schema(schema.STRIPES_COLUMNS, metadata=metadata)


def identity(item: RunTensors) -> Row:
    return {
        "name": item.name,
        "layer": layer_of(item.name),
        "expert": expert_of(item.name),
        "module": module_of(item.name),
        "shape": list(item.base.shape),
    }


def iter_consistency_rows(
    base: Source,
    runs: Sequence[Source],
    plan: ConsistencyPlan,
    device: torch.device,
    prefetch_bytes: int = 1 << 30,
    on_stripes: Callable[[RunTensors, TensorAgreement], None] | None = None,
    on_progress: Callable[[RunTensors], None] | None = None,
) -> Iterator[Row]:
    """Yield one row (CONSISTENCY_COLUMNS) per planned tensor, in plan order."""
    sources = [base, *runs]
    jobs = [ReadJob(item, tuple(zip(sources, item.infos, strict=True))) for item in plan.items]
    reader = Reader(jobs, prefetch_bytes)
    chunk = _GPU_CHUNK if device.type == "cuda" else _CPU_CHUNK
    try:
        for job, tensors in reader:
            item = job.key
            try:
                if device.type != "cpu":
                    tensors = [t.to(device, non_blocking=True) for t in tensors]
                agreement = tensor_agreement(
                    tensors[0], tensors[1:], stripes=on_stripes is not None, chunk=chunk
                )
            except WeightdiffError:
                raise
            except RuntimeError as exc:
                raise WeightdiffError(f"{item.name}: computing masks failed on {device} ({exc})") from exc
            del tensors
            reader.done(job)
            row = identity(item)
            row.update(agreement_from_counts(item.base.numel, agreement.counts))
            if on_stripes is not None:
                on_stripes(item, agreement)
            if on_progress is not None:
                on_progress(item)
            yield row
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ConsistencyReport:
    """The result of ``consistency``: the per-tensor table, the plan and the metadata written into the file."""

    table: pa.Table
    plan: ConsistencyPlan
    metadata: dict[str, Any]
    seconds: float = 0.0

    @property
    def rows(self) -> list[Row]:
        return self.table.to_pylist()

    def to_pandas(self) -> Any:
        return self.table.to_pandas()

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary (what ``--json`` writes)."""
        return summary_dict(self.rows, self.metadata)


def _version() -> str:
    from weightdiff import __version__

    return __version__


@distributed.collective
def consistency(
    base: str | Source,
    runs: Sequence[str | Source],
    *,
    output: str | None = None,
    stripes_output: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    token: str | None = None,
    prefetch_bytes: int = 1 << 30,
    on_plan: Callable[[ConsistencyPlan, Source, list[Source]], None] | None = None,
    on_progress: Callable[[RunTensors], None] | None = None,
) -> ConsistencyReport:
    """Compare the bf16 update masks of several fine-tunes (``runs``, at least two) of one ``base``.

    ``base`` and each run are local paths, Hub repo ids or opened ``Source`` objects. Writes the per-tensor
    table to ``output`` and the consensus stripes to ``stripes_output`` when given; both paths are checked
    before any checkpoint is opened and neither file is left behind on error. Raises ``InputError`` for fewer
    than two runs, ``NothingComparableError`` when no tensor is held by all checkpoints with one shape.
    """
    from weightdiff.engine import resolve_device
    from weightdiff.sources import open_source
    from weightdiff.writers import check_output_path

    if len(runs) < 2:
        raise InputError(f"consistency needs at least two runs besides the base, got {len(runs)}")
    # Under torchrun only rank 0 writes, so only its paths matter (distributed.py tells the others if bad).
    if output is not None and distributed.is_leader():
        check_output_path(output)
    if stripes_output is not None:
        if distributed.is_leader():
            check_output_path(stripes_output, "--stripes")
        if output is not None and _same_path(output, stripes_output):
            raise OutputError(f"{stripes_output}: --stripes and --output name the same file")
    if prefetch_bytes < 0:
        raise InputError(f"prefetch_bytes must be non-negative, got {prefetch_bytes}")
    dev, _why = resolve_device(device)
    opened: list[Source] = []
    try:
        for spec in (base, *runs):
            opened.append(spec if isinstance(spec, Source) else open_source(spec, token=token))
        return _run(
            opened[0],
            opened[1:],
            dev,
            include,
            exclude,
            output,
            stripes_output,
            prefetch_bytes,
            on_plan,
            on_progress,
        )
    finally:
        for src in opened:
            src.close()


def _same_path(a: str, b: str) -> bool:
    from pathlib import Path

    return Path(a).resolve() == Path(b).resolve()


def _run(
    base: Source,
    runs: list[Source],
    device: torch.device,
    include: Sequence[str],
    exclude: Sequence[str],
    output: str | None,
    stripes_output: str | None,
    prefetch_bytes: int,
    on_plan: Callable[[ConsistencyPlan, Source, list[Source]], None] | None,
    on_progress: Callable[[RunTensors], None] | None,
) -> ConsistencyReport:
    started = time.perf_counter()
    plan = make_consistency_plan(base.tensors(), [r.tensors() for r in runs], include, exclude)
    metadata = {
        "schema_version": schema.SCHEMA_VERSION,
        "weightdiff_version": _version(),
        "report": "consistency",
        "base": base.describe(),
        "runs": [r.describe() for r in runs],
        "options": {
            "device": str(device),
            "include": list(include),
            "exclude": list(exclude),
            "stripes": stripes_output is not None,
        },
        "plan": plan.as_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Under torchrun this rank computes its share of the tensors (balanced by bytes) on its own device; rank 0
    # gets every rank's rows and stripes back in plan order and is the only one that prints and writes.
    shard = distributed.current()
    work = plan
    if shard is not None:
        work = ConsistencyPlan(
            runs=plan.runs, items=shard.select(plan.items, lambda i: i.nbytes, lambda i: i.name)
        )
        device = torch.device(shard.device(str(device)))
    if on_plan is not None and distributed.is_leader():
        on_plan(plan, base, runs)
    if not plan.items:
        raise NothingComparableError(
            f"nothing to compare across {base.given} and {len(runs)} runs: no floating-point tensor is present "
            "in all of them with one shape" + (" after --include/--exclude" if include or exclude else "")
        )
    arrow_schema = schema.arrow_schema(schema.CONSISTENCY_COLUMNS, metadata=metadata)
    from weightdiff.writers import ParquetReportWriter

    writer = (
        ParquetReportWriter(output, arrow_schema) if output is not None and distributed.is_leader() else None
    )
    stripes: ParquetReportWriter | None = None
    kept = distributed.Buffer()  # torchrun: this rank's stripes tables, kept until they are gathered
    rows: list[Row] = []
    try:
        on_stripes = None
        if stripes_output is not None:
            if distributed.is_leader():
                stripes = ParquetReportWriter(stripes_output, _stripes_schema(metadata), option="--stripes")
            sw: Any = stripes if shard is None else kept

            def on_stripes(item: RunTensors, agreement: TensorAgreement) -> None:
                sw.write_table(stripes_table(item.name, item.base.shape, len(runs), agreement))

        row_iter = iter_consistency_rows(base, runs, work, device, prefetch_bytes, on_stripes, on_progress)
        for row in row_iter if shard is None else shard.merged(row_iter, kept):
            rows.append(row)
            if writer is not None:
                writer.write(row)
        if stripes is not None:  # torchrun: every rank's stripes, in plan order (empty in a single process)
            for table in kept:
                stripes.write_table(table)
        # Commit the stripes first: if the main report fails to commit, no stripes file should claim a run.
        if stripes is not None:
            stripes.commit()
            stripes = None
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        if stripes is not None:
            stripes.abort()
        raise
    table = schema.rows_to_table(rows, arrow_schema)
    return ConsistencyReport(table=table, plan=plan, metadata=metadata, seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------------------
# Aggregates and terminal rendering
# --------------------------------------------------------------------------------------------------------------


def _weighted(rows: Sequence[Row]) -> dict[str, Any]:
    """numel-weighted means of the per-tensor Jaccard and overlap columns over the tensors that have them.

    The baseline is weighted over exactly the tensors its mean is, so the ratio compares like with like.
    """
    jac = [r for r in rows if r.get("jaccard_mean") is not None]
    ovl = [r for r in rows if r.get("overlap_mean") is not None]

    def wmean(group: list[Row], column: str) -> float | None:
        n = sum(int(r["numel"]) for r in group)
        return math.fsum(int(r["numel"]) * float(r[column]) for r in group) / n if n else None

    j_mean, j_random = wmean(jac, "jaccard_mean"), wmean(jac, "jaccard_random")
    numel = sum(int(r["numel"]) for r in rows)
    return {
        "tensors": len(rows),
        "numel": numel,
        "jaccard_mean": j_mean,
        "jaccard_random": j_random,
        "jaccard_ratio": j_mean / j_random if j_mean is not None and j_random else None,
        "overlap_mean": wmean(ovl, "overlap_mean"),
        "overlap_random": wmean(ovl, "overlap_random"),
        "unanimous_fraction": sum(int(r["unanimous"]) for r in rows) / numel if numel else None,
    }


def overall(rows: Sequence[Row]) -> dict[str, Any]:
    """Whole-model figures: per-run density from the exact counts, then the numel-weighted agreement."""
    numel = sum(int(r["numel"]) for r in rows)
    runs = int(rows[0]["runs"]) if rows else 0
    changed = [sum(int(r["changed"][i]) for r in rows) for i in range(runs)]
    return {
        "runs": runs,
        "changed": changed,
        "density": [c / numel if numel else None for c in changed],
        **_weighted(rows),
    }


def per_module(rows: Sequence[Row]) -> list[dict[str, Any]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r["module"], []).append(r)
    return [{"module": m, **_weighted(groups[m])} for m in sorted(groups, key=natural_key)]


def per_layer(rows: Sequence[Row]) -> list[dict[str, Any]]:
    groups: dict[int, list[Row]] = {}
    for r in rows:
        if r.get("layer") is not None:
            groups.setdefault(int(r["layer"]), []).append(r)
    return [{"layer": layer, **_weighted(groups[layer])} for layer in sorted(groups)]


def layer_extremes(rows: Sequence[Row], n: int = 3) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``n`` layers with the highest and the lowest jaccard_ratio (layers without a ratio left out)."""
    ranked = sorted(
        (lay for lay in per_layer(rows) if lay["jaccard_ratio"] is not None),
        key=lambda lay: (-lay["jaccard_ratio"], lay["layer"]),
    )
    # With few layers the two lists would repeat each other; split the ranking between them instead.
    k = min(n, len(ranked) // 2)
    if k == 0:
        return ranked[:1], []
    return ranked[:k], ranked[::-1][:k]


def summary_dict(rows: Sequence[Row], metadata: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable summary written by --json (aggregates are numel-weighted means over tensors)."""
    from weightdiff.summary import _clean

    highest, lowest = layer_extremes(rows)
    return _clean(
        {
            "schema_version": metadata.get("schema_version"),
            "weightdiff_version": metadata.get("weightdiff_version"),
            "report": "consistency",
            "base": metadata.get("base"),
            "runs": metadata.get("runs"),
            "options": metadata.get("options"),
            "plan": metadata.get("plan"),
            "aggregation": "numel-weighted mean over tensors",
            "overall": overall(rows),
            "modules": per_module(rows),
            "layers": per_layer(rows),
            "highest_agreement_layers": [lay["layer"] for lay in highest],
            "lowest_agreement_layers": [lay["layer"] for lay in lowest],
        }
    )


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def render_plan(plan: ConsistencyPlan, console: Any, base: str, runs: Sequence[str]) -> None:
    """The plan on the terminal: counts, the run labels, then every kind of skipped tensor (a few of each)."""
    console.print(
        f"[bold]Plan[/]: {len(plan.items)} tensors ({plan.total_bytes / 1e9:.2f} GB) across {base} and "
        f"{len(runs)} runs" + (f"; {plan.excluded} excluded by filters" if plan.excluded else "")
    )
    console.print(
        "  " + ", ".join(f"{run_label(i)} = {given}" for i, given in enumerate(runs)), soft_wrap=True
    )

    def listing(label: str, entries: list[str], shown: int = 5) -> None:
        if entries:
            more = f" (+{len(entries) - shown} more)" if len(entries) > shown else ""
            console.print(f"  {len(entries)} {label}: {', '.join(entries[:shown])}{more}", soft_wrap=True)

    listing(
        "missing from some checkpoint, skipped",
        [f"{n} (missing from {', '.join(w)})" for n, w in plan.missing],
    )
    listing(
        "shape mismatches, skipped",
        [f"{n} " + " vs ".join(f"{k} {list(v)}" for k, v in s.items()) for n, s in plan.shape_mismatch],
    )
    listing("not floating point, skipped", plan.not_float)
    listing(
        "dtype mismatches, compared after rounding to bf16",
        [f"{n} " + "/".join(d.values()) for n, d in plan.dtype_mismatch],
        3,
    )


def render_summary(rows: Sequence[Row], console: Any, base: str, runs: Sequence[str]) -> None:
    """Overall figures, the per-module table and the layers of highest and lowest agreement."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    ov = overall(rows)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("tensors compared", f"{ov['tensors']:,} ({ov['numel']:,} parameters)")
    for i, given in enumerate(runs):
        grid.add_row(f"{run_label(i)} bf16 update density", f"{_pct(ov['density'][i])}  {given}")
    grid.add_row(
        "Jaccard (weighted) / random",
        f"{_fmt(ov['jaccard_mean'])} / {_fmt(ov['jaccard_random'])}  (ratio {_fmt(ov['jaccard_ratio'], '.2f')})",
    )
    grid.add_row("one-sided overlap / random", f"{_fmt(ov['overlap_mean'])} / {_fmt(ov['overlap_random'])}")
    grid.add_row("changed by all runs", _pct(ov["unanimous_fraction"]))
    parts: list[Any] = [Panel(grid, title=f"[bold]{base}[/]: {len(runs)} runs", expand=False)]

    t = Table(
        title="Per module (numel-weighted mean over tensors)", title_justify="left", header_style="bold"
    )
    for col, justify in (
        ("module", "left"),
        ("tensors", "right"),
        ("params", "right"),
        ("Jaccard", "right"),
        ("random", "right"),
        ("ratio", "right"),
        ("overlap", "right"),
        ("random", "right"),
        ("all runs", "right"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in per_module(rows):
        t.add_row(
            m["module"],
            str(m["tensors"]),
            f"{m['numel']:,}",
            _fmt(m["jaccard_mean"]),
            _fmt(m["jaccard_random"]),
            _fmt(m["jaccard_ratio"], ".2f"),
            _fmt(m["overlap_mean"]),
            _fmt(m["overlap_random"]),
            _pct(m["unanimous_fraction"]),
        )
    parts.append(t)

    highest, lowest = layer_extremes(rows)
    if highest:
        lt = Table(
            title="Layers by agreement (jaccard_ratio)",
            title_justify="left",
            header_style="bold",
        )
        for col in ("", "layer", "ratio", "Jaccard", "random"):
            lt.add_column(col, justify="right" if col else "left")
        for label, group in (("highest", highest), ("lowest", lowest)):
            for lay in group:
                lt.add_row(
                    label,
                    str(lay["layer"]),
                    _fmt(lay["jaccard_ratio"], ".2f"),
                    _fmt(lay["jaccard_mean"]),
                    _fmt(lay["jaccard_random"]),
                )
                label = ""
        parts.append(lt)
    console.print(Group(*parts))
