"""Parsing and validation of the safetensors container format.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Each
header entry gives a dtype, a shape and [begin, end) offsets relative to the start of the data section.

This module turns header bytes into validated ``TensorInfo`` records and nothing more: it never reads tensor
data, never touches the network and never imports torch. Validation is strict, because every later step trusts
these offsets: a wrong offset would silently compare the wrong bytes.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

from weightdiff.errors import CheckpointFormatError, UnsupportedCheckpointError

# Largest header we accept. Real headers are a few MB at most (tens of thousands of tensors); a larger
# length is almost certainly a corrupt or hostile file, and reading it would exhaust memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: Bytes per element of every dtype weightdiff can read.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
}

#: Floating-point dtypes compared as numbers (the others are compared bit for bit).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

#: Dtypes the safetensors format knows but weightdiff refuses rather than misreads.
REFUSED_DTYPES = frozenset(
    {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "E8M0", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is: enough to plan a comparison without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: Absolute byte offsets of the tensor's data in its file: [start, end).
    start: int
    end: int
    #: The file (local path or remote file name) that holds the tensor.
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def header_length(prefix: bytes, file: str, file_size: int | None) -> int:
    """Decode and check the 8-byte header length at the start of a safetensors file."""
    if len(prefix) < 8:
        raise CheckpointFormatError(
            f"{file}: not a safetensors file (only {len(prefix)} bytes, shorter than the 8-byte header length)"
        )
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{file}: not a safetensors file (header length {n} bytes is absurdly large; the limit is "
            f"{MAX_HEADER_BYTES})"
        )
    if n < 2:
        raise CheckpointFormatError(f"{file}: not a safetensors file (header length {n} is too small)")
    if file_size is not None and 8 + n > file_size:
        raise CheckpointFormatError(
            f"{file}: truncated or not a safetensors file (header length {n} runs past the end of the "
            f"{file_size}-byte file)"
        )
    return n


def parse_header(
    header: bytes, file: str, file_size: int | None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors JSON header and return its tensors (by name) and its ``__metadata__``.

    ``header`` is the JSON bytes (without the 8-byte length); ``file_size`` is the size of the whole file
    when known, so that truncation is detected before any data is read.
    """
    data_start = 8 + len(header)
    try:
        raw = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(
            f"{file}: not a safetensors file (header is not valid JSON: {exc})"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{file}: invalid safetensors header (JSON is not an object)")
    metadata_raw = raw.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(metadata_raw, dict) else {}
    infos: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        infos[name] = _tensor_entry(name, entry, file, data_start)
    _check_layout(infos, file, data_start, file_size)
    return infos, metadata


def _tensor_entry(name: str, entry: object, file: str, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointFormatError(
            f"{file}: invalid safetensors header (tensor {name!r} lacks dtype, shape or data_offsets)"
        )
    dtype = entry["dtype"]
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointFormatError(
            f"{file}: invalid safetensors header (tensor {name!r} has a non-string dtype)"
        )
    if dtype in REFUSED_DTYPES:
        raise UnsupportedCheckpointError(
            f"{file}: tensor {name!r} has dtype {dtype}, which weightdiff does not support; dequantize the "
            "checkpoint to bf16/fp16/fp32 first"
        )
    if dtype not in DTYPE_SIZES:
        raise CheckpointFormatError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointFormatError(
            f"{file}: invalid safetensors header (tensor {name!r} has a bad shape {shape!r})"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointFormatError(
            f"{file}: invalid safetensors header (tensor {name!r} has bad data_offsets {offsets!r})"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointFormatError(
            f"{file}: tensor {name!r} has {offsets[1] - offsets[0]} bytes of data but its shape {shape} and "
            f"dtype {dtype} need {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1], file)


def _check_layout(infos: dict[str, TensorInfo], file: str, data_start: int, file_size: int | None) -> None:
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (s0, e0, n0), (s1, _e1, n1) in itertools.pairwise(spans):
        if s1 < e0:
            raise CheckpointFormatError(
                f"{file}: tensors {n0!r} and {n1!r} overlap in the file (offsets {s0}-{e0} and {s1})"
            )
    if file_size is not None and spans:
        _last_start, last_end, last = max(spans, key=lambda s: s[1])
        if last_end > file_size:
            raise CheckpointFormatError(
                f"{file}: truncated file: tensor {last!r} ends at byte {last_end} but the file has only "
                f"{file_size} bytes"
            )
