"""Element-wise metrics against exactly known answers, bf16 edge cases and a float64 numpy reference."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests import reference
from weightdiff.metrics import elementwise as E
from weightdiff.metrics.elementwise import common_dtype, elementwise_metrics, round_to_bf16

PATHS = [True, False] if E.fused.available() else [False]


def f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def metrics(a, b, dtype=torch.float32, **kw):
    out = {}
    for use_kernel in PATHS:
        out[use_kernel] = elementwise_metrics(
            torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype), use_kernel=use_kernel, **kw
        )
    # The C kernel and the torch path must agree exactly on every count.
    if len(out) == 2:
        for key in (
            "changed_exact",
            "changed_bf16",
            "changed_atol",
            "ulp_hist",
            "nonfinite_base",
            "nonfinite_tuned",
        ):
            assert out[True][key] == out[False][key], key
    return out[PATHS[-1]]


def test_signed_zeros_are_equal():
    r = metrics([0.0, -0.0, 1.0], [-0.0, 0.0, 1.0])
    assert r["changed_exact"] == 0 and r["changed_bf16"] == 0 and r["changed_atol"] == 0
    assert r["sparsity_exact"] == 1.0


def test_nan_counts_as_changed_even_when_bits_match():
    nan = float("nan")
    r = metrics([nan, 1.0, 2.0], [nan, 1.0, nan])
    assert r["changed_exact"] == 2 and r["changed_bf16"] == 2 and r["changed_atol"] == 2
    assert r["nonfinite_base"] == 1 and r["nonfinite_tuned"] == 2
    assert r["ulp_hist"] == [0] * 9  # NaN pairs are not finite: no ULP distance
    assert r["delta_fro"] == 0.0 and r["delta_max"] == 0.0


def test_infinities():
    inf = float("inf")
    r = metrics([inf, -inf, 1.0, 2.0], [inf, inf, 1.0, 3.0])
    assert r["changed_exact"] == 2  # -inf -> inf, 2 -> 3
    assert r["changed_atol"] == 3  # inf - inf is NaN, so "not <= atol"
    assert r["nonfinite_base"] == 2 and r["nonfinite_tuned"] == 2
    assert r["delta_fro"] == pytest.approx(1.0) and r["delta_max"] == 1.0
    assert r["base_fro"] == pytest.approx(math.sqrt(5.0))


def test_subnormals():
    tiny = f32(0x00010000)  # a bf16 subnormal
    r = metrics([tiny, f32(0x00000001)], [2 * tiny, 0.0])
    assert r["changed_exact"] == 2
    # f32 0x00000001 rounds to bf16 +0: that change is hidden by bf16 storage.
    assert r["changed_bf16"] == 1 and r["hidden_by_bf16"] == 1
    assert r["ulp_hist"][0] == 1  # bf16 0x0001 -> 0x0002 is one ULP


def test_round_to_nearest_even_ties():
    # 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
    one_half_ulp = 1.0 + 2.0**-8
    three_half_ulp = 1.0 + 3 * 2.0**-8  # halfway between 1+2^-7 (odd) and 1+2^-6 (even): rounds up
    r = metrics([1.0, 1.0], [one_half_ulp, three_half_ulp])
    assert r["changed_exact"] == 2
    assert r["changed_bf16"] == 1 and r["hidden_by_bf16"] == 1
    assert r["ulp_hist"][1] == 1  # 1.0 -> 1 + 2^-6 is two ULPs


def test_half_ulp_just_under_and_over():
    # The paper's point: an fp32 update changes the stored bf16 weight only if it reaches half a ULP.
    ulp = 2.0**-7  # ULP of bf16 at 1.0
    under = float(np.nextafter(np.float32(1 + ulp / 2), np.float32(0)))
    over = float(np.nextafter(np.float32(1 + ulp / 2), np.float32(2)))
    r = metrics([1.0, 1.0], [under, over])
    assert r["changed_exact"] == 2 and r["changed_bf16"] == 1


def test_powers_of_two_ulp_distance_crosses_binade():
    # bf16 just below 2.0 to 2.0 is one ULP even though the exponent changes.
    below_two = f32(0x3FFF0000)
    r = metrics([below_two, -below_two], [2.0, -2.0])
    assert r["ulp_hist"] == [2, 0, 0, 0, 0, 0, 0, 0, 0]


def test_ulp_distance_across_zero():
    # +smallest subnormal to -smallest subnormal is 2 ULPs; +0 to -0 is none.
    r = metrics([f32(0x00010000), 0.0], [f32(0x80010000), -0.0])
    assert r["ulp_hist"][1] == 1 and r["changed_bf16"] == 1


def test_ulp_buckets():
    # Steps counted on the bf16 bit pattern of 1.0 (0x3F80), so the largest one crosses into the next binade.
    base = [1.0] * 9
    tuned = [f32((0x3F80 + d) << 16) for d in (1, 2, 3, 5, 9, 17, 33, 65, 129)]
    r = metrics(base, tuned)
    assert r["ulp_hist"] == [1] * 9


def test_atol_rule_is_not_scale_aware():
    # metrics.md: 1024.001 vs 1024.002 differ by 1e-3 yet share a bf16 value; 1e-6 vs 2e-6 pass atol.
    r = metrics([1024.001, 1e-6], [1024.002, 2e-6], dtype=torch.float64)
    assert r["changed_exact"] == 2
    assert r["changed_bf16"] == 1  # 1e-6 and 2e-6 are far apart in bf16 ULPs
    assert r["changed_atol"] == 1  # only the 1e-3 difference exceeds 1e-5
    assert sum(r["ulp_hist"][7:]) == 1  # about a whole binade (128 ULPs) apart


def test_empty_tensor():
    r = elementwise_metrics(torch.empty(0, 4, dtype=torch.bfloat16), torch.empty(0, 4, dtype=torch.bfloat16))
    assert (
        r["numel"] == 0 and r["sparsity_bf16"] is None and r["rel_delta"] is None and r["delta_max"] is None
    )


def test_mixed_dtypes_compare_after_exact_upcast():
    a = torch.tensor([1.0, 1.0 + 2**-10, 3.0], dtype=torch.float32)
    b = a.to(torch.bfloat16)  # 1 + 2^-10 rounds to 1.0 in bf16
    r = elementwise_metrics(a, b)
    assert r["changed_exact"] == 1 and r["changed_bf16"] == 0 and r["hidden_by_bf16"] == 1
    assert common_dtype(torch.float16, torch.bfloat16) == torch.float32
    assert common_dtype(torch.float8_e4m3fn, torch.bfloat16) == torch.bfloat16
    assert common_dtype(torch.float32, torch.float64) == torch.float64


def test_float64_to_bf16_has_no_double_rounding():
    # x lies just above the bf16 tie point between 1 and 1+2^-7, but float32 rounding lands exactly on the tie,
    # after which nearest-even would wrongly round down to 1.0.
    x = 1.0 + 2.0**-8 + 2.0**-40
    assert float(torch.tensor(x, dtype=torch.float64).to(torch.float32)) == 1.0 + 2.0**-8
    assert float(round_to_bf16(torch.tensor([x], dtype=torch.float64))[0]) == 1.0 + 2.0**-7
    r = metrics([1.0], [x], dtype=torch.float64)
    assert r["changed_bf16"] == 1


def test_fp64_bf16_rounding_matches_exact_rule():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal(5000) * np.exp2(rng.integers(-30, 30, 5000))
    got = round_to_bf16(torch.tensor(xs)).to(torch.float64).numpy()
    for x, y in zip(xs, got, strict=False):
        # y must be the nearest bf16 value; ties to even. Check against its bf16 neighbours exactly.
        bits = int(np.float32(y).view(np.uint32)) >> 16
        up = float(np.uint32((bits + 1) << 16).view(np.float32))
        down = float(np.uint32((bits - 1) << 16).view(np.float32))
        assert abs(y - x) <= abs(up - x) and abs(y - x) <= abs(down - x)


def assert_matches_reference(got: dict, ref: dict, rel: float, context: object) -> None:
    """Every count equal to the float64 reference's; every finite norm within ``rel``."""
    for key in (
        "changed_exact",
        "changed_bf16",
        "changed_atol",
        "hidden_by_bf16",
        "ulp_hist",
        "nonfinite_base",
        "nonfinite_tuned",
        "numel",
    ):
        assert got[key] == ref[key], (key, context)
    for key in ("delta_fro", "base_fro", "delta_max", "cosine"):
        if ref[key] is None or not math.isfinite(ref[key]):
            continue
        assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-300), (key, context)


finite_f32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 64), elements=finite_f32),
    st.data(),
)
def test_matches_float64_reference(a, data):
    # Tuned = base plus a mixture of tiny, half-ULP-sized and large changes, some untouched, some NaN/Inf.
    b = data.draw(arrays(np.float32, a.shape, elements=finite_f32))
    keep = data.draw(arrays(np.bool_, a.shape))
    b = np.where(keep, a, b).astype(np.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ta, tb = torch.from_numpy(a.copy()).to(dtype), torch.from_numpy(b.copy()).to(dtype)
        ref = reference.elementwise(ta.float().numpy(), tb.float().numpy())
        for use_kernel in PATHS:
            got = elementwise_metrics(ta, tb, use_kernel=use_kernel)
            assert_matches_reference(got, ref, 1e-9, (dtype, use_kernel))


def test_large_tensor_chunks_agree_with_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3_000_017, generator=g)
    b = a + (torch.rand(a.shape, generator=g) < 0.4) * torch.randn(a.shape, generator=g) * 1e-3
    ref = reference.elementwise(a.numpy(), b.numpy())
    for use_kernel in PATHS:
        got = elementwise_metrics(a, b, use_kernel=use_kernel)
        assert got["changed_bf16"] == ref["changed_bf16"] and got["ulp_hist"] == ref["ulp_hist"]
        assert got["delta_fro"] == pytest.approx(ref["delta_fro"], rel=1e-12)
        assert got["cosine"] == pytest.approx(ref["cosine"], rel=1e-12)


def _bits_to_bf16_tensor(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)


@pytest.mark.parametrize("poison", [False, True])
def test_bf16_blocks_against_reference(poison):
    # Several kernel blocks of bf16 bit patterns from the whole finite range (subnormals, both zeros, huge
    # values), with tuned = base moved by 1 to 300 ULPs, across zero, sign-flipped, or left alone. With
    # poison, some blocks hold a NaN or an Inf, which sends just those blocks down the general path.
    rng = np.random.default_rng(11)
    n = 4096 * 5 + 123
    a = rng.integers(0, 1 << 16, n, dtype=np.uint32)
    a = np.where((a & 0x7F80) == 0x7F80, a & ~np.uint32(0x4000), a).astype(np.int64)  # finite only
    kind = rng.integers(0, 5, n)
    step = rng.integers(-300, 301, n)
    b = a.copy()
    b = np.where(kind == 1, a ^ 0x8000, b)  # sign flip: +0 <-> -0 stays equal, the rest cross zero
    ordered_a = np.where(a & 0x8000, -(a & 0x7FFF), a)
    moved = np.clip(ordered_a + step, -0x7F7F, 0x7F7F)
    moved_bits = np.where(moved < 0, 0x8000 | -moved, moved)
    b = np.where(kind >= 2, moved_bits, b)
    a[:4], b[:4] = [0x0000, 0x8000, 0x0001, 0x8001], [0x8000, 0x0000, 0x8001, 0x0001]
    if poison:
        a[4096 + 7], b[2 * 4096 + 9], a[3 * 4096 + 1], b[3 * 4096 + 1] = 0x7FC0, 0xFF80, 0x7F80, 0x7F80
    ta, tb = _bits_to_bf16_tensor(a), _bits_to_bf16_tensor(b)
    ref = reference.elementwise(ta.float().numpy(), tb.float().numpy())
    for use_kernel in PATHS:
        assert_matches_reference(elementwise_metrics(ta, tb, use_kernel=use_kernel), ref, 1e-12, use_kernel)
