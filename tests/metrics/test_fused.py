"""The torch-free driver of the C kernel: chunking, thread count, empty pairs, mixed dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from tests import reference
from weightdiff.metrics import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C kernel is not built in this install")


def _run(a: np.ndarray, code_a: int, b: np.ndarray, code_b: int) -> dict:
    return fused.collect(fused.submit(a.ctypes.data, code_a, b.ctypes.data, code_b, a.size, 1e-5), a.size)


def test_chunks_add_up_to_the_whole(monkeypatch):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(10_007).astype(np.float32)
    b = (a + (rng.random(a.size) < 0.5) * rng.standard_normal(a.size) * 1e-3).astype(np.float32)
    whole = _run(a, 1, b, 1)
    monkeypatch.setattr(fused, "CHUNK", 1000)  # 11 chunks, the last one short, spread over the pool
    assert len(fused.submit(a.ctypes.data, 1, b.ctypes.data, 1, a.size, 1e-5)) == 11
    chunked = _run(a, 1, b, 1)
    ref = reference.elementwise(a, b)
    for key in ("changed_exact", "changed_bf16", "changed_atol", "ulp_hist", "nonfinite_base", "numel"):
        assert whole[key] == chunked[key] == ref[key], key
    for key in ("delta_fro", "base_fro", "cosine", "delta_max"):
        assert whole[key] == pytest.approx(ref[key], rel=1e-12)
        assert chunked[key] == pytest.approx(ref[key], rel=1e-12)


def test_mixed_dtypes_fp64_base_against_fp16_tuned():
    rng = np.random.default_rng(6)
    a = rng.standard_normal(5000)
    b = a.astype(np.float16)
    got = _run(a, 0, b, 2)
    # float64 values are compared as numbers against the exactly widened float16 ones.
    assert got["changed_exact"] == int(np.sum(a != b.astype(np.float64)))
    assert got["delta_fro"] == pytest.approx(
        float(np.sqrt(np.sum((b.astype(np.float64) - a) ** 2))), rel=1e-12
    )


def test_empty_pair():
    e = np.zeros(0, dtype=np.uint16)
    got = _run(e, 3, e, 3)
    assert got["numel"] == 0 and got["changed_exact"] == 0 and got["sparsity_bf16"] is None
    assert got["delta_max"] is None and got["cosine"] is None


def test_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fused.threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert fused.threads() >= 1
