"""``weightdiff spectrum``: singular spectra of one checkpoint's matrices, or of two side by side.

Orchestration only: opens the sources, selects the 2-D floating-point tensors (both sides >= 2), streams them
through the engine's reader and ``metrics.spectral.matrix_spectrum``, and writes the report atomically. It
computes nothing itself and prints nothing (the CLI renders ``SpectrumReport``).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from weightdiff import distributed, schema
from weightdiff.engine import Reader, ReadJob, resolve_device
from weightdiff.errors import NothingComparableError
from weightdiff.metrics.spectral import matrix_spectrum
from weightdiff.naming import expert_of, layer_of, module_of
from weightdiff.pairing import make_plan, selected, sort_names
from weightdiff.sources import open_source
from weightdiff.sources.base import Source
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo
from weightdiff.writers import ParquetReportWriter, check_output_path


@dataclass
class SpectrumReport:
    table: pa.Table
    metadata: dict[str, Any]
    skipped: list[str]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()


def _is_matrix(info: TensorInfo) -> bool:
    return info.dtype in FLOAT_DTYPES and len(info.shape) == 2 and min(info.shape) >= 2


@distributed.collective
def spectrum(
    checkpoint: str | Source,
    tuned: str | Source | None = None,
    *,
    output: str | None = None,
    rank: int = 64,
    full: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    revision: str | None = None,
    tuned_revision: str | None = None,
    token: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SpectrumReport:
    """Spectral summary of every selected matrix; with ``tuned``, also its spectrum and per-index drift."""
    from weightdiff.errors import InputError

    if rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}")
    if output is not None and distributed.is_leader():  # under torchrun only rank 0 writes
        check_output_path(output)
    dev, _why = resolve_device(device)
    base = checkpoint if isinstance(checkpoint, Source) else open_source(checkpoint, revision, token)
    second: Source | None = None
    try:
        if tuned is not None:
            second = tuned if isinstance(tuned, Source) else open_source(tuned, tuned_revision, token)
        return _run(base, second, output, rank, full, include, exclude, dev, on_progress)
    finally:
        base.close()
        if second is not None:
            second.close()


def _run(
    base: Source,
    tuned: Source | None,
    output: str | None,
    rank: int,
    full: bool,
    include: Sequence[str],
    exclude: Sequence[str],
    device: torch.device,
    on_progress: Callable[[int], None] | None,
) -> SpectrumReport:
    from weightdiff.api import _version

    infos = base.tensors()
    skipped: list[str] = []
    jobs: list[ReadJob] = []
    if tuned is None:
        for name in sort_names(infos):
            info = infos[name]
            if not selected(name, include, exclude):
                continue
            if _is_matrix(info):
                jobs.append(ReadJob(info, ((base, info),)))
            else:
                skipped.append(name)
    else:
        plan = make_plan(infos, tuned.tensors(), include, exclude)
        skipped = plan.only_base + plan.only_tuned + [n for n, _, _ in plan.shape_mismatch]
        for pair in plan.pairs:
            if _is_matrix(pair.base):
                jobs.append(ReadJob(pair.base, ((base, pair.base), (tuned, pair.tuned))))
    metadata = {
        "schema_version": schema.SCHEMA_VERSION,
        "weightdiff_version": _version(),
        "checkpoint": base.describe(),
        "tuned": tuned.describe() if tuned is not None else None,
        "options": {"rank": rank, "full": full, "include": list(include), "exclude": list(exclude)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not jobs:
        raise NothingComparableError(f"{base.given}: no 2-D floating-point tensor to analyse")
    # Under torchrun this rank takes a share of the matrices, balanced by SVD cost; rank 0 gathers the rows.
    shard = distributed.current()
    if shard is not None:
        jobs = shard.select(jobs, lambda job: distributed.svd_cost(job.key.shape), lambda job: job.key.name)
        device = torch.device(shard.device(str(device)))
    arrow_schema = schema.arrow_schema(schema.SPECTRUM_COLUMNS, metadata)
    writer = (
        ParquetReportWriter(output, arrow_schema) if output is not None and distributed.is_leader() else None
    )
    rows: list[dict[str, Any]] = []
    reader = Reader(jobs, 1 << 30)
    try:
        for job, tensors in reader if shard is None else shard.track(reader):
            info = job.key
            mats = [t.to(device) for t in tensors]
            s0 = matrix_spectrum(mats[0], rank, full)
            row: dict[str, Any] = {
                "name": info.name,
                "layer": layer_of(info.name),
                "expert": expert_of(info.name),
                "module": module_of(info.name),
                "shape": list(info.shape),
                "dtype": info.dtype,
                **{k: v for k, v in s0.items() if not k.startswith("_")},
            }
            if len(mats) == 2:
                s1 = matrix_spectrum(mats[1], rank, full)
                a0, a1 = s0["_all"], s1["_all"]
                row["tuned_spectral_norm"] = s1["spectral_norm"]
                row["tuned_stable_rank"] = s1["stable_rank"]
                row["tuned_effective_rank"] = s1["effective_rank"]
                row["tuned_singular_values"] = s1["singular_values"]
                v0 = torch.tensor(s0["singular_values"], dtype=torch.float64)
                v1 = torch.tensor(s1["singular_values"], dtype=torch.float64)
                row["sv_rel_drift"] = [
                    (b - a) / a if a > 0 else (0.0 if b == a else math.inf)
                    for a, b in zip(v0.tolist(), v1.tolist(), strict=True)
                ]
                norm0 = float(torch.linalg.vector_norm(a0))
                row["sv_drift"] = float(torch.linalg.vector_norm(a1 - a0)) / norm0 if norm0 > 0 else None
            del mats, tensors
            reader.done(job)
            rows.append(row)
            if writer is not None and shard is None:
                writer.write(row)
            if on_progress is not None:
                on_progress(job.nbytes)
        if shard is not None:
            rows = shard.gather(rows)
            if writer is not None:
                for row in rows:
                    writer.write(row)
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        reader.close()
    return SpectrumReport(schema.rows_to_table(rows, arrow_schema), metadata, skipped)
