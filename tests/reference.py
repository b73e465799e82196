"""An independent, deliberately plain float64 numpy implementation of metrics.md, used only by the tests.

It shares no code with weightdiff: bf16 rounding is done on float32 bit patterns with numpy integer
arithmetic, norms with numpy float64 sums, angles with scipy.linalg.subspace_angles.
"""

from __future__ import annotations

import math

import numpy as np


def bf16_bits_from_f32(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest-even) and return the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(x.astype(np.float32))
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[nan] = 0x7FC0
    return rounded


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ordered(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.int64)
    return np.where(b & 0x8000, -(b & 0x7FFF), b)


def elementwise(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> dict:
    """metrics.md section 1 for float32-representable inputs (bf16, fp16, fp32 upcast to float32)."""
    a32 = a.astype(np.float32).ravel()
    b32 = b.astype(np.float32).ravel()
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    n = a64.size
    changed_exact = int(np.sum(~(a64 == b64)))
    ab, bb = bf16_bits_from_f32(a32), bf16_bits_from_f32(b32)
    av, bv = bf16_value(ab), bf16_value(bb)
    changed_b = ~(av == bv)
    with np.errstate(invalid="ignore"):
        d = b64 - a64
        changed_atol = int(np.sum(~(np.abs(d) <= atol)))
    hist = [0] * 9
    both_fin_b = np.isfinite(av) & np.isfinite(bv)
    for dist in np.abs(ordered(bb) - ordered(ab))[changed_b & both_fin_b]:
        hist[min(8, max(0, math.ceil(math.log2(int(dist)))))] += 1
    fa, fb = np.isfinite(a64), np.isfinite(b64)
    both = fa & fb
    base_fro = math.sqrt(float(np.sum(a64[fa] ** 2)))
    delta_fro = math.sqrt(float(np.sum(d[both] ** 2)))
    na = math.sqrt(float(np.sum(a64[both] ** 2)))
    nb = math.sqrt(float(np.sum(b64[both] ** 2)))
    return {
        "numel": n,
        "changed_exact": changed_exact,
        "changed_bf16": int(changed_b.sum()),
        "changed_atol": changed_atol,
        "hidden_by_bf16": changed_exact - int(changed_b.sum()),
        "ulp_hist": hist,
        "delta_fro": delta_fro,
        "base_fro": base_fro,
        "delta_max": float(np.max(np.abs(d[both]))) if both.any() else None,
        "cosine": float(np.sum(a64[both] * b64[both])) / (na * nb) if na * nb > 0 else None,
        "nonfinite_base": int((~fa).sum()),
        "nonfinite_tuned": int((~fb).sum()),
    }


def spectral(a: np.ndarray, b: np.ndarray, k: int = 64, r: int = 64, alpha: float = 0.5) -> dict:
    """metrics.md section 2 from full float64 numpy SVDs and scipy's principal angles."""
    from scipy.linalg import subspace_angles

    a = a.astype(np.float64)
    b = b.astype(np.float64)
    m, n = a.shape
    k = min(k, m, n)
    r = min(r, m, n)
    U0, S0, V0t = np.linalg.svd(a, full_matrices=False)
    U1, S1, V1t = np.linalg.svd(b, full_matrices=False)
    au = np.rad2deg(subspace_angles(U0[:, :k], U1[:, :k]))
    av = np.rad2deg(subspace_angles(V0t[:k].T, V1t[:k].T))
    N = m * n
    ab, bb = bf16_bits_from_f32(a.astype(np.float32)), bf16_bits_from_f32(b.astype(np.float32))
    upd = ~(bf16_value(ab) == bf16_value(bb)).reshape(m, n)
    R = (U0[:, :r] * S0[:r]) @ V0t[:r]
    absR = np.abs(R).ravel()
    pos = math.ceil(alpha * N)
    tP = np.sort(absR)[::-1][pos - 1]
    P = np.abs(R) >= tP
    tL = np.sort(np.abs(a).ravel())[pos - 1]
    L = np.abs(a) <= tL
    D = b - a
    d2 = float(np.sum(D * D))
    block = U0[:, :k].T @ D @ V0t[:k].T
    nu = int(upd.sum())
    return {
        "rank_k": k,
        "angle_u_max_deg": float(au.max()),
        "angle_u_mean_deg": float(au.mean()),
        "angle_v_max_deg": float(av.max()),
        "angle_v_mean_deg": float(av.mean()),
        "sv_base": S0,
        "sv_tuned": S1,
        "sv_drift": float(np.linalg.norm(S1 - S0) / np.linalg.norm(S0)),
        "sv_drift_topk": float(np.linalg.norm(S1[:k] - S0[:k]) / np.linalg.norm(S0[:k])),
        "sigma1_rel_change": float((S1[0] - S0[0]) / S0[0]),
        "topk_energy_rel_change": float((S1[:k].sum() - S0[:k].sum()) / S0[:k].sum()),
        "principal_overlap": float((upd & P).sum()) / nu if nu else None,
        "principal_mask_density": float(P.sum()) / N,
        "lowmag_overlap": float((upd & L).sum()) / nu if nu else None,
        "lowmag_mask_density": float(L.sum()) / N,
        "principal_energy": float(np.sum(block**2)) / d2 if d2 else None,
        "principal_energy_baseline": k * k / N,
        "delta_stable_rank": d2 / float(np.linalg.norm(D, 2)) ** 2 if d2 else None,
    }
