"""Spectral metrics of one matrix pair (metrics.md section 2): principal-angle rotation of the top-k singular
subspaces, singular-value drift, principal-weight and low-magnitude mask overlaps, principal energy share and
the update's stable rank.

Pure: tensors in, numbers out; no I/O. All spectral arithmetic is float64 (or float32 products followed by a
float64 Rayleigh-Ritz step, see ``topk_svd_fast``), because fine-tuning rotates subspaces by hundredths of a
degree: principal angles come from sines for small angles and cosines for large ones, never from arccos of a
cosine near 1.

Solvers:
- ``exact``: full float64 SVD of both matrices (LAPACK on CPU, cuSOLVER on GPU). The definition itself.
- ``fast``: block subspace iteration for the top singular triplets with float32 products, iterated until the
  Ritz values and the subspace stop moving, finished by a float64 Rayleigh-Ritz step. The tuned matrix starts
  from the base's converged subspace, which it is close to, so it needs few iterations. Only the top k values
  are known, so ``sv_drift`` (full spectrum) is null.
- ``gram``: float64 eigendecomposition of the Gram matrix of the smaller side (see ``topk_svd_gram``); full
  spectrum, exact to float64 rounding for the leading triplets, and much faster than an SVD on GPUs.
- ``auto``: gram on GPUs; on CPUs exact for matrices whose smaller side is at most 2048, fast otherwise
  (docs/performance.md: the fast solver missed the angle tolerance on a 1536 x 8960 matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from weightdiff.metrics.elementwise import round_to_bf16

#: Matrices whose smaller side is at most this use the exact solver under ``auto`` on the CPU.
AUTO_EXACT_MAX_DIM = 2048


@dataclass(frozen=True)
class SpectralOptions:
    rank: int = 64
    principal_rank: int = 64
    alpha: float = 0.5
    solver: str = "auto"
    #: fast solver: stop when the top-k Ritz values move less than this (relative) and the subspace less than
    #: ``angle_tol`` radians between iterations.
    tol: float = 1e-8
    angle_tol: float = 1e-5
    max_iter: int = 60
    seed: int = 0


@dataclass
class SpectralResult:
    columns: dict[str, Any]
    vectors: dict[str, Any] = field(default_factory=dict)


@dataclass
class TopK:
    """Top singular triplets (float64): U (m x k), S (k,), V (n x k); ``full`` holds all values when known."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    full: torch.Tensor | None
    iterations: int = 0


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between span(A) and span(B), A and B with orthonormal columns.

    Cosines are the singular values of A^T B, sines those of B - A (A^T B); each angle is taken from whichever
    is better conditioned (arcsin below 45 degrees, arccos above), as scipy.linalg.subspace_angles does.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    M = A.T @ B
    cos = torch.linalg.svdvals(M).clamp(max=1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(B - A @ M).clamp(max=1.0)  # descending -> angles descending
    sin = sin.flip(0)
    k = min(cos.numel(), sin.numel())
    cos, sin = cos[:k], sin[:k]
    small = cos * cos >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def topk_svd_exact(W: torch.Tensor, k: int) -> TopK:
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return TopK(U[:, :k], S[:k], Vh[:k].T, S)


def topk_svd_gram(W: torch.Tensor, k: int) -> TopK:
    """Singular triplets from a float64 symmetric eigendecomposition of the Gram matrix of the smaller side.

    On GPUs this is several times faster than a float64 SVD and exact to float64 rounding for the leading
    triplets: the eigenvector error is about eps * sigma_1^2 / (sigma_k^2 - sigma_k+1^2), far below the angles
    reported. The full spectrum comes with it (small singular values carry an absolute error of about
    sqrt(eps) * sigma_1, negligible in ``sv_drift``).
    """
    W64 = W.to(torch.float64)
    m, n = W64.shape
    left = m < n
    gram = W64 @ W64.T if left else W64.T @ W64
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    s = evals.sqrt()
    top = evecs[:, :k]
    sk = s[:k]
    safe = torch.where(sk > 0, sk, torch.ones_like(sk))
    other = (W64.T @ top if left else W64 @ top) / safe
    # Re-orthonormalise the derived side (where sigma is tiny the division loses accuracy), keeping each
    # column's sign so that U diag(S) V^T still reconstructs W.
    q, r = torch.linalg.qr(other, mode="reduced")
    other = q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    U, V = (top, other) if left else (other, top)
    return TopK(U, sk, V, s)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def topk_svd_fast(W: torch.Tensor, k: int, opts: SpectralOptions, start: torch.Tensor | None = None) -> TopK:
    """Top-k singular triplets by block subspace iteration (see the module docstring).

    ``start``: an n x l orthonormal starting block for the right subspace (the base's result when solving the
    tuned matrix); otherwise a Gaussian block from a fixed seed, the same for base and tuned.
    """
    m, n = W.shape
    block = min(min(m, n), k + max(16, k // 2))
    W32 = W.to(torch.float32)
    W64 = W.to(torch.float64)
    if start is None:
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        start = torch.randn(n, block, generator=g, dtype=torch.float32).to(W.device)
    Vb = _orth(start.to(torch.float32))
    prev_S: torch.Tensor | None = None
    prev_U: torch.Tensor | None = None
    it = 0
    for it in range(1, opts.max_iter + 1):
        Qu = _orth(W32 @ Vb)
        Vb = _orth(W32.T @ Qu)
        if it % 2 and it < opts.max_iter:
            # The float64 Rayleigh-Ritz step (and the convergence test) every other iteration: it costs more
            # than a power step and the test needs two successive estimates anyway.
            continue
        # Rayleigh-Ritz in float64 on the current left block: values accurate to second order in its error.
        Q64 = _orth(W64 @ Vb.to(torch.float64))
        Ub, S, Vh = torch.linalg.svd(Q64.T @ W64, full_matrices=False)
        U = Q64 @ Ub[:, :k]
        Sk = S[:k]
        if prev_S is not None and prev_U is not None:
            dS = float(((Sk - prev_S).abs() / Sk.clamp(min=torch.finfo(torch.float64).tiny)).max())
            dU = float(principal_angles(prev_U, U).max())
            if dS < opts.tol and dU < opts.angle_tol:
                break
        prev_S, prev_U = Sk, U
        Vb = Vh.T.to(torch.float32)
    return TopK(U, Sk, Vh[:k].T, None, it)


def _mask_threshold_desc(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """Value at 1-based position ceil(alpha N) of ``values`` sorted descending."""
    flat = values.reshape(-1)
    pos = math.ceil(alpha * flat.numel())
    return torch.kthvalue(flat, flat.numel() - pos + 1).values


def _mask_threshold_asc(values: torch.Tensor, alpha: float) -> torch.Tensor:
    flat = values.reshape(-1)
    pos = math.ceil(alpha * flat.numel())
    return torch.kthvalue(flat, pos).values


def _spectral_norm(D: torch.Tensor, opts: SpectralOptions, solver: str) -> float:
    if solver == "exact":
        return float(torch.linalg.matrix_norm(D, ord=2))
    if solver == "gram":
        gram = D.T @ D if D.shape[1] <= D.shape[0] else D @ D.T
        return math.sqrt(max(0.0, float(torch.linalg.eigvalsh(gram)[-1])))
    # Largest singular value by a small block iteration: converges fast because only sigma_1 is needed and
    # the block's other vectors absorb near-ties.
    # sigma_1 to about 1e-7 relative is plenty for a stable rank; its vector need not converge.
    res = topk_svd_fast(D, 1, SpectralOptions(tol=1e-7, angle_tol=math.inf, max_iter=40, seed=opts.seed + 1))
    return float(res.S[0])


def choose_solver(opts: SpectralOptions, shape: tuple[int, int], device: torch.device) -> str:
    if opts.solver != "auto":
        return opts.solver
    if device.type == "cuda":
        return "gram"
    if min(shape) <= AUTO_EXACT_MAX_DIM:
        return "exact"
    return "fast"


def spectral_metrics(base: torch.Tensor, tuned: torch.Tensor, opts: SpectralOptions) -> SpectralResult:
    """All section-2 columns for one 2-D pair (both dims >= 2), plus the vectors for the --spectra table."""
    m, n = base.shape
    k = min(opts.rank, m, n)
    r = min(opts.principal_rank, m, n)
    solver = choose_solver(opts, (m, n), base.device)
    W0 = base.to(torch.float64)
    W1 = tuned.to(torch.float64)
    finite = bool(torch.isfinite(W0).all()) and bool(torch.isfinite(W1).all())
    cols: dict[str, Any] = {"rank_k": k, "svd_solver": solver}
    if not finite:
        # An SVD of a matrix with NaN or Inf is meaningless; the element-wise columns already count them.
        cols["svd_solver"] = None
        return SpectralResult(cols)
    need = max(k, r)
    if solver == "exact":
        t0, t1 = topk_svd_exact(W0, need), topk_svd_exact(W1, need)
    elif solver == "gram":
        t0, t1 = topk_svd_gram(W0, need), topk_svd_gram(W1, need)
    else:
        t0 = topk_svd_fast(W0, need, opts)
        t1 = topk_svd_fast(W1, need, opts, start=t0.V)
    U0, S0, V0 = t0.U[:, :k], t0.S[:k], t0.V[:, :k]
    U1, S1, V1 = t1.U[:, :k], t1.S[:k], t1.V[:, :k]
    ang_u = torch.rad2deg(principal_angles(U0, U1))
    ang_v = torch.rad2deg(principal_angles(V0, V1))
    cols["angle_u_max_deg"] = float(ang_u.max())
    cols["angle_u_mean_deg"] = float(ang_u.mean())
    cols["angle_v_max_deg"] = float(ang_v.max())
    cols["angle_v_mean_deg"] = float(ang_v.mean())
    if t0.full is not None and t1.full is not None:
        n0 = float(torch.linalg.vector_norm(t0.full))
        cols["sv_drift"] = float(torch.linalg.vector_norm(t1.full - t0.full)) / n0 if n0 > 0 else None
    else:
        cols["sv_drift"] = None
    s0_norm = float(torch.linalg.vector_norm(S0))
    cols["sv_drift_topk"] = float(torch.linalg.vector_norm(S1 - S0)) / s0_norm if s0_norm > 0 else None
    cols["sigma1_rel_change"] = float((S1[0] - S0[0]) / S0[0]) if float(S0[0]) > 0 else None
    e0 = float(S0.sum())
    cols["topk_energy_rel_change"] = (float(S1.sum()) - e0) / e0 if e0 > 0 else None

    # Masks (metrics.md section 2): U = elements changed in bf16; P = largest |rank-r reconstruction|;
    # L = smallest |W0|. Thresholds are order statistics, ties included, and densities are measured.
    N = m * n
    update = round_to_bf16(base) != round_to_bf16(tuned)
    n_update = int(update.sum())
    R = (t0.U[:, :r] * t0.S[:r]) @ t0.V[:, :r].T
    absR = R.abs()
    P = absR >= _mask_threshold_desc(absR, opts.alpha)
    absW0 = W0.abs()
    L = absW0 <= _mask_threshold_asc(absW0, opts.alpha)
    cols["principal_mask_density"] = int(P.sum()) / N
    cols["lowmag_mask_density"] = int(L.sum()) / N
    cols["principal_overlap"] = int((update & P).sum()) / n_update if n_update else None
    cols["lowmag_overlap"] = int((update & L).sum()) / n_update if n_update else None

    D = W1 - W0
    d2 = float(torch.dot(D.reshape(-1), D.reshape(-1)))
    if d2 > 0:
        block = U0.T @ D @ V0
        cols["principal_energy"] = float(torch.dot(block.reshape(-1), block.reshape(-1))) / d2
        s1 = _spectral_norm(D, opts, solver)
        cols["delta_stable_rank"] = d2 / (s1 * s1) if s1 > 0 else None
    else:
        cols["principal_energy"] = None
        cols["delta_stable_rank"] = None
    cols["principal_energy_baseline"] = k * k / N

    vectors = {
        "sv_base": (t0.full if t0.full is not None else S0).tolist(),
        "sv_tuned": (t1.full if t1.full is not None else S1).tolist(),
        "angles_u_deg": ang_u.tolist(),
        "angles_v_deg": ang_v.tolist(),
    }
    return SpectralResult(cols, vectors)


SPECTRA_SCHEMA_FIELDS = [
    pa.field("name", pa.string(), nullable=False),
    pa.field("series", pa.string(), nullable=False),
    pa.field("index", pa.int64(), nullable=False),
    pa.field("value", pa.float64(), nullable=False),
]


def spectra_table(entries: list[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    """Long-format companion table: one row per (tensor, series, index) with series in sv_base, sv_tuned,
    angles_u_deg, angles_v_deg."""
    from weightdiff.schema import encode_metadata

    names: list[str] = []
    series: list[str] = []
    index: list[int] = []
    value: list[float] = []
    for e in entries:
        for key in ("sv_base", "sv_tuned", "angles_u_deg", "angles_v_deg"):
            for i, v in enumerate(e.get(key, [])):
                names.append(e["name"])
                series.append(key)
                index.append(i)
                value.append(float(v))
    schema = pa.schema(SPECTRA_SCHEMA_FIELDS, metadata=encode_metadata(metadata))
    return pa.table({"name": names, "series": series, "index": index, "value": value}, schema=schema)


def matrix_spectrum(W: torch.Tensor, k: int, full: bool) -> dict[str, Any]:
    """Single-matrix spectral summary for ``weightdiff spectrum`` (float64 throughout).

    All singular values come from the eigenvalues of the float64 Gram matrix of the smaller side: much cheaper
    than an SVD, exact to float64 rounding relative to sigma_1^2, which is ample for the top values, the norms
    and the entropy-based effective rank. Returns the top ``k`` values (all with ``full``).
    """
    W64 = W.to(torch.float64)
    m, n = W64.shape
    gram = W64.T @ W64 if n <= m else W64 @ W64.T
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)
    s = eig.sqrt()
    fro2 = float(torch.dot(W64.reshape(-1), W64.reshape(-1)))
    spec = float(s[0]) if s.numel() else 0.0
    kk = min(k, s.numel())
    p = s / s.sum() if float(s.sum()) > 0 else s
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum()) if nz.numel() else 0.0
    return {
        "rank_k": kk,
        "spectral_norm": spec,
        "frobenius_norm": math.sqrt(fro2),
        "stable_rank": fro2 / (spec * spec) if spec > 0 else None,
        "effective_rank": math.exp(entropy) if nz.numel() else None,
        "topk_energy_share": float((eig[:kk]).sum()) / fro2 if fro2 > 0 else None,
        "singular_values": (s if full else s[:kk]).tolist(),
        "_all": s,
    }
