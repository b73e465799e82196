"""Spectral metrics of one matrix pair (metrics.md section 2): principal-angle rotation of the top-k singular
subspaces, singular-value drift, principal-weight and low-magnitude mask overlaps, principal energy share and
the update's stable rank.

Pure: tensors in, numbers out; no I/O. All spectral arithmetic is float64 (or float32 products followed by a
float64 Rayleigh-Ritz step, see ``topk_svd_fast``), because fine-tuning rotates subspaces by hundredths of a
degree: principal angles come from sines for small angles and cosines for large ones, never from arccos of a
cosine near 1.

Solvers:
- ``exact``: full float64 SVD of both matrices (LAPACK on CPU, cuSOLVER on GPU). The definition itself.
- ``fast``: randomized block Krylov iteration for the top singular triplets (``topk_svd_fast``): float32
  products grow the space, a float64 Rayleigh-Ritz step extracts the triplets, and it stops when the top-k
  values moved less than 1e-6 (relative) since the previous check (through the Gram matrix the space restarts
  from its best vectors every few steps). Base and tuned start from the same random block, so their errors
  are alike and cancel in the angles between them. Only the top k values are known (unless the space fills
  the whole side), so ``sv_drift`` (full spectrum) is null. A pair whose iteration reaches its step limit
  first is computed by ``gram`` instead. The update's sigma_1 (for its stable rank) comes from a short float32
  run of the same solver on dW, which moves to dW's Gram matrix (bf16 tiles) if it is slow to settle and
  every entry of dW is a bf16 value.
- ``gram``: float64 eigendecomposition of the Gram matrix of the smaller side (see ``topk_svd_gram``); full
  spectrum, exact to float64 rounding for the leading triplets, and much faster than an SVD on GPUs.
- ``auto``: gram on GPUs; on CPUs gram for matrices whose smaller side is at most 512, fast otherwise
  (docs/performance.md has the measured speed and accuracy of each).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from weightdiff.metrics.elementwise import round_to_bf16

#: Matrices whose smaller side is at most this use the gram solver under ``auto`` on the CPU: there a float64
#: Gram matrix and its eigendecomposition cost less than the fast solver's iteration (512 x 2048: 0.10 s
#: against 0.15 s; the exact SVD, 0.56 s), with the full spectrum and float64 accuracy. At 1024 the fast
#: solver is ahead (0.25 s against 0.33 s).
AUTO_GRAM_MAX_DIM = 512
#: fast solver: default Krylov block (columns per step) when k is larger.
KRYLOV_BLOCK = 32
#: fast solver: Ritz values below this fraction of sigma_1 are not checked for convergence (float32 products
#: leave them noise at about 1e-7 sigma_1, so they never settle to a relative tolerance).
RITZ_FLOOR = 1e-4
#: fast solver: the cost of a convergence check (an eigvalsh of the p x p projected matrix, about 4/3 p^3 flops at a
#: ninth of a matrix product's speed: 42 ms for p = 800 on the 2-core CPU) in matrix-product flops, per p^3.
CHECK_FLOPS_PER_P3 = 12
#: fast solver: a check runs every step only while it costs less than this fraction of a step; otherwise checks
#: are spaced out by as many steps as the values could not settle in (``_steps_to_next_check``). A check that
#: cannot pass is wasted whatever it costs: at 1 (every step while a check costs less than a step) the solver
#: ran 3-10% slower on pure noise and 0-8% on trained-like spectra, with the same steps and results
#: (docs/performance.md).
CHECK_CHEAP_FRACTION = 0.25
#: fast solver: the fastest shrink per step assumed for the Ritz values' moves when spacing out checks (measured:
#: 0.14 to 0.45 near convergence).
FASTEST_SHRINK = 0.1
#: fast solver: a check is likely to pass when the values moved less than this many times the tolerance per step
#: at the check before (moves shrink by 0.14 to 0.45 a step near convergence).
LIKELY_PASS = 10
#: fast solver: the steps a base matrix is expected to take (trained weights: 12 to 15), for choosing how to
#: apply W^T W; a tuned matrix expects as many as its base took.
EXPECTED_STEPS = 16
#: fast solver: matrices at least this many times taller than wide may apply W^T W through their Gram matrix.
GRAM_OPERATOR_ASPECT = 4
#: fast solver, bf16-stored matrices on CPUs with AMX (``bf16_gram_available``): seconds per unit on the 2-core
#: CPU (docs/performance.md) of a step through W (per m n b), a step through the Gram matrix (per n^2 b), and the
#: Gram matrix formed by oneDNN's bf16 tiles (per m n^2; three times faster than the float32 one).
STEP_DIRECT_S = 2.5e-11
STEP_GRAM_S = 1.1e-11
GRAM_BF16_S = 2.0e-12
#: fast solver, when W^T W is applied through its Gram matrix (so that a step's products cost less than its
#: float64 Gram-Schmidt on a large basis): after this many steps beyond the kept vectors the space is restarted
#: from its top k + k/2 Ritz vectors (thick restart), which bounds the basis at 320 columns for k = 64.
RESTART_STEPS = 7
#: fast solver: after a restart the values converge more slowly per step, so the move that stops the iteration
#: must be this much smaller (measured: the same accuracy as without restarts, docs/performance.md).
RESTARTED_TOL_FACTOR = 0.15
#: fast solver: a run that may restart has this many times ``SpectralOptions.max_iter`` steps.
RESTARTED_MAX_ITER_FACTOR = 2


@dataclass(frozen=True)
class SpectralOptions:
    rank: int = 64
    principal_rank: int = 64
    alpha: float = 0.5
    solver: str = "auto"
    #: fast solver: stop when the top-k Ritz values moved less than this (relative) since the previous check (one
    #: Krylov step, or several on large spaces), or after ``max_iter`` steps (twice as many when the basis
    #: restarts, see ``topk_svd_fast``).
    tol: float = 1e-6
    max_iter: int = 40
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
    restarts: int = 0
    #: False when an iterative solver stopped at its step limit before its values settled.
    converged: bool = True


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


#: CholeskyQR2 serves blocks whose Cholesky factor's diagonal spans less than this ratio (condition number below
#: about 1e5, where two passes leave the columns orthonormal to float64 rounding); others take Householder QR.
CHOLQR_MAX_RATIO = 1e-5


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of the tall Y (float64), as Q of Y = Q R with R upper triangular.

    CholeskyQR2 (R from the Cholesky factor of Y^T Y, twice): three small products instead of a Householder QR,
    which on a 2048 x 32 block took a millisecond, a tenth of a Krylov step. A block that is rank-deficient or
    ill-conditioned (a Krylov space running out of directions) fails the Cholesky factorisation or the
    conditioning test and goes to Householder QR, which completes any basis."""
    if Y.shape[0] >= Y.shape[1]:
        Q = Y
        for _ in range(2):
            R, info = torch.linalg.cholesky_ex(Q.T @ Q, upper=True)
            d = R.diagonal()
            if int(info) != 0 or not bool(d.min() > CHOLQR_MAX_RATIO * d.max()):
                return torch.linalg.qr(Y, mode="reduced").Q
            Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
        return Q
    return torch.linalg.qr(Y, mode="reduced").Q


def topk_svd_fast(
    W: torch.Tensor,
    k: int,
    opts: SpectralOptions,
    block: int | None = None,
    float64_ritz: bool = True,
    first_check: int = 3,
    expected_steps: int = EXPECTED_STEPS,
    bf16_exact: bool = False,
    gram_after: int | None = None,
) -> TopK:
    """Top-k singular triplets by randomized block Krylov iteration with a float64 Rayleigh-Ritz step.

    The right-side Krylov space span{X, A X, A^2 X, ...} of A = W^T W is grown a block at a time from a
    Gaussian block drawn from ``opts.seed`` (the same for base and tuned, so that the two matrices' errors
    are alike and largely cancel in the angles between their subspaces). The basis Q is kept orthonormal in
    float64 (classical Gram-Schmidt twice; the first pass's coefficients are the new columns of G, computed
    anyway); the products with W that grow it are float32. After a few blocks the top-k Ritz values (square
    roots of the eigenvalues of G = Q^T W^T W Q, from the float32 products: about 1e-7 relative, well under
    the 1e-6 default tolerance) are checked; they rise monotonically towards the singular values, and the
    iteration stops once they moved less than ``opts.tol`` (relative) since the previous check. Checks run
    every step while one (an eigvalsh of G) costs less than ``CHECK_CHEAP_FRACTION`` of a step (a small
    space); on a larger space a check is skipped for as many steps as the values could not converge in even
    if their moves shrank by ``FASTEST_SHRINK`` a step, judged from their average move per step since the
    check before. Over several
    steps the stopping rule is stricter than the per-step one, never looser: Ritz values of nested spaces
    only rise, so a move under tol across several steps means each step moved less. A Krylov space
    converges much faster than subspace iteration where the spectrum is dense around k, as in trained
    weights.

    A matrix at least ``GRAM_OPERATOR_ASPECT`` times taller than wide (an embedding or an LM head) applies A
    through its float32 Gram matrix W^T W where ``expected_steps`` products with W would cost more than
    forming it (``_gram_operator_pays``): the skinny products stream the whole matrix from memory each step.
    ``bf16_exact``: every entry of W is a bfloat16 value (bf16 storage); on a CPU with AMX the Gram matrix then
    comes from bf16 tile products with float32 accumulation, exact products of the same entries and about
    three times faster than float32 ones, so that it pays for most shapes, not only tall ones.

    Through the Gram matrix a step's products are cheap, and the float64 Gram-Schmidt and checks on a basis of
    p columns dominate; there the basis restarts (Krylov-Schur thick restart) from its top k + k/2 Ritz vectors
    every ``RESTART_STEPS`` steps, which bounds it at 320 columns for k = 64 instead of up to 900 on a dense
    spectrum. The restarted space holds the best vectors found so far and its Ritz values only rise, so the
    stopping rule still holds; it converges more slowly per step, and once restarted the iteration stops only
    on a move under ``RESTARTED_TOL_FACTOR`` times the tolerance. ``TopK.restarts`` counts them;
    ``TopK.converged`` is False when the step limit came before the values settled (``spectral_metrics`` then
    takes the ``gram`` solver for that pair).

    The result comes from a float64 Rayleigh-Ritz step on the top k + k/2 Ritz vectors of that space: one
    float64 product of W with a few dozen columns, then the eigendecomposition of their small Gram matrix,
    accurate to float64 rounding relative to sigma_1^2, far below the tolerances for the top k (see
    ``topk_svd_gram``). ``float64_ritz=False`` skips that step (values to about 1e-7), enough where only
    sigma_1 is wanted for a ratio. A space that fills the whole side gives every value, as ``gram`` does.
    ``first_check``: the step at which checking may start (a tuned matrix converges about when its base did,
    so it skips the checks before; it still stops only on a passed check).

    ``gram_after``: for an operator whose step count is not known in advance (the update's sigma_1: a few
    steps on a trained update, a dozen or more on a noise-like one). W is applied directly; at the first
    check from that step on, if the values still move by more than ``LATE_GRAM_MOVE`` times the tolerance a
    step and W's entries are all bfloat16 values (checked then, one pass over W), the Gram matrix is formed
    from bf16 tiles and the iteration goes on through it, with restarts, in the same Krylov space: the
    operator is the same, only its products are cheaper. Otherwise it goes on through W.

    ``block``: columns added per step, by default ``min(k, KRYLOV_BLOCK)``. Smaller blocks reach the
    tolerance with a smaller space (fewer products in all, and Gram-Schmidt and Ritz checks on fewer
    columns) at the price of more steps: on k = 64, 32 columns a step beat 64 on every shape measured
    (docs/performance.md), while 16 ran out of steps on pure noise. A block Krylov space finds at most
    ``block`` vectors of an exactly repeated singular value, which trained weights do not have.
    """
    m, n = W.shape
    if n > m:
        # The basis lives on the smaller side: fewer rows to orthogonalise, and a smaller space to fill.
        t = topk_svd_fast(
            W.T, k, opts, block, float64_ritz, first_check, expected_steps, bf16_exact, gram_after
        )
        return TopK(t.V, t.S, t.U, t.full, t.iterations, t.restarts, t.converged)
    b = max(1, min(block if block is not None else min(k, KRYLOV_BLOCK), n))
    W32 = W.to(torch.float32)
    # bf16 tiles where they pay (the magnitude check, a pass over W, only then); else the float32 rule.
    tiles = (
        bf16_exact
        and W.device.type == "cpu"
        and bf16_gram_available()
        and _gram_operator_pays(m, n, b, expected_steps, tiles=True)
        and _tile_safe(W32)
    )
    G32 = _gram32(W32, tiles) if tiles or _gram_operator_pays(m, n, b, expected_steps) else None
    late = gram_after if G32 is None and W.device.type == "cpu" else None
    g = torch.Generator(device="cpu").manual_seed(opts.seed)
    Y64 = torch.randn(n, b, generator=g, dtype=torch.float32).to(W.device, torch.float64)
    # Preallocated: the basis Q and G = Q^T (W^T W) Q (from the float32 products), filled p columns so far.
    cap = min(n, b * opts.max_iter)
    # Thick restarts (through the Gram matrix only): with the operator that cheap, a step's cost is the float64
    # Gram-Schmidt and checks on the basis, which grow with it; through W the extra steps would cost more.
    keep = min(n, k + max(8, k // 2))
    cycle = keep + RESTART_STEPS * b if keep + RESTART_STEPS * b < cap else None  # None: no room to restart
    restart_at = cycle if G32 is not None else None
    room = cap if restart_at is None else restart_at  # a late Gram matrix restarts within cap columns
    Qbuf = torch.empty(n, room, dtype=torch.float64, device=W.device)
    Gbuf = torch.empty(room, room, dtype=torch.float64, device=W.device)
    p = 0
    coef: torch.Tensor | None = None  # Q^T Y64 for the block to add, when already known
    prev: torch.Tensor | None = None
    prev_step = 0
    next_check = max(3, first_check - 1)
    # The eigenvectors of G, when the last check computed them: a check that is likely to pass (the values
    # moved little at the one before, or a tuned matrix reached its base's step count) takes eigh instead of
    # eigvalsh, and if it passes the final step reuses them instead of decomposing G again.
    last_vecs: torch.Tensor | None = None
    likely = False
    restarts = 0
    settled = False
    step = 0
    # Restarted, the steps are cheaper and more of them are needed (pure noise 12288 x 4096: 38 against 32).
    restarted_limit = RESTARTED_MAX_ITER_FACTOR * opts.max_iter
    limit = opts.max_iter if restart_at is None else restarted_limit
    while step < limit:
        step += 1
        Y64 = _orthogonalise(Qbuf[:, :p], Y64, coef)[:, : cap - p]
        # One step of A = W^T W, in float32: it extends G and is the next block.
        Y32 = Y64.to(torch.float32)
        AY = (G32 @ Y32 if G32 is not None else W32.T @ (W32 @ Y32)).to(torch.float64)
        q = p + Y64.shape[1]
        Qbuf[:, p:q] = Y64
        C = Qbuf[:, :q].T @ AY  # Q^T A Y: G's new columns, and the next block's first Gram-Schmidt pass
        Gbuf[:p, p:q] = C[:p]
        Gbuf[p:q, :p] = C[:p].T
        Gbuf[p:q, p:q] = (C[p:] + C[p:].T) / 2
        p = q
        if p >= cap:
            break
        if step >= next_check:
            likely = likely or (first_check > 3 and step >= first_check)
            if likely:
                evals, last_vecs = torch.linalg.eigh(Gbuf[:p, :p])
            else:
                evals = torch.linalg.eigvalsh(Gbuf[:p, :p])
            top = evals.flip(0)[:k].clamp(min=0).sqrt()
            next_check = step + 1
            if prev is not None and prev.numel() == top.numel():
                # Values under RITZ_FLOOR * sigma_1 are float32 noise (a rank-deficient or zero matrix): they
                # never settle, and they are not checked.
                live = top > RITZ_FLOOR * top[0]
                moved = float(((top - prev).abs()[live] / top[live]).max()) if bool(live.any()) else 0.0
                if moved < opts.tol * (RESTARTED_TOL_FACTOR if restarts else 1.0):
                    settled = True
                    break
                per_step = moved / (step - prev_step)
                likely = per_step < LIKELY_PASS * opts.tol
                if late is not None and step >= late:
                    # Far from settled (a noise-like operator): the remaining steps go through the Gram matrix.
                    if per_step > LATE_GRAM_MOVE * opts.tol and _late_tiles_ok(W32):
                        G32 = _gram32(W32, tiles=True)
                        if cycle is not None:
                            restart_at, limit = cycle, restarted_limit
                    late = None
                # A step's products (through W or its Gram matrix) and Gram-Schmidt (float64, half speed).
                step_flops = (2 * n * n * b if G32 is not None else 4 * m * n * b) + 12 * n * p * b
                cheap = CHECK_FLOPS_PER_P3 * p**3 <= CHECK_CHEAP_FRACTION * step_flops
                next_check = step + _steps_to_next_check(per_step, cheap, opts.tol)
            prev, prev_step = top, step
        # Column scaling keeps the block's magnitudes near 1; the same scaling turns Q^T A Y into the next
        # block's first Gram-Schmidt coefficients.
        norms = AY.norm(dim=0).clamp(min=torch.finfo(torch.float64).tiny)
        Y64, coef = AY / norms, C / norms
        if restart_at is not None and p + b > restart_at:
            # Thick restart (Krylov-Schur): the next block is first made orthogonal to the whole space, then the
            # space shrinks to its top Ritz vectors. A V for those vectors lies in their span plus that block,
            # so the new space is again a Krylov space, holds the best vectors found so far, and its Ritz values
            # only rise from theirs (G restarts as their diagonal of values).
            Y64, coef = _orthogonalise(Qbuf[:, :p], Y64, coef), None
            if last_vecs is None:  # else this step's check took eigh: evals and last_vecs are its pair
                evals, last_vecs = torch.linalg.eigh(Gbuf[:p, :p])
            top = last_vecs.flip(1)[:, :keep]
            Qbuf[:, :keep] = Qbuf[:, :p] @ top
            Gbuf[:keep, :keep] = torch.diag(evals.flip(0)[:keep])
            p, restarts = keep, restarts + 1
        last_vecs = None  # G changes below: the check's eigenvectors no longer describe it
    Q, G = Qbuf[:, :p], Gbuf[:p, :p]
    full = p >= n
    settled = settled or full
    if not float64_ritz:
        evals, evecs = torch.linalg.eigh(G)
        S = evals.flip(0).clamp(min=0).sqrt()
        kk = min(k, S.numel())
        V = Q @ evecs.flip(1)[:, :kk]
        U = _left_vectors((W32 @ V.to(torch.float32)).to(torch.float64), S[:kk])
        return TopK(U, S[:kk], V, S if full else None, step, restarts, settled)
    if full:
        Z = Q  # the whole space: Rayleigh-Ritz on it is the exact decomposition
    else:
        evecs = (last_vecs if last_vecs is not None else torch.linalg.eigh(G).eigenvectors).flip(1)
        Z = Q @ evecs[:, : min(Q.shape[1], k + max(8, k // 2))]
    BZ = _matmul64(W, Z)
    evals, evecs = torch.linalg.eigh(BZ.T @ BZ)
    S = evals.flip(0).clamp(min=0).sqrt()
    kk = min(k, S.numel())
    Vs = evecs.flip(1)[:, :kk]
    return TopK(_left_vectors(BZ @ Vs, S[:kk]), S[:kk], Z @ Vs, S if full else None, step, restarts, settled)


def _orthogonalise(Q: torch.Tensor, Y: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    """An orthonormal basis of Y's part orthogonal to Q's columns (float64): classical Gram-Schmidt twice (one
    pass loses orthogonality, and with one pass a 32000 x 2048 noise matrix never converged), then a QR within
    the block. ``coef``: Q^T Y when already known (the fast solver's G columns), saving the first product."""
    Y = Y - Q @ (coef if coef is not None else Q.T @ Y)
    Y = Y - Q @ (Q.T @ Y)
    return _orth(Y)


def _steps_to_next_check(per_step: float, cheap: bool, tol: float) -> int:
    """Steps until the fast solver's next convergence check, after the top values moved ``per_step`` (relative,
    per step) since the previous one.

    Every step while a check is ``cheap`` (costs less than a step). Later: the moves shrink by a factor of
    0.14 to 0.45 a step as the values converge (measured on trained and noise spectra, docs/performance.md),
    and the next check comes at the first step at which a move that shrank by ``FASTEST_SHRINK`` each step
    could be at or under ``tol``."""
    if cheap or per_step <= tol:
        return 1
    return max(1, int(math.log(tol / per_step) / math.log(FASTEST_SHRINK)))


def _gram_operator_pays(m: int, n: int, b: int, steps: int, tiles: bool = False) -> bool:
    """Whether the fast solver should apply W^T W (W m x n, m >= n) through its Gram matrix for ``steps`` steps
    of ``b`` columns; ``tiles``: the Gram matrix would come from bf16 tile products (``_gram32``).

    With tiles, from the measured costs: forming it costs ``GRAM_BF16_S`` m n^2 and saves
    ``STEP_DIRECT_S`` m n b - ``STEP_GRAM_S`` n^2 b a step (on the 2-core CPU it pays on 2048 x 2048 and
    5632 x 2048 matrices, not on 4096 x 4096 ones that converge in 15 steps).

    Forming W^T W costs about 1.25 m n^2 flops in large products (``_gram32``); a step costs 4 m n b flops in
    two skinny products. On a matrix much taller than wide those stream the whole matrix from memory and run
    about three times slower per flop than the large products (2-core CPU: 32000 x 2048, 81 ms a step of 32
    columns against 0.60 s for the Gram matrix), so the Gram matrix pays after about n / (8 b) steps; each of
    its own steps costs 2 n^2 b flops, a small fraction. Squarer matrices gain little: their steps stay in
    cache."""
    if tiles:
        return GRAM_BF16_S * m * n * n < steps * b * n * (STEP_DIRECT_S * m - STEP_GRAM_S * n)
    return m >= GRAM_OPERATOR_ASPECT * n and 8 * b * steps > n


_GRAM_BLOCKS = 4


def _gram32(W32: torch.Tensor, tiles: bool = False) -> torch.Tensor:
    """W^T W for a float32 W, from the products of column blocks on and above the diagonal (10 of the 16 for
    4 blocks), each mirrored below: 27% less time than one full product on a 32000 x 2048 matrix. The entries
    are the same dot products (they may round differently from one full product), and G is exactly
    symmetric.

    ``tiles``: W's entries are all bfloat16 values, and the products run with oneDNN's bf16 arithmetic
    (``cpu_fp32_products("bf16")``), which rounds the inputs to bf16 (exact here), multiplies them exactly and
    accumulates in float32: the same accuracy as float32 products, on AMX tiles."""
    n = W32.shape[1]
    edges = [round(i * n / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    G = torch.empty(n, n, dtype=W32.dtype, device=W32.device)
    with cpu_fp32_products("bf16") if tiles else contextlib.nullcontext():
        for i in range(_GRAM_BLOCKS):
            rows = slice(edges[i], edges[i + 1])
            for j in range(i, _GRAM_BLOCKS):
                cols = slice(edges[j], edges[j + 1])
                torch.matmul(W32[:, rows].T, W32[:, cols], out=G[rows, cols])
                if j > i:
                    G[cols, rows] = G[rows, cols].T
    return G


#: Matrices whose largest entry is below this keep float32 products: AMX flushes subnormal products to zero,
#: which for entries this small would no longer be negligible next to float32 rounding (2^-40 squared is
#: 2^46 times the smallest normal float32).
TILE_MIN_MAGNITUDE = 2.0**-40


def _late_tiles_ok(W32: torch.Tensor) -> bool:
    """Whether a Gram matrix formed in the middle of a run (``gram_after``) may come from bf16 tiles."""
    return bf16_gram_available() and _bf16_valued(W32) and _tile_safe(W32)


def _bf16_valued(W32: torch.Tensor) -> bool:
    """Whether every entry of the float32 ``W32`` is a bfloat16 value (its low 16 bits are zero): then bf16 tile
    products of it are exact. A difference of two nearby bf16 values usually is one."""
    for part in _stored_order(W32).reshape(-1).split(1 << 22):
        if bool((part.view(torch.int32) & 0xFFFF).any()):
            return False
    return True


def _stored_order(W32: torch.Tensor) -> torch.Tensor:
    """W32, or the contiguous matrix it is the transposed view of (the fast solver's view of a wide matrix):
    a pass over the elements in memory order, ten times faster than striding across the transpose."""
    return W32.T if W32.T.is_contiguous() and not W32.is_contiguous() else W32


def _tile_safe(W32: torch.Tensor) -> bool:
    if not W32.numel():
        return False
    # No |W| copy (an embedding's would take gigabytes), and one pass in memory order.
    lo, hi = torch.aminmax(_stored_order(W32))
    return max(-float(lo), float(hi)) >= TILE_MIN_MAGNITUDE


# cpu_fp32_products changes a process-wide setting; the lock keeps two threads from restoring each other's
# values (which could leave bf16 products switched on for everyone).
_PRECISION_LOCK = threading.RLock()


def _mkldnn_matmul() -> Any:
    """torch.backends.mkldnn.matmul where it has ``fp32_precision`` (torch 2.9 and later), else None."""
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return mm if mm is not None and hasattr(mm, "fp32_precision") else None


@contextlib.contextmanager
def cpu_fp32_products(mode: str = "ieee") -> Iterator[None]:
    """Float32 matrix products on the CPU in ``mode`` inside the block, whatever the caller had set.

    ``"ieee"``: true float32 products. The fast solver needs them: after a caller's
    ``torch.set_float32_matmul_precision("medium")`` oneDNN would round float32 inputs to bf16, and the
    products that grow the Krylov space would be off by about 1e-3. ``"bf16"``: inputs rounded to bf16,
    exact products, float32 accumulation (``_gram32`` with tiles; only for matrices whose entries are bf16
    values). The setting is process-wide: float32 products run by other threads meanwhile follow it too, and
    while "bf16" is set torch's legacy ``get_float32_matmul_precision()`` raises in every thread (so the
    solver sets it only around one Gram matrix). Callers in several threads take turns: a lock is held for
    the whole block, so that no thread's "bf16" window falls inside another's float32 products. The
    previous value is restored on the way out."""
    mm = _mkldnn_matmul()
    with _PRECISION_LOCK:
        if mm is not None:
            previous = mm.fp32_precision
            mm.fp32_precision = mode
            try:
                yield
            finally:
                mm.fp32_precision = previous
        elif mode == "ieee" and torch.get_float32_matmul_precision() != "highest":
            # Older torch: the one global precision setting ("highest" is full float32).
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(previous)
        else:
            yield


@functools.lru_cache(maxsize=1)
def bf16_gram_available() -> bool:
    """Whether bf16-valued float32 products can run on AMX tiles here: the CPU has AMX, torch can switch
    oneDNN's float32 products to bf16 arithmetic, and doing so really changes a product (a torch without
    oneDNN ignores the setting). Checked once per process."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if _mkldnn_matmul() is None or amx is None or not amx():
        return False
    # 64 x 64: torch sends smaller products to MKL, which the setting does not affect.
    x = torch.full((64, 64), 1 + 2**-12)  # not a bf16 value: rounding it to bf16 changes the product
    with cpu_fp32_products("ieee"):
        exact = x @ x
    with cpu_fp32_products("bf16"):
        rounded = x @ x
    return not torch.equal(exact, rounded)


def _left_vectors(WV: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """U from W V = U diag(S), re-orthonormalised (keeping each column's sign): where sigma is zero or tiny
    (a rank-deficient matrix) the division alone gives columns that are not unit vectors."""
    U = WV / torch.where(S > 0, S, torch.ones_like(S))
    q, r = torch.linalg.qr(U, mode="reduced")
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)


def _kth_smallest(values: torch.Tensor, pos: int) -> float:
    """The value at 1-based position ``pos`` of ``values`` sorted ascending (an exact order statistic).

    ``values`` is scratch, with the sign bit clear (absolute values): on the CPU it is partially sorted in
    place (numpy's selection, several times faster than torch.kthvalue, and no copy of a matrix-sized
    array), as integers: non-negative floats order as their bit patterns do, and numpy selects on 32- and
    64-bit integers about 3.5 times faster than on floats (65 million values: 0.044 s against 0.156 s);
    elsewhere a radix select on its bit patterns (``radix_kth_smallest``)."""
    flat = values.reshape(-1)
    if flat.device.type == "cpu" and flat.is_contiguous():
        ints = _ORDERED_BITS.get(flat.dtype)
        (flat.view(ints) if ints is not None else flat).numpy().partition(pos - 1)
        return float(flat[pos - 1])
    if flat.dtype in _ORDERED_BITS and flat.is_contiguous():
        return radix_kth_smallest(flat, pos)
    return float(torch.kthvalue(flat, pos).values)


#: Integer views under which non-negative floats sort as their bit patterns do.
_ORDERED_BITS = {torch.float64: torch.int64, torch.float32: torch.int32}
#: Radix select: bits per pass, elements per histogram chunk, and the candidate count small enough to finish
#: with kthvalue.
_RADIX_BITS = 16
_RADIX_CHUNK = 1 << 26
_RADIX_SMALL = 1 << 16


def radix_kth_smallest(flat: torch.Tensor, pos: int) -> float:
    """Exact value at 1-based position ``pos`` of the float64/float32 vector ``flat``, ascending, for values
    with the sign bit clear (absolute values: NaN sorts last, -0.0 must have been made +0.0).

    For non-negative IEEE floats the order of the values is the order of their bit patterns read as signed
    integers, so the k-th value is found 16 bits at a time: a histogram of the top bits (one bincount per
    chunk) names the bucket that holds position ``pos``, the elements of that bucket are kept, and the next
    16 bits refine it, until few enough remain for ``torch.kthvalue``. On a GPU this is a handful of passes
    that use the whole device; ``torch.kthvalue`` on one matrix-sized slice runs in one thread block and took
    seconds for an embedding. Ties need no care: equal values share every bucket.
    """
    if flat.numel() <= _RADIX_SMALL:
        return float(torch.kthvalue(flat, pos).values)
    bits = flat.view(_ORDERED_BITS[flat.dtype])
    width = bits.element_size() * 8
    shift = width - _RADIX_BITS
    cand, k = bits, pos
    while True:
        hist = torch.zeros(1 << _RADIX_BITS, dtype=torch.int64, device=flat.device)
        for s in range(0, cand.numel(), _RADIX_CHUNK):
            keys = (cand[s : s + _RADIX_CHUNK] >> shift) & ((1 << _RADIX_BITS) - 1)
            hist += torch.bincount(keys.to(torch.int64), minlength=1 << _RADIX_BITS)
        cum = hist.cumsum(0)
        bucket = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)))
        k -= int(cum[bucket - 1]) if bucket else 0
        # The keys are recomputed rather than kept: a matrix-sized int64 array would double the memory.
        cand = torch.cat(
            [
                part[((part >> shift) & ((1 << _RADIX_BITS) - 1)) == bucket]
                for part in cand.split(_RADIX_CHUNK)
            ]
        )
        if shift == 0:
            # Every bit is fixed: all candidates are one value.
            return float(cand[:1].view(flat.dtype)[0])
        if cand.numel() <= _RADIX_SMALL:
            return float(torch.kthvalue(cand, k).values.reshape(1).view(flat.dtype)[0])
        shift = max(0, shift - _RADIX_BITS)


def _mask_threshold_desc(scratch: torch.Tensor, alpha: float) -> float:
    """Value at 1-based position ceil(alpha N) of ``scratch`` sorted descending (``scratch`` is reordered)."""
    n = scratch.numel()
    return _kth_smallest(scratch, n - math.ceil(alpha * n) + 1)


def _mask_threshold_asc(scratch: torch.Tensor, alpha: float) -> float:
    """Value at 1-based position ceil(alpha N) of ``scratch`` sorted ascending (``scratch`` is reordered)."""
    return _kth_smallest(scratch, math.ceil(alpha * scratch.numel()))


def _spectral_norm(D: torch.Tensor, opts: SpectralOptions, solver: str) -> float:
    if solver == "exact":
        return float(torch.linalg.matrix_norm(D, ord=2))
    if solver == "gram":
        gram = D.T @ D if D.shape[1] <= D.shape[0] else D @ D.T
        return math.sqrt(max(0.0, top_eigenvalue(gram, seed=opts.seed + 1)))
    # The largest singular value from a small Krylov block: only sigma_1 is needed, to about 1e-5 relative
    # (plenty for a stable rank), and extreme Ritz values converge within a few dozen steps: 4-5 on a
    # trained update, 15-17 on a noise-like one, whose steps then go through dW's Gram matrix.
    res = topk_svd_fast(
        D,
        1,
        SpectralOptions(tol=1e-5, max_iter=60, seed=opts.seed + 1),
        block=16,
        float64_ritz=False,
        gram_after=UPDATE_GRAM_AFTER,
    )
    return float(res.S[0])


#: The step at which the update's sigma_1 decides whether to go on through dW's Gram matrix (``gram_after``):
#: a trained update settles in 4-5 steps, a noise-like one needs 15-17 ...
UPDATE_GRAM_AFTER = 4
#: ... and it does if the value still moved more than this many times the tolerance a step at that check (pure
#: noise 2e-2 to 4e-2 at step 4 for tol 1e-5, trained-like at most 5.5e-5; docs/performance.md).
LATE_GRAM_MOVE = 100

#: Lanczos (``top_eigenvalue``): matrices up to this size go straight to eigvalsh; steps between convergence
#: checks at first (doubled at each check); most steps before giving up and calling eigvalsh.
_LANCZOS_DIRECT = 256
_LANCZOS_FIRST = 32
_LANCZOS_MAX = 512


def top_eigenvalue(G: torch.Tensor, tol: float = 1e-13, seed: int = 0) -> float:
    """Largest eigenvalue of the symmetric positive semi-definite float64 matrix ``G``, to ``tol`` relative.

    Lanczos with full reorthogonalisation (twice, classical Gram-Schmidt) from a seeded random start. Between
    checks it runs on the device without a host sync; at each check the tridiagonal matrix comes to the host
    and the top Ritz value is accepted once its error bound, min(r, r^2 / gap) for the residual r and the gap
    to the next Ritz value, is under ``tol`` times the value. Only sigma_1 of the update is wanted, and a
    full eigvalsh of a 4096-wide Gram matrix costs far more than the few dozen matrix-vector products this
    takes; if it has not converged after ``_LANCZOS_MAX`` steps, eigvalsh decides.
    """
    n = G.shape[0]
    if n <= _LANCZOS_DIRECT:
        return float(torch.linalg.eigvalsh(G)[-1])
    # Scaled to a largest entry of 1, as LAPACK scales: norms of vectors of tiny entries would underflow.
    scale = float(G.abs().max())
    if scale == 0.0 or not math.isfinite(scale):
        return float(torch.linalg.eigvalsh(G)[-1])
    top = _lanczos_top(G / scale, tol, seed)
    return scale * top if top is not None else float(torch.linalg.eigvalsh(G)[-1])


def _lanczos_top(G: torch.Tensor, tol: float, seed: int) -> float | None:
    """``top_eigenvalue`` of a matrix whose largest entry is 1; None when it has not converged."""
    n = G.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.empty(n, _LANCZOS_MAX + 1, dtype=torch.float64, device=G.device)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(G.device)
    V[:, 0] = v / torch.linalg.vector_norm(v)
    alpha = torch.empty(_LANCZOS_MAX, dtype=torch.float64, device=G.device)
    beta = torch.empty(_LANCZOS_MAX, dtype=torch.float64, device=G.device)
    j, check = 0, _LANCZOS_FIRST
    while True:
        while j < check:
            w = G @ V[:, j]
            alpha[j] = torch.dot(w, V[:, j])
            Q = V[:, : j + 1]
            for _ in range(2):
                w = w - Q @ (Q.T @ w)
            beta[j] = torch.linalg.vector_norm(w)
            V[:, j + 1] = w / beta[j].clamp(min=torch.finfo(torch.float64).tiny)
            j += 1
        a, b = alpha[:j].cpu().numpy(), beta[:j].cpu().numpy()
        # An invariant subspace (beta ~ 0; G's largest entry is 1) ends the run: the Ritz values up to it are
        # exact.
        stop = next((i for i in range(j) if b[i] <= 1e-14), None)
        m = j if stop is None else stop + 1
        T = torch.diag(torch.from_numpy(a[:m].copy()))
        if m > 1:
            off = torch.from_numpy(b[: m - 1].copy())
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta = float(evals[-1])
        if stop is not None or theta <= 0:
            return max(theta, 0.0)
        r = float(b[m - 1]) * abs(float(evecs[-1, -1]))
        gap = theta - float(evals[-2]) if m > 1 else math.inf
        if min(r, r * r / gap if gap > 0 else math.inf) <= tol * theta:
            return theta
        if j >= min(_LANCZOS_MAX, n - 1):
            return None
        check = min(2 * j, _LANCZOS_MAX, n - 1)


#: Rows per block when a matrix is widened to float64 piecewise (bounds the temporaries to a few MB per column).
_ROW_BLOCK = 1 << 12


def _row_blocks(m: int) -> range:
    return range(0, m, _ROW_BLOCK)


def _as_float32(W: torch.Tensor) -> torch.Tensor:
    """W in float32 when that is exact (storage of 32 bits or fewer), else W itself (float64 stays)."""
    return W.to(torch.float32) if W.element_size() <= 4 and W.dtype != torch.float32 else W


def _all_finite(W: torch.Tensor) -> bool:
    # A sum is finite exactly when every element is, unless finite elements overflow it: then ask element by
    # element. The sum (float32 for 32-bit and narrower storage, read without a widened copy) is several times
    # faster than isfinite over every element.
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(W.sum(dtype=acc))) or bool(torch.isfinite(W).all())


def _matmul64(W: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """W @ Z in float64 for W of any float dtype, widening W a block of rows at a time (of its stored rows
    when W is the transposed view of a contiguous matrix)."""
    if W.dtype == torch.float64:
        return W @ Z
    if not W.is_contiguous() and W.T.is_contiguous():
        # The transpose of a contiguous X (the fast solver's view of a wide matrix): W Z = sum over blocks of
        # X's rows of X_block^T Z_block. Blocks of W's own rows would be strided copies, several times slower.
        X = W.T
        step = max(1, _ROW_BLOCK * X.shape[0] // X.shape[1])
        out = torch.zeros(W.shape[0], Z.shape[1], dtype=torch.float64, device=W.device)
        wide = torch.empty(min(step, X.shape[0]), X.shape[1], dtype=torch.float64, device=W.device)
        for s in range(0, X.shape[0], step):
            rows = X[s : s + step]
            out.addmm_(wide[: rows.shape[0]].copy_(rows).T, Z[s : s + step])
        return out
    out = torch.empty(W.shape[0], Z.shape[1], dtype=torch.float64, device=W.device)
    wide = _block_buffer(W, torch.float64)
    for s in _row_blocks(W.shape[0]):
        rows = W[s : s + _ROW_BLOCK]
        b = wide[: rows.shape[0]]
        b.copy_(rows)
        torch.matmul(b, Z, out=out[s : s + _ROW_BLOCK])
    return out


def _block_buffer(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # One buffer per loop, reused for every block: a fresh block-sized tensor each time is a fresh memory
    # mapping whose pages fault in again, which on an embedding-sized matrix cost seconds.
    return torch.empty(min(_ROW_BLOCK, W.shape[0]), *W.shape[1:], dtype=dtype, device=W.device)


def _update_terms(
    W0: torch.Tensor, W1: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """||dW||_F^2 and U^T dW V for dW = W1 - W0, in float64, a block of rows at a time."""
    d2 = 0.0
    block = torch.zeros(U.shape[1], V.shape[1], dtype=torch.float64, device=W0.device)
    wide = _block_buffer(W0, torch.float64)
    for s in _row_blocks(W0.shape[0]):
        rows = slice(s, s + _ROW_BLOCK)
        # W0's rows are widened inside the subtraction: float64 holds every narrower value exactly.
        D = wide[: W0[rows].shape[0]].copy_(W1[rows]).sub_(W0[rows])
        d2 += float(torch.dot(D.reshape(-1), D.reshape(-1)))
        block += U[rows].T @ (D @ V)
    return d2, block


def choose_solver(opts: SpectralOptions, shape: tuple[int, int], device: torch.device) -> str:
    if opts.solver != "auto":
        return opts.solver
    if device.type == "cuda":
        return "gram"
    if min(shape) <= AUTO_GRAM_MAX_DIM:
        return "gram"
    return "fast"


def spectral_metrics(base: torch.Tensor, tuned: torch.Tensor, opts: SpectralOptions) -> SpectralResult:
    """All section-2 columns for one 2-D pair (both dims >= 2), plus the vectors for the --spectra table.

    On the CPU the float32 products run as true float32 products whatever precision the caller set for
    torch's float32 matrix products (``cpu_fp32_products``)."""
    with cpu_fp32_products("ieee") if base.device.type == "cpu" else contextlib.nullcontext():
        return _spectral_metrics(base, tuned, opts)


def _spectral_metrics(base: torch.Tensor, tuned: torch.Tensor, opts: SpectralOptions) -> SpectralResult:
    m, n = base.shape
    k = min(opts.rank, m, n)
    r = min(opts.principal_rank, m, n)
    solver = choose_solver(opts, (m, n), base.device)
    lean = solver == "fast"
    # The fast solver works on float32 copies, made once and shared by the solver, the masks and the update's
    # norm (exact for bf16/fp16/fp32 storage), and widens to float64 a block of rows at a time (no full
    # float64 copy of W0, W+ or dW: on an embedding-sized matrix those cost more than the solver).
    W0 = _as_float32(base) if lean else base.to(torch.float64)
    W1 = _as_float32(tuned) if lean else tuned.to(torch.float64)
    finite = _all_finite(W0) and _all_finite(W1)
    cols: dict[str, Any] = {"rank_k": k, "svd_solver": solver}
    if not finite:
        # An SVD of a matrix with NaN or Inf is meaningless; the element-wise columns already count them.
        cols["svd_solver"] = None
        return SpectralResult(cols)
    need = max(k, r)
    # On the H100 two float64 eigendecompositions on two streams took as long as one after the other (the
    # solver keeps the device busy or syncs with the host), so the sides run in turn.
    if solver == "exact":
        t0, t1 = topk_svd_exact(W0, need), topk_svd_exact(W1, need)
    elif solver == "gram":
        t0, t1 = topk_svd_gram(W0, need), topk_svd_gram(W1, need)
    else:
        t0 = topk_svd_fast(W0, need, opts, bf16_exact=base.dtype == torch.bfloat16)
        t1 = topk_svd_fast(
            W1,
            need,
            opts,
            first_check=t0.iterations,
            expected_steps=t0.iterations,
            bf16_exact=tuned.dtype == torch.bfloat16,
        )
        if not (t0.converged and t1.converged):
            # A side ran out of steps before its values settled (nothing measured comes near the limit): the
            # columns come from the float64 Gram solver instead, slower but exact, and say so.
            t0, t1 = topk_svd_gram(W0, need), topk_svd_gram(W1, need)
            cols["svd_solver"] = "gram"
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

    # sigma_1(dW) and the update's energy in the top-k block come first, so that W+'s float32 copy can turn
    # into dW in place and be freed before the masks need their scratch matrix.
    d2, block = _update_terms(W0, W1, U0, V0)
    if d2 > 0:
        cols["principal_energy"] = float(torch.dot(block.reshape(-1), block.reshape(-1))) / d2
        # sigma_1(dW) for the stable rank: the fast solver's float32 Krylov run takes dW in float32.
        if not lean:
            D = W1 - W0
        elif W1.dtype == W0.dtype == torch.float32 and W1.data_ptr() != tuned.data_ptr():
            D = W1.sub_(W0)  # W+'s own float32 copy, not needed any more
        else:
            D = W1.to(torch.float32) - W0.to(torch.float32)
        s1 = _spectral_norm(D, opts, solver)
        del D
        cols["delta_stable_rank"] = d2 / (s1 * s1) if s1 > 0 else None
    else:
        cols["principal_energy"] = None
        cols["delta_stable_rank"] = None
    del W1

    # Masks (metrics.md section 2): U = elements changed in bf16; P = largest |rank-r reconstruction|;
    # L = smallest |W0|. Thresholds are order statistics, ties included, and densities are measured.
    # The fast solver's factors carry errors near 1e-8 already, so its reconstruction is formed in float32 (half
    # the memory and time on an embedding-sized matrix; it moves at most a handful of elements across the
    # threshold). The exact solvers keep float64. |W0| is exact in float32 whenever W0 is stored in 32 bits
    # or fewer.
    N = m * n
    rdt = torch.float32 if solver == "fast" else torch.float64
    US = (t0.U[:, :r] * t0.S[:r]).to(rdt)
    Vt = t0.V[:, :r].T.to(rdt).contiguous()
    A0 = W0 if lean else base.to(torch.float32) if base.element_size() <= 4 else base.to(torch.float64)
    # One matrix-sized scratch array serves both thresholds (each reorders it); the masks themselves are
    # never stored whole: they are recomputed a block of rows at a time and only counted. The reconstruction's
    # blocks are the same products both times, so each element is compared with the threshold it was ranked by.
    scratch = torch.empty(m, n, dtype=rdt, device=base.device)
    for s in _row_blocks(m):
        torch.matmul(US[s : s + _ROW_BLOCK], Vt, out=scratch[s : s + _ROW_BLOCK])
    p_thr = _mask_threshold_desc(scratch.abs_(), opts.alpha)
    l_thr = _mask_threshold_asc(torch.abs(A0, out=scratch if A0.dtype == rdt else None), opts.alpha)
    del scratch
    n_update = n_p = n_l = n_up = n_ul = 0
    rbuf, abuf = _block_buffer(A0, rdt), _block_buffer(A0, A0.dtype)
    ubuf, pbuf, lbuf, both = (_block_buffer(A0, torch.bool) for _ in range(4))
    for s in _row_blocks(m):
        rows = slice(s, s + _ROW_BLOCK)
        h = A0[rows].shape[0]
        update = torch.ne(round_to_bf16(base[rows]), round_to_bf16(tuned[rows]), out=ubuf[:h])
        R = torch.matmul(US[rows], Vt, out=rbuf[:h]).abs_()
        P = torch.ge(R, p_thr, out=pbuf[:h])
        L = torch.le(torch.abs(A0[rows], out=abuf[:h]), l_thr, out=lbuf[:h])
        n_update += int(torch.count_nonzero(update))
        n_p += int(torch.count_nonzero(P))
        n_l += int(torch.count_nonzero(L))
        n_up += int(torch.count_nonzero(torch.logical_and(update, P, out=both[:h])))
        n_ul += int(torch.count_nonzero(torch.logical_and(update, L, out=both[:h])))
    del A0, rbuf, abuf, ubuf, pbuf, lbuf, both
    cols["principal_mask_density"] = n_p / N
    cols["lowmag_mask_density"] = n_l / N
    cols["principal_overlap"] = n_up / n_update if n_update else None
    cols["lowmag_overlap"] = n_ul / n_update if n_update else None
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
