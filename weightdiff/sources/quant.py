"""Quantised checkpoints: FP8 weights with block scales are dequantised; every other scheme is refused.

DeepSeek-V3-style FP8 checkpoints store a weight ``X.weight`` as float8 (E4M3 or E5M2) codes and next to it a
float32 ``X.weight_scale_inv`` holding one multiplier per block of the weight (128 x 128 unless config.json's
``quantization_config.weight_block_size`` says otherwise; blocks at the right and bottom edges are ragged).
The value the model computes with is ``W = float(code) * scale_inv`` broadcast over its block. ``Fp8Source``
wraps a source so that such a weight reads as that float32 ``W`` and the scale tensors disappear from the
listing (they are consumed by their weights, not compared as tensors of their own). An FP8 tensor without a
scale reads as its raw fp8 values, which the metrics upcast exactly.

Any other quantisation (GPTQ/AWQ int4 packs, bitsandbytes, compressed-tensors, per-tensor ``weight_scale``
conventions, MXFP4 blocks, integer weights) is refused by ``check_supported`` with a one-line error naming the
file and the tensor: read naively, those bytes would produce plausible-looking but meaningless numbers.

This module does not re-quantise, does not interpret activation scales and does not compute metrics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weightdiff.errors import UnsupportedCheckpointError
from weightdiff.sources.base import Source
from weightdiff.sources.format import FLOAT_DTYPES, TensorInfo
from weightdiff.sources.rows import resolve

if TYPE_CHECKING:
    import torch

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_SUFFIX = "_scale_inv"
#: DeepSeek-V3's and Qwen3-FP8's block size, used when config.json does not give one.
DEFAULT_BLOCK = (128, 128)

_INTEGER_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"})

# Tensor-name signatures of the quantisation formats weightdiff cannot interpret, with what to call them in
# the error. Checked on names (not on config.json) because names are what would otherwise be misread.
_REFUSED: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\.(?:qweight|qzeros|g_idx)$"),
        "part of a GPTQ/AWQ packed int4 weight (qweight/qzeros/scales)",
    ),
    (
        re.compile(r"\.(?:absmax|quant_map|nested_absmax|nested_quant_map)$|\.quant_state\.bitsandbytes__"),
        "part of a bitsandbytes 4-bit weight (absmax/quant_map)",
    ),
    (re.compile(r"\.(?:SCB|weight_format)$"), "part of a bitsandbytes int8 weight (SCB)"),
    (
        re.compile(r"\.weight_scale$"),
        "a weight_scale of a per-tensor/per-channel FP8 or INT8 convention (compressed-tensors, FBGEMM) whose "
        "layout weightdiff cannot interpret (only DeepSeek-style weight_scale_inv block scales are supported)",
    ),
    (
        re.compile(r"\.(?:weight_packed|weight_zero_point|weight_global_scale|weight_shape)$"),
        "part of a compressed-tensors packed weight",
    ),
    (re.compile(r"\.weight\._(?:data|scale)$"), "part of an optimum-quanto quantised weight"),
)


@dataclass(frozen=True)
class BlockScale:
    """How one FP8 weight is scaled: its scale tensor and the block (rows, columns) each scale covers."""

    scale: TensorInfo
    #: None for one scale over the whole tensor.
    block: tuple[int, int] | None


def _refusal(file: str, name: str, what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"{file}: tensor {name!r} is {what}, which weightdiff does not support; compare dequantized "
        "bf16/fp16/fp32 checkpoints instead"
    )


def check_supported(tensors: Mapping[str, TensorInfo]) -> None:
    """Raise ``UnsupportedCheckpointError`` for the first tensor (in name order) of an uninterpretable format."""
    names = sorted(tensors)
    # Format signatures first, so that a bitsandbytes checkpoint is named as such rather than by its packed
    # uint8 weight, which the generic integer-weight check below would report first.
    for name in names:
        info = tensors[name]
        for pattern, what in _REFUSED:
            if pattern.search(name):
                raise _refusal(info.file, name, what)
        if name.endswith("_blocks") and info.dtype == "U8":
            raise _refusal(info.file, name, "part of an MXFP4 packed weight (_blocks/_scales)")
    for name in names:
        info = tensors[name]
        if name.endswith(".weight") and info.dtype in _INTEGER_DTYPES and len(info.shape) >= 2:
            raise _refusal(info.file, name, f"an integer-quantised weight ({info.dtype})")


def _config_block(config: Mapping[str, Any] | None) -> tuple[int, int] | None:
    qc = config.get("quantization_config") if config else None
    size = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return size[0], size[1]
    return None


def find_block_scales(
    tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None = None
) -> dict[str, BlockScale]:
    """Map every FP8 weight that has a ``*_scale_inv`` tensor to its scale; refuse scales that do not fit.

    The block size comes from config.json (``quantization_config.weight_block_size``) or is 128 x 128; it is
    never guessed from the shapes, because a ragged edge makes several block sizes fit the same scale shape.
    """
    configured = _config_block(config)
    out: dict[str, BlockScale] = {}
    for name in sorted(tensors):
        if not name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors[name]
        weight_name = name[: -len(SCALE_SUFFIX)]
        weight = tensors.get(weight_name)
        if weight is None:
            raise UnsupportedCheckpointError(
                f"{scale.file}: scale tensor {name!r} has no weight {weight_name!r} to scale; cannot interpret it"
            )
        if weight.dtype not in FP8_DTYPES or scale.dtype not in FLOAT_DTYPES - FP8_DTYPES:
            raise UnsupportedCheckpointError(
                f"{scale.file}: tensor {name!r} ({scale.dtype}) scales {weight_name!r} ({weight.dtype}); only "
                "float scales of F8_E4M3/F8_E5M2 weights are supported"
            )
        if math.prod(scale.shape) == 1 and len(scale.shape) <= 1:
            out[weight_name] = BlockScale(scale, None)
            continue
        block = configured or DEFAULT_BLOCK
        expected = tuple(-(-d // b) for d, b in zip(weight.shape, block, strict=False))
        if len(weight.shape) != 2 or tuple(scale.shape) != expected:
            source = "config.json" if configured else "the default (no weight_block_size in config.json)"
            raise UnsupportedCheckpointError(
                f"{scale.file}: scale tensor {name!r} has shape {list(scale.shape)}, but {weight_name!r} of shape "
                f"{list(weight.shape)} in blocks of {list(block)} from {source} needs {list(expected)}; cannot "
                "dequantize it"
            )
        out[weight_name] = BlockScale(scale, block)
    return out


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``float32(codes) * scale`` with each scale broadcast over its block (ragged edge blocks included).

    The fp8 -> float32 conversion is exact; the product is rounded once to float32, which is what the model's
    dequantisation kernels compute before any further cast.
    """
    import torch

    w = codes.to(torch.float32)
    s = scale.to(torch.float32)
    if block is None:
        return w.mul_(s.reshape(()))
    bm, bn = block
    n = w.shape[1]
    # One band of block rows at a time: the expanded scale row is n floats, not a full copy of the weight.
    for i in range(s.shape[0]):
        w[i * bm : (i + 1) * bm].mul_(s[i].repeat_interleave(bn)[:n])
    return w


class Fp8Source(Source):
    """A source whose block-scaled FP8 weights read as dequantised float32 (see the module docstring)."""

    def __init__(self, inner: Source, scales: Mapping[str, BlockScale]) -> None:
        self.inner = inner
        self.given = inner.given
        self.scales = dict(scales)
        consumed = {s.scale.name for s in self.scales.values()}
        #: Names of the ``*_scale_inv`` tensors folded into their weights (not listed by ``tensors()``).
        self.consumed_scales = sorted(consumed)
        self._tensors = {n: i for n, i in inner.tensors().items() if n not in consumed}

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def read(self, info: TensorInfo) -> torch.Tensor:
        spec = self.scales.get(info.name)
        if spec is None:
            return self.inner.read(info)
        full, rows = resolve(self._tensors, info)
        w = dequantize(self.inner.read(full), self.inner.read(spec.scale), spec.block)
        # The float32 result owns its memory, so the stored codes' pages can go right away.
        self.inner.release(full)
        self.inner.release(spec.scale)
        # Scale blocks are aligned to whole-tensor rows, so a row slice is dequantised whole and then cut.
        return w if rows is None else w[rows[0] : rows[1]].clone()

    def read_buffer(self, info: TensorInfo) -> memoryview | None:
        # Weights with a block scale are computed (dequantised); every other tensor is the inner source's bytes.
        return None if info.name in self.scales else self.inner.read_buffer(info)

    def read_stored(self, info: TensorInfo) -> torch.Tensor:
        """The stored fp8 codes of ``info`` (before scaling), for bit-level change counts."""
        return self.inner.read(info)

    def release(self, info: TensorInfo) -> None:
        self.inner.release(info)

    def describe(self) -> dict[str, str]:
        return {
            **self.inner.describe(),
            "quantization": f"fp8 with block scales: {len(self.scales)} weights dequantized to float32",
        }

    def config(self) -> dict[str, Any] | None:
        return self.inner.config()

    def close(self) -> None:
        self.inner.close()


def prepare(source: Source) -> Source:
    """Refuse uninterpretable quantisation, and wrap ``source`` in an ``Fp8Source`` when it has block scales.

    The source is closed when it is refused. Sources without scale tensors are returned unchanged.
    """
    try:
        tensors = source.tensors()
        check_supported(tensors)
        if not any(name.endswith(SCALE_SUFFIX) for name in tensors):
            return source
        scales = find_block_scales(tensors, source.config())
    except BaseException:
        source.close()
        raise
    return Fp8Source(source, scales)


def read_stored(source: Source, info: TensorInfo) -> torch.Tensor:
    """The stored values of ``info`` as the file holds them, whatever the source computes on ``read``.

    Wrapper sources that compute values (``Fp8Source``, ``AdapterSource``) expose ``read_stored``; for any
    other source, what it reads is what is stored.
    """
    reader = getattr(source, "read_stored", None)
    return reader(info) if reader is not None else source.read(info)
