"""Writers for report files: Parquet (streamed row groups), JSON and text, all atomic.

Every file is written to a temporary name beside its destination and renamed into place only when complete,
so a crash, Ctrl-C or error never leaves a partial file at the output path (and never clobbers an older good
report). Output paths are checked before any computation starts. This module formats nothing for humans.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from weightdiff.errors import OutputError
from weightdiff.schema import rows_to_table


def check_output_path(path: str | os.PathLike[str], option: str = "--output") -> Path:
    """Fail now, before hours of computation, if ``path`` cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: {option} is a directory, not a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{p}: cannot write {option}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{p}: cannot write {option} ({exc.strerror or exc})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{p}: cannot write {option} (existing file is read-only)")
    return p


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` on ``commit`` and vanishes on ``abort``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent or ".")
        # mkstemp creates the file private (0600); a report should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class ParquetReportWriter:
    """Streams rows into a Parquet file in row groups; atomic (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        schema: pa.Schema,
        rows_per_group: int = 64,
        option: str = "--output",
    ) -> None:
        self.schema = schema
        self.rows_per_group = rows_per_group
        self._pending: list[dict[str, Any]] = []
        self._file = AtomicFile(path)
        try:
            self._writer = pq.ParquetWriter(str(self._file.tmp), schema, compression="zstd")
        except (OSError, pa.ArrowException) as exc:
            self._file.abort()
            raise OutputError(f"{path}: cannot write {option} ({exc})") from None
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.rows_per_group:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        """Append a whole table (already of this writer's schema) as its own row group."""
        self.flush()
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def flush(self) -> None:
        if self._pending:
            self._writer.write_table(rows_to_table(self._pending, self.schema))
            self.rows += len(self._pending)
            self._pending = []

    def commit(self, metadata_update: dict[bytes, bytes] | None = None) -> None:
        """Finish the file and move it into place. ``metadata_update`` replaces the schema metadata."""
        self.flush()
        if metadata_update is not None:
            self._writer.add_key_value_metadata(metadata_update)
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._file.abort()


def write_table(path: str | os.PathLike[str], table: pa.Table) -> None:
    """Write a whole Arrow table to Parquet atomically."""
    f = AtomicFile(path)
    try:
        pq.write_table(table, str(f.tmp), compression="zstd")
        f.commit()
    except BaseException:
        f.abort()
        raise


def write_text(path: str, text: str) -> None:
    """Write text to ``path`` atomically, or to stdout when ``path`` is ``-``."""
    if path == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    f = AtomicFile(path)
    try:
        f.tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        f.commit()
    except BaseException:
        f.abort()
        raise


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False))
