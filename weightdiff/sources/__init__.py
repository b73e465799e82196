"""Checkpoint sources: ``open_source`` turns what the user typed into a ``Source``.

A local path that exists always wins; otherwise a Hub repo id (``org/name``, ``org/name@rev``,
``hf://org/name@rev``) opens a Hub source. This module only dispatches; each source lives in its own module.
"""

from __future__ import annotations

from pathlib import Path

from weightdiff.errors import InputError
from weightdiff.sources.adapter import is_adapter_dir
from weightdiff.sources.base import Source
from weightdiff.sources.format import TensorInfo
from weightdiff.sources.local import LocalSource
from weightdiff.sources.quant import prepare

__all__ = ["LocalSource", "Source", "TensorInfo", "open_source"]


def open_source(
    spec: str,
    revision: str | None = None,
    token: str | None = None,
    download: bool = False,
) -> Source:
    """Open the checkpoint named by ``spec`` (a local path, or a Hub repo id when no such path exists).

    Every command sees quantised checkpoints the same way: FP8 weights with block scales read dequantised,
    other quantisation schemes are refused (``quant.prepare``). A LoRA adapter directory is refused here: it
    only means something on top of its base, which ``compare BASE ADAPTER_DIR`` provides.
    """
    if Path(spec).exists():
        if is_adapter_dir(spec):
            raise InputError(
                f"{spec}: is a LoRA adapter directory, not a full checkpoint; compare it against its base "
                f"model as TUNED: weightdiff compare BASE {spec}"
            )
        return prepare(LocalSource(spec, given=spec))
    try:
        from weightdiff.sources import hub
    except ImportError:  # pragma: no cover - the hub module is part of the package
        hub = None  # type: ignore[assignment]
    if hub is not None and hub.looks_like_repo_id(spec):
        return prepare(hub.HubSource.open(spec, revision=revision, token=token, download=download))
    return LocalSource(spec, given=spec)  # raises the "no such file" error
