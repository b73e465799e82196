"""Checkpoint sources: ``open_source`` turns what the user typed into a ``Source``.

A local path that exists always wins; otherwise a Hub repo id (``org/name``, ``org/name@rev``,
``hf://org/name@rev``) opens a Hub source. This module only dispatches; each source lives in its own module.
"""

from __future__ import annotations

from pathlib import Path

from weightdiff.sources.base import Source
from weightdiff.sources.format import TensorInfo
from weightdiff.sources.local import LocalSource

__all__ = ["LocalSource", "Source", "TensorInfo", "open_source"]


def open_source(
    spec: str,
    revision: str | None = None,
    token: str | None = None,
    download: bool = False,
) -> Source:
    """Open the checkpoint named by ``spec`` (a local path, or a Hub repo id when no such path exists)."""
    if Path(spec).exists():
        return LocalSource(spec, given=spec)
    try:
        from weightdiff.sources import hub
    except ImportError:  # pragma: no cover - the hub module is part of the package
        hub = None  # type: ignore[assignment]
    if hub is not None and hub.looks_like_repo_id(spec):
        return hub.HubSource.open(spec, revision=revision, token=token, download=download)
    return LocalSource(spec, given=spec)  # raises the "no such file" error
