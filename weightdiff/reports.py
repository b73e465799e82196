"""Reading saved weightdiff Parquet files back (for ``check`` and ``plot``).

One function checks that a path is a readable Parquet file written by a compatible weightdiff (same schema
major version) and returns its table and decoded metadata. It raises ``InputError`` with a one-line message
naming the file; it never interprets the rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from weightdiff import schema
from weightdiff.errors import InputError


def _major(version: Any) -> str:
    return str(version).split(".")[0]


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_schema(path: str | os.PathLike[str]) -> tuple[Path, pa.Schema, dict[str, Any]]:
    """Validate ``path`` as a weightdiff Parquet file from its footer alone; no rows are read."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such report file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not a Parquet report")
    try:
        arrow_schema = pq.read_schema(str(p))
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{p}: not a Parquet report ({_reason(exc)})") from None
    metadata = schema.decode_metadata(arrow_schema.metadata)
    version = metadata.get("schema_version")
    if version is None:
        raise InputError(f"{p}: not a weightdiff report (the Parquet file has no weightdiff metadata)")
    if _major(version) != _major(schema.SCHEMA_VERSION):
        raise InputError(
            f"{p}: report schema version {version} is not supported by this weightdiff (schema "
            f"{schema.SCHEMA_VERSION}); regenerate it with this version's weightdiff"
        )
    return p, arrow_schema, metadata


def read_table(p: Path) -> pa.Table:
    try:
        return pq.read_table(str(p))
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{p}: cannot read the report ({_reason(exc)})") from None
