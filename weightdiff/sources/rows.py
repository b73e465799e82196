"""Row slices of stored tensors: a ``TensorInfo`` that names rows [r0, r1) of a bigger stored tensor.

A tensor stored row-major keeps each row's bytes together, so any run of whole rows is one byte range of its
file. A resized vocabulary is compared on the rows both checkpoints have; describing those rows as a slice means
a source that reads by byte range (local memory maps, Hub range requests) reads exactly them without knowing
anything about resizing. Sources that compute values instead of viewing bytes (FP8 dequantisation, LoRA
merging) map a slice back to its whole tensor with ``resolve``.

Pure functions of ``TensorInfo`` records: nothing here reads data or knows why rows are sliced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from weightdiff.errors import CheckpointFormatError
from weightdiff.sources.format import DTYPE_SIZES, TensorInfo


def row_bytes(info: TensorInfo) -> int:
    """Bytes of one row (one index along the first dimension) of ``info``."""
    return math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]


def row_slice(info: TensorInfo, r0: int, r1: int) -> TensorInfo:
    """The rows [r0, r1) of ``info`` as a tensor record of their own (same name, file and dtype)."""
    if not info.shape or not 0 <= r0 <= r1 <= info.shape[0]:
        raise ValueError(f"rows {r0}:{r1} are not inside {info.name} of shape {list(info.shape)}")
    size = row_bytes(info)
    return dataclasses.replace(
        info, shape=(r1 - r0, *info.shape[1:]), start=info.start + r0 * size, end=info.start + r1 * size
    )


def row_range(full: TensorInfo, part: TensorInfo) -> tuple[int, int] | None:
    """Which rows of ``full`` the record ``part`` covers: None when it is the whole tensor, else (r0, r1).

    Raises ``CheckpointFormatError`` when ``part`` is not a run of whole rows of ``full``: a wrapper source
    must never compute values for bytes it cannot place.
    """
    if part == full:
        return None
    size = row_bytes(full)
    offset = part.start - full.start
    if (
        part.file != full.file
        or part.dtype != full.dtype
        or len(part.shape) != len(full.shape)
        or not full.shape
        or part.shape[1:] != full.shape[1:]
        or offset < 0
        or part.end > full.end
        or (size and offset % size)
    ):
        raise CheckpointFormatError(
            f"{full.file}: {part.name!r} with shape {list(part.shape)} at bytes {part.start}-{part.end} is not a "
            f"run of whole rows of the stored tensor (shape {list(full.shape)})"
        )
    r0 = offset // size if size else 0
    return r0, r0 + part.shape[0]


def resolve(listing: Mapping[str, TensorInfo], part: TensorInfo) -> tuple[TensorInfo, tuple[int, int] | None]:
    """The whole tensor that ``part`` belongs to (looked up by name in ``listing``) and the rows it covers."""
    full = listing.get(part.name)
    if full is None:
        raise CheckpointFormatError(f"{part.file}: no tensor {part.name!r} in this checkpoint")
    return full, row_range(full, part)
