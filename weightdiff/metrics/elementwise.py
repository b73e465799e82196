"""Element-wise metrics of one tensor pair (metrics.md section 1): exact, bf16-aware and absolute-tolerance
change counts, the bf16 ULP-distance histogram, float64 norms, maximum change, cosine and non-finite counts.

Pure: tensors in, numbers out. No I/O, no printing, no knowledge of files or names. Works on any device; every
count is an exact integer and every norm and dot product accumulates in float64, so CPU and GPU give the same
counts. Large tensors are processed in flat chunks: that bounds the temporaries to a few chunk-sized buffers
and keeps each chunk's many passes inside the CPU cache instead of streaming the whole tensor through memory
once per operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from weightdiff.metrics import fused
from weightdiff.metrics.fused import DEFAULT_ATOL, ULP_BUCKETS, finish

__all__ = ["DEFAULT_ATOL", "ULP_BUCKETS", "ElementwiseAccumulator", "elementwise_metrics", "finish"]

# Upper edges of the ULP buckets: bucketize(d, edges) puts d=1 in 0, d=2 in 1, 3..4 in 2, ..., >=129 in 8.
_ULP_EDGES = (1, 2, 4, 8, 16, 32, 64, 128)

# Which floating dtypes hold every value of which others exactly. Used to pick the type two checkpoints are
# compared in: the narrower side is upcast without rounding, and no value is ever rounded before comparison.
_EXACT_SUPERSETS: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.float64: frozenset(
        {torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
    ),
    torch.float32: frozenset({torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}),
    torch.float16: frozenset({torch.float8_e4m3fn, torch.float8_e5m2}),
    torch.bfloat16: frozenset({torch.float8_e4m3fn, torch.float8_e5m2}),
}


def common_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The narrowest float dtype that holds every value of both ``a`` and ``b`` exactly."""
    if a == b:
        return a if a in _EXACT_SUPERSETS else torch.float32
    if b in _EXACT_SUPERSETS.get(a, ()):
        return a
    if a in _EXACT_SUPERSETS.get(b, ()):
        return b
    if torch.float64 in (a, b):
        return torch.float64
    if {a, b} <= {torch.float8_e4m3fn, torch.float8_e5m2}:
        return torch.float16
    return torch.float32


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 with round-to-nearest-even, from any float dtype, with no double rounding.

    torch converts float64 to bfloat16 through float32, which rounds twice and can land on the wrong side of a
    tie. For float64 input we first narrow to float32 with round-to-odd (truncate, then set the last bit if
    anything was lost): with 16 spare bits that makes the second rounding exact (Boldo & Melquiond).
    """
    if x.dtype == torch.bfloat16:
        return x
    if x.dtype != torch.float64:
        return x.to(torch.bfloat16)
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    # Round-to-nearest may have rounded away from zero: step one float32 towards zero to truncate instead.
    overshoot = torch.isfinite(x) & (back.abs() > x.abs())
    f = torch.where(overshoot, torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = torch.isfinite(x) & (f.to(torch.float64) != x)
    bits = f.view(torch.int32)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(torch.bfloat16)


def ordered_bf16(bits: torch.Tensor) -> torch.Tensor:
    """Map bfloat16 bit patterns (as int16) to integers whose differences are ULP distances (+0 and -0 -> 0)."""
    wide = bits.to(torch.int32)
    return torch.where(wide < 0, -(wide & 0x7FFF), wide)


@dataclass
class ElementwiseAccumulator:
    """Running sums of one tensor pair, fed chunk by chunk; ``result`` turns them into report columns."""

    atol: float = DEFAULT_ATOL
    numel: int = 0
    ulp_hist: list[int] = field(default_factory=lambda: [0] * len(ULP_BUCKETS))
    # float64 sums; kept as tensors on the device while chunks stream, synced once in ``result``.
    _sums: list[torch.Tensor] = field(default_factory=list)
    _maxes: list[torch.Tensor] = field(default_factory=list)
    _counts: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one flat chunk: ``x`` base values, ``y`` tuned values, same dtype (see ``common_dtype``)."""
        self.numel += x.numel()
        counts = []
        # Compared as numbers: +0 == -0, and NaN != anything, so a NaN on either side counts as changed.
        counts.append((x != y).sum())
        xb, yb = round_to_bf16(x), round_to_bf16(y)
        changed_b = xb != yb
        counts.append(changed_b.sum())
        fx, fy = torch.isfinite(x), torch.isfinite(y)
        counts.append(fx.logical_not().sum())
        counts.append(fy.logical_not().sum())
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        d = y64 - x64
        # NOT(|d| <= atol) rather than |d| > atol: NaN differences count as changed.
        counts.append((d.abs() <= self.atol).logical_not().sum())

        both = fx & fy
        all_finite = bool(both.all())
        if not all_finite:
            x64 = torch.where(fx, x64, 0.0)
            y64 = torch.where(fy, y64, 0.0)
            d = torch.where(both, d, 0.0)
            xb_both = torch.where(both, x64, 0.0)
            yb_both = torch.where(both, y64, 0.0)
        else:
            xb_both, yb_both = x64, y64
        sums = torch.stack(
            [
                torch.dot(x64, x64),  # base_fro^2 over finite base entries
                torch.dot(d, d),  # delta_fro^2 over entries finite in both
                torch.dot(xb_both, yb_both),  # <W0, W+> over entries finite in both
                torch.dot(xb_both, xb_both),
                torch.dot(yb_both, yb_both),
            ]
        )
        self._sums.append(sums)
        # -1 stands for "no finite pair" so that finish() reports null rather than 0.
        finite_d = torch.where(both, d.abs(), -1.0) if not all_finite else d.abs()
        self._maxes.append(
            finite_d.max() if d.numel() else torch.full((), -1.0, dtype=torch.float64, device=d.device)
        )
        self._counts.append(torch.stack(counts))

        # ULP distances of the elements that changed in bf16 and are finite on both sides after rounding.
        ulp_mask = changed_b & torch.isfinite(xb) & torch.isfinite(yb)
        if bool(ulp_mask.any()):
            ox = ordered_bf16(xb[ulp_mask].view(torch.int16))
            oy = ordered_bf16(yb[ulp_mask].view(torch.int16))
            dist = (oy - ox).abs()
            edges = torch.tensor(_ULP_EDGES, dtype=dist.dtype, device=dist.device)
            hist = torch.bincount(torch.bucketize(dist, edges), minlength=len(ULP_BUCKETS))
            for i, v in enumerate(hist.tolist()):
                self.ulp_hist[i] += int(v)

    def result(self) -> dict[str, object]:
        """Report columns (metrics.md section 1) for everything fed so far."""
        if not self._counts:
            return finish(self.numel, [0] * 5, self.ulp_hist, [0.0] * 5, math.nan)
        counts = [int(c) for c in torch.stack(self._counts).sum(0).tolist()]
        sums = torch.stack(self._sums).sum(0).tolist()
        delta_max = float(torch.stack(self._maxes).max())
        return finish(self.numel, counts, self.ulp_hist, sums, delta_max)


_KERNEL_DTYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _kernel_operand(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in _KERNEL_DTYPES:
        return t.contiguous()
    # float8 widens exactly to bfloat16 (and float16): 3 or 2 mantissa bits fit in 7.
    return t.to(torch.bfloat16)


def _elementwise_kernel(x: torch.Tensor, y: torch.Tensor, atol: float) -> dict[str, object]:
    """The fused C pass (see fused.py) over two contiguous CPU tensors."""
    x, y = _kernel_operand(x), _kernel_operand(y)
    futures = fused.submit(
        x.data_ptr(), _KERNEL_DTYPES[x.dtype], y.data_ptr(), _KERNEL_DTYPES[y.dtype], x.numel(), atol
    )
    return fused.collect(futures, x.numel())


def elementwise_metrics(
    base: torch.Tensor,
    tuned: torch.Tensor,
    atol: float = DEFAULT_ATOL,
    chunk: int | None = None,
    use_kernel: bool = True,
) -> dict[str, object]:
    """All section-1 metrics of one same-shaped pair, stored dtypes as read (mixed dtypes are upcast exactly).

    On CPU the fused C kernel runs when it was built and ``use_kernel`` is true; otherwise (and on GPUs) the
    chunked torch path runs. Both give identical counts and float64 sums equal to rounding.
    """
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    dtype = common_dtype(base.dtype, tuned.dtype)
    x_all, y_all = base.reshape(-1), tuned.reshape(-1)
    if use_kernel and x_all.device.type == "cpu" and fused.available():
        return _elementwise_kernel(x_all, y_all, atol)
    if chunk is None:
        # On a GPU the passes are cheap and each host sync is not: few, large chunks. On a CPU, chunks that
        # stay in cache. ``chunk`` also bounds the temporaries (about 40 bytes per element).
        chunk = 1 << 26 if x_all.device.type != "cpu" else 1 << 18
    acc = ElementwiseAccumulator(atol=atol)
    for start in range(0, x_all.numel(), chunk):
        x = x_all[start : start + chunk].to(dtype)
        y = y_all[start : start + chunk].to(dtype)
        acc.update(x, y)
    return acc.result()
