"""Checkpoints on local disk: a single ``.safetensors`` file, a directory holding ``model.safetensors``, a
sharded directory with ``model.safetensors.index.json``, or a directory of ``*.safetensors`` files.

Headers are parsed and validated when the source is opened, before any tensor data is touched. Tensor data is
read through a copy-on-write memory map, so a tensor is a zero-copy view of the page cache, and the pages of
a tensor are dropped from this process's memory once the engine releases it: resident memory stays bounded by
the tensors in flight, not the checkpoint size. Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightdiff.errors import CheckpointFormatError, InputError, UnsupportedCheckpointError
from weightdiff.sources.base import Source, bytes_to_tensor, check_length, load_json_config
from weightdiff.sources.format import TensorInfo, header_length, parse_header

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PAGE = mmap.PAGESIZE

CONVERT_HINT = (
    "weightdiff never unpickles; convert it first, e.g. "
    '`python -c "import torch; from safetensors.torch import save_file; '
    "save_file(torch.load('FILE', weights_only=True), 'model.safetensors')\"`"
)


def read_header_file(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one local safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = header_length(fh.read(8), str(path), size)
            header = fh.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_header(header, str(path), size)


def _shard_files_from_index(directory: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{index_path}: invalid index file ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(
            f"{index_path}: invalid index file (no 'weight_map' of tensor name -> shard)"
        )
    root = Path(os.path.normpath(directory.absolute()))
    shards: list[Path] = []
    for shard in sorted(set(weight_map.values())):
        candidate = Path(shard)
        # Checked on the path as written, not with symlinks resolved: the Hugging Face cache stores shards as
        # links into a sibling blobs/ folder, which is fine; what is refused is a name that climbs out.
        lexical = Path(os.path.normpath(root / candidate))
        resolved = directory / candidate
        if candidate.is_absolute() or ".." in candidate.parts or root not in lexical.parents:
            raise CheckpointFormatError(
                f"{index_path}: shard {shard!r} lies outside the checkpoint directory; refusing to read it"
            )
        if not resolved.is_file():
            raise InputError(f"{index_path}: names shard {shard!r}, which does not exist")
        shards.append(directory / candidate)
    return shards, weight_map


def find_weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files that make up the checkpoint at ``path``, and the index's weight map if any."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsupportedCheckpointError(f"{path}: is a pickle checkpoint; {CONVERT_HINT}")
        return [path], None
    index = path / INDEX_NAME
    if index.is_file():
        return _shard_files_from_index(path, index)
    single = path / SINGLE_NAME
    if single.is_file():
        return [single], None
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files, None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsupportedCheckpointError(
            f"{path}: holds only pickle files ({', '.join(pickles[:3])}); {CONVERT_HINT}"
        )
    raise InputError(f"{path}: no safetensors files in this directory")


class LocalSource(Source):
    """A checkpoint on local disk (see the module docstring for the layouts accepted)."""

    def __init__(self, path: str | os.PathLike[str], given: str | None = None) -> None:
        self.path = Path(path)
        self.given = given if given is not None else str(path)
        self.files, weight_map = find_weight_files(self.path)
        self._tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            infos, meta = read_header_file(file)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._tensors:
                    raise CheckpointFormatError(
                        f"{file}: tensor {name!r} is also stored in {self._tensors[name].file}"
                    )
                self._tensors[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                held = self._tensors.get(name)
                if held is None or Path(held.file) != self.path / shard:
                    raise CheckpointFormatError(
                        f"{self.path / INDEX_NAME}: maps tensor {name!r} to {shard}, which does not hold it"
                    )
        self._maps: dict[str, mmap.mmap] = {}
        self._maps_lock = threading.Lock()  # the reader maps a pair's two sides from two threads

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def _map(self, file: str) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is not None:
            return mm
        with self._maps_lock:
            mm = self._maps.get(file)
            if mm is None:
                try:
                    with open(file, "rb") as fh:
                        # ACCESS_COPY gives a writable (private) mapping, so torch can view it without a copy
                        # or a warning; nothing ever writes to it.
                        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    raise InputError(f"{file}: cannot map file for reading ({exc})") from None
                self._maps[file] = mm
        return mm

    def read(self, info: TensorInfo) -> torch.Tensor:
        return bytes_to_tensor(self.read_buffer(info), info)

    def read_buffer(self, info: TensorInfo) -> memoryview:
        mm = self._map(info.file)
        if info.end > len(mm):
            raise CheckpointFormatError(
                f"{info.file}: truncated file (tensor {info.name!r} ends past its end)"
            )
        return check_length(memoryview(mm)[info.start : info.end], info)

    def release(self, info: TensorInfo) -> None:
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        # Drop this tensor's pages from our address space (the kernel's page cache keeps them) so that resident
        # memory does not grow with the checkpoint. Only whole pages inside the tensor are dropped.
        start = -(-info.start // _PAGE) * _PAGE
        end = (info.end // _PAGE) * _PAGE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def describe(self) -> dict[str, str]:
        return {"kind": "local", "given": self.given, "resolved": str(self.path.resolve())}

    def config(self) -> dict[str, Any] | None:
        directory = self.path if self.path.is_dir() else self.path.parent
        cfg = directory / "config.json"
        if not cfg.is_file():
            return None
        try:
            return load_json_config(cfg.read_text(encoding="utf-8"), str(cfg))
        except (OSError, UnicodeDecodeError):
            return None

    def close(self) -> None:
        for mm in self._maps.values():
            # BufferError: a tensor view still references the map; the GC closes it when the view goes.
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()
