"""The one small interface every checkpoint source implements, and the byte-to-tensor conversion they share.

A source answers two questions: which tensors exist (names, dtypes, shapes, read from headers only) and what
one tensor's bytes are. Planning uses the first, the engine the second, so a source that lives on a slow
network moves no tensor data until the engine asks for it. Sources do not compute metrics, pair tensors or
print anything.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from weightdiff.errors import CheckpointFormatError
from weightdiff.sources.format import TensorInfo

if TYPE_CHECKING:  # torch is imported only when a tensor is made: a CPU element-wise compare never needs it
    import torch

# safetensors dtype name -> torch dtype attribute name.
_TORCH_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name, or None when this torch build has none."""
    import torch

    attr = _TORCH_DTYPE_NAMES.get(name)
    dtype = getattr(torch, attr, None) if attr else None
    return dtype if isinstance(dtype, torch.dtype) else None


def check_length(buf: Any, info: TensorInfo) -> memoryview:
    """``buf`` as a memoryview, or a format error when it is not exactly ``info.nbytes`` long."""
    view = memoryview(buf)
    if len(view) != info.nbytes:
        raise CheckpointFormatError(
            f"{info.file}: tensor {info.name!r}: got {len(view)} bytes, header says {info.nbytes}"
        )
    return view


def bytes_to_tensor(buf: Any, info: TensorInfo) -> torch.Tensor:
    """View ``buf`` (exactly ``info.nbytes`` bytes, any buffer) as a CPU tensor of the stored dtype and shape.

    No copy is made when ``buf`` is writable (a copy-on-write mmap or a bytearray), so callers must keep the
    buffer alive as long as the tensor.
    """
    import torch

    check_length(buf, info)
    dtype = torch_dtype(info.dtype)
    if dtype is None:
        raise CheckpointFormatError(f"{info.file}: tensor {info.name!r}: dtype {info.dtype} cannot be loaded")
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype, count=info.numel)
    return flat.view(info.shape)


class Source(ABC):
    """A checkpoint: header-level listing first, tensor bytes on demand."""

    #: The checkpoint as the user gave it (a path or a repo id).
    given: str

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """All tensors of the checkpoint by name, from headers only."""

    @abstractmethod
    def read(self, info: TensorInfo) -> torch.Tensor:
        """One tensor's data as a CPU tensor of its stored dtype. May be a view of a memory map."""

    def read_buffer(self, info: TensorInfo) -> memoryview | None:
        """One tensor's stored bytes exactly as ``read`` would view them, or None when this source makes its
        tensors rather than storing them (a merged adapter, dequantized FP8). Lets the engine run the C kernel
        on the bytes without going through torch. The bytes are valid until ``release(info)``: a source may
        reuse the buffer after that."""
        return None

    def release(self, info: TensorInfo) -> None:  # noqa: B027 - optional hook
        """Tell the source that ``info``'s data is no longer needed, so it may drop cached pages or buffers."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Where the checkpoint came from: ``kind``, ``given`` and ``resolved`` (a path or repo@commit)."""

    def config(self) -> dict[str, Any] | None:
        """The model's ``config.json`` when the checkpoint has one beside its weights."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_json_config(text: str, file: str) -> dict[str, Any] | None:
    """Parse a config.json, returning None when it is not a JSON object (a config is advisory, never fatal)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
