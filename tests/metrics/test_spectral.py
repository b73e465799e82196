"""Spectral metrics against a float64 numpy/scipy reference and the invariants of metrics.md section 2."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from tests import reference
from weightdiff.metrics import spectral
from weightdiff.metrics.spectral import SpectralOptions, principal_angles, spectral_metrics, topk_svd_fast


def structured(m: int, n: int, seed: int, decay: float = 3.0) -> torch.Tensor:
    """A matrix with a decaying spectrum (a few strong directions over a noise floor), like trained weights."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.linspace(0, 1, min(m, n), dtype=torch.float64)) * 10
    return (U * s) @ V.T


def rl_like(W: torch.Tensor, seed: int, scale: float = 1e-3) -> torch.Tensor:
    """A tiny update that avoids the top singular directions (off-principal), as RL updates do."""
    g = torch.Generator().manual_seed(seed)
    U, _, _ = torch.linalg.svd(W, full_matrices=False)
    noise = torch.randn(W.shape, generator=g, dtype=torch.float64)
    Pu = torch.eye(W.shape[0], dtype=torch.float64) - U[:, :32] @ U[:, :32].T
    return W + scale * (Pu @ noise) * W.abs().mean()


def sft_like(W: torch.Tensor, seed: int, scale: float = 0.05) -> torch.Tensor:
    """A larger update aligned with the top singular directions, as SFT updates are."""
    g = torch.Generator().manual_seed(seed)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    R = torch.randn(8, 8, generator=g, dtype=torch.float64)
    return W + scale * S[0] * U[:, :8] @ R @ Vh[:8] / 8


CASES = {
    "random": lambda: (
        (torch.randn(96, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),) * 1
    ),
}


def make_pair(kind: str, m: int = 160, n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    W = structured(m, n, seed)
    if kind == "near_identical":
        g = torch.Generator().manual_seed(seed + 3)
        return W, W + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "rl":
        return W, rl_like(W, seed + 1)
    if kind == "sft":
        return W, sft_like(W, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    if kind == "lowrank_noise":
        L = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(
            4, n, generator=g, dtype=torch.float64
        )
        W = L + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64)
        return W, W + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, W + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64)


KINDS = ["rl", "sft", "lowrank_noise", "random"]
COLS = ("angle_u_max_deg", "angle_u_mean_deg", "angle_v_max_deg", "angle_v_mean_deg")


@pytest.mark.parametrize("solver", ["exact", "gram"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_matches_float64_reference(kind, solver):
    W0, W1 = make_pair(kind)
    # Store as float32, the way checkpoints hold them; both sides see the same values.
    a, b = W0.float(), W1.float()
    got = spectral_metrics(a, b, SpectralOptions(solver=solver, rank=16, principal_rank=16)).columns
    ref = reference.spectral(a.double().numpy(), b.double().numpy(), k=16, r=16)
    for c in COLS:
        assert got[c] == pytest.approx(ref[c], abs=1e-6), c
    for c in (
        "sv_drift",
        "sv_drift_topk",
        "sigma1_rel_change",
        "topk_energy_rel_change",
        "principal_energy",
        "delta_stable_rank",
    ):
        assert got[c] == pytest.approx(ref[c], rel=1e-9, abs=1e-15), c
    for c in ("principal_overlap", "principal_mask_density", "lowmag_overlap", "lowmag_mask_density"):
        assert got[c] == pytest.approx(ref[c], abs=1e-12), c
    assert got["principal_energy_baseline"] == 16 * 16 / (160 * 128)


def noise_bulk_pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A power-law low-rank part sunk in a noise bulk whose edge sits near sigma_k (a dense spectrum around k,
    the hard case for iterative solvers), and a near-identical tuned matrix; both rounded through bf16."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n) // 2
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = 3.0 * torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    W0 = (U * s) @ V.T + 0.2 * torch.randn(m, n, generator=g) / max(m, n) ** 0.5
    W1 = W0 + 2e-4 * torch.randn(m, n, generator=g) * W0.abs().mean()
    return W0.to(torch.bfloat16).float(), W1.to(torch.bfloat16).float()


@pytest.mark.parametrize("kind", ["rl", "sft", "near_identical", "noise_bulk", "noise_bulk_wide"])
def test_fast_solver_within_documented_tolerance(kind):
    if kind.startswith("noise_bulk"):
        W0, W1 = noise_bulk_pair(240, 500) if kind.endswith("wide") else noise_bulk_pair(500, 240)
    else:
        W0, W1 = make_pair(kind, m=200, n=180)
    a, b = W0.float(), W1.float()
    got = spectral_metrics(a, b, SpectralOptions(solver="fast", rank=16, principal_rank=16)).columns
    ref = reference.spectral(a.double().numpy(), b.double().numpy(), k=16, r=16)
    for c in COLS:
        assert abs(got[c] - ref[c]) <= 0.01 + 0.02 * abs(ref[c]), (c, got[c], ref[c])
    for c in ("principal_overlap", "lowmag_overlap", "principal_mask_density"):
        assert abs(got[c] - ref[c]) <= 0.005, c
    assert got["sv_drift"] is None
    assert got["sv_drift_topk"] == pytest.approx(ref["sv_drift_topk"], rel=1e-3, abs=1e-9)
    assert got["sigma1_rel_change"] == pytest.approx(ref["sigma1_rel_change"], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_fast_top_singular_triplets(shape):
    # Values to 1e-6 relative, orthonormal vectors that are singular vectors (W v = s u), on both orientations.
    for W in (structured(*shape, 5).float(), noise_bulk_pair(*shape)[0]):
        res = topk_svd_fast(W, 16, SpectralOptions())
        ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
        assert np.max(np.abs(res.S.numpy() - ref[:16]) / ref[:16]) < 1e-6
        eye = torch.eye(16, dtype=torch.float64)
        assert torch.allclose(res.U.T @ res.U, eye, atol=1e-10) and torch.allclose(
            res.V.T @ res.V, eye, atol=1e-10
        )
        resid = W.double() @ res.V - res.U * res.S
        assert float(resid.norm() / res.S[0]) < 1e-3


def test_fast_solver_that_fills_the_space_is_exact():
    # A Krylov space that reaches the full dimension is the whole space: every singular value, exactly.
    W = structured(40, 30, 2).float()
    res = topk_svd_fast(W, 16, SpectralOptions(), block=16)
    ref = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert res.full is not None and res.full.numel() == 30
    assert np.max(np.abs(res.full.numpy() - ref) / ref) < 1e-9


def test_identical_tensors_give_zeros():
    W = structured(64, 48, 1).float()
    got = spectral_metrics(W, W.clone(), SpectralOptions(solver="exact", rank=8)).columns
    for c in COLS:
        assert got[c] == pytest.approx(0.0, abs=1e-6)
    assert got["sv_drift"] == 0.0 and got["sv_drift_topk"] == 0.0 and got["sigma1_rel_change"] == 0.0
    assert (
        got["principal_overlap"] is None
        and got["principal_energy"] is None
        and got["delta_stable_rank"] is None
    )


def test_weyl_and_mirsky_bounds():
    W0, W1 = make_pair("random", 60, 50)
    res = spectral_metrics(W0.float(), W1.float(), SpectralOptions(solver="exact", rank=50))
    s0 = np.array(res.vectors["sv_base"])
    s1 = np.array(res.vectors["sv_tuned"])
    D = (W1.float().double() - W0.float().double()).numpy()
    assert np.all(np.abs(s1 - s0) <= np.linalg.norm(D, 2) * (1 + 1e-12))
    assert np.linalg.norm(s1 - s0) <= np.linalg.norm(D, "fro") * (1 + 1e-12)


def test_angles_invariant_to_positive_scaling():
    W0, W1 = make_pair("rl")
    opts = SpectralOptions(solver="exact", rank=8)
    a = spectral_metrics(W0, W1, opts).columns
    b = spectral_metrics(3.5 * W0, 3.5 * W1, opts).columns
    for c in COLS:
        assert a[c] == pytest.approx(b[c], rel=1e-6, abs=1e-9)


def test_known_rotation_of_top_subspace():
    # Rotate the first left singular vector towards an unused direction by a known small angle.
    m, n, theta = 50, 40, math.radians(0.05)
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, n, dtype=torch.float64)
    W0 = (U[:, :n] * s) @ V.T
    U1 = U[:, :n].clone()
    U1[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * U[:, n]  # column n lies outside span(U[:, :n])
    W1 = (U1 * s) @ V.T
    got = spectral_metrics(W0, W1, SpectralOptions(solver="exact", rank=4)).columns
    assert got["angle_u_max_deg"] == pytest.approx(0.05, abs=1e-9)
    assert got["angle_v_max_deg"] == pytest.approx(0.0, abs=1e-9)


def test_small_angles_are_not_lost_to_arccos():
    # arccos(1 - tiny) in float32 loses everything below ~0.02 degrees; sines keep it.
    A = torch.zeros(3, 1, dtype=torch.float64)
    A[0, 0] = 1
    B = torch.zeros(3, 1, dtype=torch.float64)
    B[0, 0], B[1, 0] = math.cos(1e-6), math.sin(1e-6)
    assert float(principal_angles(A, B)[0]) == pytest.approx(1e-6, rel=1e-9)


def test_random_update_mask_overlap_matches_density():
    g = torch.Generator().manual_seed(7)
    W0 = structured(200, 150, 2).float()
    mask = torch.rand(W0.shape, generator=g) < 0.3
    W1 = torch.where(mask, W0 * 1.05, W0)  # a 5% change: always visible in bf16
    got = spectral_metrics(W0, W1, SpectralOptions(solver="exact", rank=8, principal_rank=8)).columns
    assert abs(got["principal_overlap"] - got["principal_mask_density"]) < 0.02
    assert abs(got["lowmag_overlap"] - got["lowmag_mask_density"]) < 0.02


def test_rl_and_sft_like_updates_separate():
    W0, rl = make_pair("rl")
    _, sft = make_pair("sft")
    opts = SpectralOptions(solver="exact", rank=8, principal_rank=8)
    r = spectral_metrics(W0, rl, opts).columns
    s = spectral_metrics(W0, sft, opts).columns
    assert r["principal_energy"] < r["principal_energy_baseline"] * 2 < s["principal_energy"]


def test_mask_density_reports_ties():
    W0 = torch.ones(10, 10)  # every |W0| ties: the low-magnitude mask holds all of them
    W1 = W0.clone()
    W1[0, 0] = 2.0
    got = spectral_metrics(W0, W1, SpectralOptions(solver="exact", rank=2)).columns
    assert got["lowmag_mask_density"] == 1.0 and got["lowmag_overlap"] == 1.0


def test_nonfinite_matrix_gets_null_spectral_columns():
    W0 = torch.ones(4, 4)
    W1 = W0.clone()
    W1[1, 1] = float("nan")
    got = spectral_metrics(W0, W1, SpectralOptions()).columns
    assert got["angle_u_max_deg"] is None if "angle_u_max_deg" in got else True
    assert got["svd_solver"] is None


def test_zero_base_matrix_gives_null_drifts():
    W0 = torch.zeros(6, 5)
    W1 = torch.ones(6, 5)
    got = spectral_metrics(W0, W1, SpectralOptions(solver="exact", rank=2)).columns
    for c in ("sv_drift", "sv_drift_topk", "sigma1_rel_change", "topk_energy_rel_change"):
        assert got[c] is None, c
    assert got["principal_mask_density"] == 1.0 and got["lowmag_mask_density"] == 1.0


@pytest.mark.parametrize("tuned", ["rl_seed0", "sft"])
def test_fast_solver_on_real_trained_matrices(tuned):
    # Real weights from real training runs (examples/miniature): an RL and an SFT fine-tune of the same base.
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2] / "examples" / "miniature" / "checkpoints"
    base, other = (
        load_file(str(root / "base" / "model.safetensors")),
        load_file(str(root / tuned / "model.safetensors")),
    )
    names = [n for n in base if n.startswith("model.layers.1.") and base[n].dim() == 2]
    assert len(names) == 7
    for name in names:
        a, b = base[name].float(), other[name].float()
        got = spectral_metrics(a, b, SpectralOptions(solver="fast", rank=16, principal_rank=16)).columns
        ref = reference.spectral(a.double().numpy(), b.double().numpy(), k=16, r=16)
        for c in COLS:
            assert abs(got[c] - ref[c]) <= 0.01 + 0.02 * abs(ref[c]), (name, c, got[c], ref[c])
        for c in ("principal_overlap", "lowmag_overlap"):
            assert abs(got[c] - ref[c]) <= 0.005, (name, c)
        assert got["sv_drift_topk"] == pytest.approx(ref["sv_drift_topk"], rel=1e-3, abs=1e-9), name


@pytest.mark.parametrize("rank", [0, 8])
def test_fast_solver_on_rank_deficient_matrices(rank):
    # Fewer nonzero singular values than k: the iteration still stops early, the vectors are orthonormal, and
    # identical matrices give zero angles, as the exact solver does.
    g = torch.Generator().manual_seed(4)
    W = (
        torch.randn(300, rank, generator=g) @ torch.randn(rank, 250, generator=g)
        if rank
        else torch.zeros(300, 250)
    )
    res = topk_svd_fast(W, 16, SpectralOptions())
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(res.U.T @ res.U, eye, atol=1e-8) and torch.allclose(res.V.T @ res.V, eye, atol=1e-8)
    assert res.iterations < 10
    if rank:
        ref = np.linalg.svd(W.double().numpy(), compute_uv=False)[:rank]
        assert np.max(np.abs(res.S[:rank].numpy() - ref) / ref) < 1e-6
    got = spectral_metrics(W, W.clone(), SpectralOptions(solver="fast", rank=16, principal_rank=16)).columns
    assert got["angle_u_max_deg"] == pytest.approx(0.0, abs=1e-6) and got["angle_v_max_deg"] == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("solver", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_blocking_changes_nothing_and_inputs_stay_untouched(solver, dtype, monkeypatch):
    # The masks and update terms are computed a block of rows at a time; 7-row blocks (ragged at the end)
    # must give what one block gives, to the last bit, and the caller's matrices must come back unchanged.
    W0, W1 = noise_bulk_pair(300, 260)
    a, b = W0.to(dtype), W1.to(dtype)
    a0, b0 = a.clone(), b.clone()
    opts = SpectralOptions(solver=solver, rank=16, principal_rank=16)
    whole = spectral_metrics(a, b, opts).columns
    monkeypatch.setattr(spectral, "_ROW_BLOCK", 7)
    blocked = spectral_metrics(a, b, opts).columns
    assert torch.equal(a, a0) and torch.equal(b, b0)
    for c in ("principal_overlap", "principal_mask_density", "lowmag_overlap", "lowmag_mask_density"):
        assert blocked[c] == whole[c], c
    for c in ("principal_energy", "delta_stable_rank"):
        assert blocked[c] == pytest.approx(whole[c], rel=1e-9), c
    if solver == "exact":
        ref = reference.spectral(a.double().numpy(), b.double().numpy(), k=16, r=16)
        for c in ("principal_overlap", "principal_mask_density", "lowmag_overlap", "lowmag_mask_density"):
            assert blocked[c] == pytest.approx(ref[c], abs=1e-12), c


def _partition_kth(x: torch.Tensor, pos: int) -> float:
    a = x.numpy().copy()
    a.partition(pos - 1)
    return float(a[pos - 1])


def _select_cases(case: str, dtype: torch.dtype, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = {
        "normal": lambda: torch.randn(n, generator=g, dtype=dtype).abs(),
        "zeros": lambda: torch.zeros(n, dtype=dtype),
        "ties": lambda: torch.randint(0, 4, (n,), generator=g).to(dtype) * 0.25,
        "subnormal": lambda: torch.full((n,), torch.finfo(dtype).tiny / 8, dtype=dtype),
        "wide_range": lambda: torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 20).to(dtype),
        "one_huge": lambda: torch.cat([torch.ones(n - 1, dtype=dtype), torch.full((1,), 1e30, dtype=dtype)]),
    }[case]()
    if case == "subnormal":
        x[::3] = 0.0
    return x


SELECT_CASES = ["normal", "zeros", "ties", "subnormal", "wide_range", "one_huge"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SELECT_CASES)
def test_radix_select_matches_partition(dtype, case, monkeypatch):
    # The GPU order statistic behind the mask thresholds, run here on the CPU with tiny chunks and a tiny
    # hand-off size so that every pass (chunked histograms, refinement to the last 16 bits) is exercised.
    monkeypatch.setattr(spectral, "_RADIX_SMALL", 50)
    monkeypatch.setattr(spectral, "_RADIX_CHUNK", 997)
    n = 20011
    x = _select_cases(case, dtype, n)
    for pos in (1, 2, n // 3, n // 2, n - 1, n):
        assert spectral.radix_kth_smallest(x.clone(), pos) == _partition_kth(x, pos), pos


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SELECT_CASES)
def test_cpu_select_on_bit_patterns_matches_float_partition(dtype, case):
    # The CPU order statistic selects on the values' bit patterns as integers (same order for values with the
    # sign bit clear): the same value as numpy's selection on the floats, at every position.
    n = 20011
    x = _select_cases(case, dtype, n)
    order = np.sort(x.numpy())
    for pos in (1, 2, n // 3, n // 2, n - 1, n):
        got = spectral._kth_smallest(x.clone(), pos)
        assert got == _partition_kth(x, pos) == float(order[pos - 1]), pos


def test_lanczos_top_eigenvalue_matches_eigvalsh():
    g = torch.Generator().manual_seed(5)
    # A sparse random update (Marchenko-Pastur bulk: the top eigenvalues crowd together), a low-rank one
    # (an invariant subspace stops the iteration early), and zero.
    D = torch.randn(900, 400, generator=g, dtype=torch.float64) * (torch.rand(900, 400, generator=g) < 0.5)
    L = torch.randn(400, 3, generator=g, dtype=torch.float64)
    for G in (D.T @ D, L @ L.T):
        ref = float(torch.linalg.eigvalsh(G)[-1])
        assert spectral.top_eigenvalue(G) == pytest.approx(ref, rel=1e-12)
    assert spectral.top_eigenvalue(torch.zeros(300, 300, dtype=torch.float64)) == 0.0
    # Entries so small that a vector norm over them underflows: scaled first, as LAPACK does.
    for tiny in (1e-300, 1e-250):
        G = (D.T @ D) * tiny
        assert spectral.top_eigenvalue(G) == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-12)


def test_lanczos_gives_up_to_eigvalsh(monkeypatch):
    # Too few steps allowed to converge on a crowded spectrum: the answer still comes, from eigvalsh.
    monkeypatch.setattr(spectral, "_LANCZOS_MAX", 4)
    monkeypatch.setattr(spectral, "_LANCZOS_FIRST", 2)
    g = torch.Generator().manual_seed(6)
    D = torch.randn(700, 300, generator=g, dtype=torch.float64)
    G = D.T @ D
    assert spectral.top_eigenvalue(G) == float(torch.linalg.eigvalsh(G)[-1])


def test_gram_solver_above_the_lanczos_cutoff_matches_reference():
    # 300 columns: the update's sigma_1 comes from Lanczos rather than eigvalsh, to float64 accuracy.
    W0, W1 = make_pair("rl", m=420, n=300)
    a, b = W0.float(), W1.float()
    got = spectral_metrics(a, b, SpectralOptions(solver="gram", rank=16, principal_rank=16)).columns
    ref = reference.spectral(a.double().numpy(), b.double().numpy(), k=16, r=16)
    assert got["delta_stable_rank"] == pytest.approx(ref["delta_stable_rank"], rel=1e-9)
    for c in COLS:
        assert got[c] == pytest.approx(ref[c], abs=1e-6), c


def test_fast_solver_with_k_above_the_block_size():
    # k = 64 grows the space 32 columns a step (KRYLOV_BLOCK): same tolerances against the float64 reference.
    assert spectral.KRYLOV_BLOCK < 64
    W0, W1 = noise_bulk_pair(700, 400)
    got = spectral_metrics(W0, W1, SpectralOptions(solver="fast", rank=64, principal_rank=64)).columns
    ref = reference.spectral(W0.double().numpy(), W1.double().numpy(), k=64, r=64)
    for c in COLS:
        assert abs(got[c] - ref[c]) <= 0.01 + 0.02 * abs(ref[c]), (c, got[c], ref[c])
    assert got["sv_drift_topk"] == pytest.approx(ref["sv_drift_topk"], rel=1e-3, abs=1e-9)
    for c in ("principal_overlap", "lowmag_overlap", "principal_mask_density"):
        assert abs(got[c] - ref[c]) <= 0.005, c
    res = topk_svd_fast(W0, 64, SpectralOptions())
    ref_s = np.linalg.svd(W0.double().numpy(), compute_uv=False)[:64]
    assert np.max(np.abs(res.S.numpy() - ref_s) / ref_s) < 1e-6


def test_tall_matrix_through_its_gram_matrix_matches_reference(monkeypatch):
    # An embedding-like matrix (at least GRAM_OPERATOR_ASPECT times taller than wide) applies W^T W through its
    # float32 Gram matrix when the expected steps pay for it; the results stay within the fast solver's
    # tolerances either way, and close to the direct products' results.
    W0, W1 = noise_bulk_pair(1000, 200)
    assert spectral._gram_operator_pays(1000, 200, 16, 16)
    assert not spectral._gram_operator_pays(1000, 200, 16, 1)  # too few steps to pay
    assert not spectral._gram_operator_pays(700, 200, 16, 16)  # not tall enough
    Wt = W0.T.contiguous().T  # column-major storage, as a wide matrix's transpose has
    for W in (W0, Wt):
        G = spectral._gram32(W)
        assert torch.equal(G, G.T)
        assert torch.allclose(G.double(), W.double().T @ W.double(), rtol=1e-5, atol=1e-5)
    formed: list[tuple[int, ...]] = []
    real = spectral._gram_operator_pays

    def spy(m: int, n: int, b: int, steps: int, tiles: bool = False) -> bool:
        used = real(m, n, b, steps, tiles)
        if used:
            formed.append((m, n))
        return used

    monkeypatch.setattr(spectral, "_gram_operator_pays", spy)
    opts = SpectralOptions(solver="fast", rank=16, principal_rank=16)
    got = spectral_metrics(W0, W1, opts).columns
    assert formed[:2] == [(1000, 200), (1000, 200)]  # base and tuned
    ref = reference.spectral(W0.double().numpy(), W1.double().numpy(), k=16, r=16)
    for c in COLS:
        assert abs(got[c] - ref[c]) <= 0.01 + 0.02 * abs(ref[c]), (c, got[c], ref[c])
    assert got["sv_drift_topk"] == pytest.approx(ref["sv_drift_topk"], rel=1e-3, abs=1e-9)
    via_gram = topk_svd_fast(W0, 16, SpectralOptions(), expected_steps=40)
    direct = topk_svd_fast(W0, 16, SpectralOptions(), expected_steps=1)
    ref_s = np.linalg.svd(W0.double().numpy(), compute_uv=False)[:16]
    for res in (via_gram, direct):
        assert np.max(np.abs(res.S.numpy() - ref_s) / ref_s) < 1e-6
    assert float(torch.rad2deg(principal_angles(via_gram.V, direct.V)).max()) < 1e-3


def test_spaced_out_checks_never_stop_before_the_per_step_rule(monkeypatch):
    # With checks every step the iteration stops at the first step whose values moved less than tol; checks
    # spaced out over several steps demand less than tol over the whole gap, so they stop there or later.
    W = noise_bulk_pair(600, 500)[0]
    checks: list[int] = []
    real = torch.linalg.eigvalsh

    def counted(G: torch.Tensor) -> torch.Tensor:
        checks.append(G.shape[0])
        return real(G)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counted)
    monkeypatch.setattr(spectral, "LIKELY_PASS", 0)  # every check an eigvalsh, to count them
    monkeypatch.setattr(spectral, "CHECK_FLOPS_PER_P3", 0)  # every check cheap: every step
    every = topk_svd_fast(W, 64, SpectralOptions())
    n_every, checks[:] = len(checks), []
    monkeypatch.setattr(spectral, "CHECK_FLOPS_PER_P3", 10**9)  # every check dear
    spaced = topk_svd_fast(W, 64, SpectralOptions())
    # Checks from step 3 on: every step, or spaced out (fewer checks, over a few more steps here).
    assert n_every == every.iterations - 2
    assert len(checks) < spaced.iterations - 2
    assert spaced.iterations >= every.iterations
    ref_s = np.linalg.svd(W.double().numpy(), compute_uv=False)[:64]
    for res in (every, spaced):
        assert np.max(np.abs(res.S.numpy() - ref_s) / ref_s) < 1e-6


@pytest.mark.parametrize(
    ("per_step", "cheap", "steps"),
    [(1e-2, False, 4), (2e-4, False, 2), (5e-6, False, 1), (1e-7, False, 1), (1e-2, True, 1)],
)
def test_steps_to_next_check(per_step, cheap, steps):
    # The next check comes where a move shrinking by FASTEST_SHRINK (0.1) a step could first be at or under 1e-6.
    assert spectral._steps_to_next_check(per_step, cheap, 1e-6) == steps


def test_gram_schmidt_reuses_the_projections_it_already_has(monkeypatch):
    # Each step's first Gram-Schmidt pass takes Q^T Y from the new columns of G computed the step before; they
    # must be those projections (the second pass would hide a wrong first pass, so check them directly).
    W = noise_bulk_pair(400, 300)[0]
    errors: list[float] = []
    real = spectral._orthogonalise

    def spy(Q: torch.Tensor, Y: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
        if coef is not None:
            want = Q.T @ Y
            errors.append(float((coef - want).abs().max() / want.abs().max()))
        return real(Q, Y, coef)

    monkeypatch.setattr(spectral, "_orthogonalise", spy)
    res = topk_svd_fast(W, 16, SpectralOptions())
    assert len(errors) == res.iterations - 1  # every step after the first
    assert max(errors) < 1e-12


def test_a_check_likely_to_pass_lends_its_eigenvectors_to_the_final_step(monkeypatch):
    # Near convergence a check decomposes G with eigh; when it passes, the final Rayleigh-Ritz step reuses
    # those eigenvectors instead of decomposing the same G again. The result is bit-identical either way.
    W = noise_bulk_pair(500, 400)[0]
    calls: list[str] = []
    real_eigh, real_eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh

    def eigh(G: torch.Tensor) -> Any:
        calls.append("eigh")
        return real_eigh(G)

    def eigvalsh(G: torch.Tensor) -> torch.Tensor:
        calls.append("eigvalsh")
        return real_eigvalsh(G)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(torch.linalg, "eigvalsh", eigvalsh)
    # A check every step (spaced-out checks judge "likely" from a move averaged over several steps).
    monkeypatch.setattr(spectral, "CHECK_CHEAP_FRACTION", 10**9)
    monkeypatch.setattr(spectral, "LIKELY_PASS", 0)  # no check is likely to pass: eigvalsh, then eigh again
    plain = topk_svd_fast(W, 16, SpectralOptions())
    plain_calls, calls[:] = list(calls), []
    monkeypatch.setattr(spectral, "LIKELY_PASS", 10)
    lent = topk_svd_fast(W, 16, SpectralOptions())
    assert plain.iterations == lent.iterations
    assert torch.equal(plain.S, lent.S) and torch.equal(plain.V, lent.V) and torch.equal(plain.U, lent.U)
    # The passing check's eigh served the final step: one decomposition of the final G fewer.
    assert len(calls) == len(plain_calls) - 1 and calls[-2] == "eigh"
    # A tuned matrix expects to converge where its base did: its checks from there on are eigh.
    calls[:] = []
    topk_svd_fast(W, 16, SpectralOptions(), first_check=plain.iterations)
    assert calls[-2:] == ["eigh", "eigh"]  # the passing check, then the final float64 Rayleigh-Ritz step


def test_bf16_tile_gram_matches_float64():
    # _gram32 with tiles rounds its inputs to bf16, which is exact for bf16-valued entries: the result has the
    # accuracy of float32 products (on any CPU; with AMX it is also faster).
    W0, _ = noise_bulk_pair(600, 200)
    exact = W0.double().T @ W0.double()
    for W in (W0, W0.T.contiguous().T):
        G = spectral._gram32(W, tiles=True)
        assert torch.equal(G, G.T)
        assert float((G.double() - exact).abs().max()) <= 1e-6 * float(exact.abs().max())


def test_tile_gram_cost_model():
    pays = spectral._gram_operator_pays
    assert pays(2048, 2048, 32, 15, tiles=True)  # trained-like square matrix
    assert pays(5632, 2048, 32, 13, tiles=True)  # MLP projection
    assert not pays(4096, 4096, 32, 15, tiles=True)  # forming G costs more than 15 steps save
    assert pays(4096, 4096, 32, 40, tiles=True)
    assert not pays(2048, 2048, 32, 15)  # without tiles only tall matrices use G


@pytest.fixture
def gram_calls(monkeypatch) -> list[bool]:
    """Pretends the CPU has AMX and records, per Gram matrix formed, whether it came from the bf16 tiles."""
    monkeypatch.setattr(spectral, "bf16_gram_available", lambda: True)
    calls: list[bool] = []
    real = spectral._gram32

    def spy(W: torch.Tensor, tiles: bool = False) -> torch.Tensor:
        calls.append(tiles)
        return real(W, tiles)

    monkeypatch.setattr(spectral, "_gram32", spy)
    return calls


def test_tile_gram_only_for_bf16_storage(gram_calls, monkeypatch):
    # Only bf16-stored matrices may go through the bf16 tiles: rounding float16 or float32 entries to bf16 would
    # change the matrix. (The update's sigma_1 checks its own entries; it is kept out of this count.)
    monkeypatch.setattr(spectral, "UPDATE_GRAM_AFTER", 10**6)
    W0, W1 = noise_bulk_pair(700, 600)
    opts = SpectralOptions(solver="fast", rank=16, principal_rank=16, max_iter=60)
    results = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        gram_calls.clear()
        results[dtype] = spectral_metrics(W0.to(dtype), W1.to(dtype), opts).columns
        # With tiles a 700 x 600 matrix's Gram matrix pays for the steps it saves (both sides); without, only
        # tall matrices form one.
        assert gram_calls == ([True, True] if dtype == torch.bfloat16 else []), (dtype, gram_calls)
    ref = reference.spectral(W0.double().numpy(), W1.double().numpy(), k=16, r=16)
    for c in COLS:
        got = results[torch.bfloat16][c]
        assert abs(got - ref[c]) <= 0.01 + 0.02 * abs(ref[c]), (c, got, ref[c])
    via_tiles = topk_svd_fast(W0, 16, SpectralOptions(), expected_steps=60, bf16_exact=True)
    ref_s = np.linalg.svd(W0.double().numpy(), compute_uv=False)[:16]
    assert np.max(np.abs(via_tiles.S.numpy() - ref_s) / ref_s) < 1e-6


def test_fast_solver_ignores_the_callers_float32_matmul_precision():
    # torch.set_float32_matmul_precision("medium") lets oneDNN round float32 inputs to bf16 (CPUs with bf16
    # arithmetic); the solver's products must stay float32, and the caller's setting must survive the call.
    W0, W1 = noise_bulk_pair(300, 260)
    W0, W1 = W0 + 1e-4, W1 + 1e-4  # entries that are not bf16 values, so that rounding them would show
    opts = SpectralOptions(solver="fast", rank=16, principal_rank=16)
    before = torch.get_float32_matmul_precision()
    strict = spectral_metrics(W0, W1, opts).columns
    try:
        torch.set_float32_matmul_precision("medium")
        loose = spectral_metrics(W0, W1, opts).columns
        assert torch.get_float32_matmul_precision() == "medium"
        mm = spectral._mkldnn_matmul()
        if mm is not None:
            assert mm.fp32_precision == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
    assert loose == strict


def test_cpu_fp32_products_restores_the_setting_on_error():
    mm = spectral._mkldnn_matmul()
    if mm is None:  # older torch: only the global precision, which "ieee" leaves at "highest"
        with spectral.cpu_fp32_products("ieee"):
            assert torch.get_float32_matmul_precision() == "highest"
        return
    before = mm.fp32_precision
    with pytest.raises(RuntimeError, match="boom"), spectral.cpu_fp32_products("ieee"):
        assert mm.fp32_precision == "ieee"
        with spectral.cpu_fp32_products("bf16"):
            assert mm.fp32_precision == "bf16"
        assert mm.fp32_precision == "ieee"
        raise RuntimeError("boom")
    assert mm.fp32_precision == before


def test_tiny_matrices_keep_float32_products(gram_calls):
    # AMX flushes subnormal products to zero: a bf16 matrix with entries near 1e-19 would get a Gram matrix of
    # zeros from the tiles. Such matrices keep float32 products, and the angles stay scale-invariant.
    W0, W1 = noise_bulk_pair(700, 600)
    opts = SpectralOptions(solver="fast", rank=16, principal_rank=16, max_iter=60)
    scale = 2.0**-60  # a power of two: the scaled matrices hold exactly the scaled values
    unit = spectral_metrics(W0.to(torch.bfloat16), W1.to(torch.bfloat16), opts).columns
    assert gram_calls == [True, True]
    gram_calls.clear()
    tiny = spectral_metrics((W0 * scale).to(torch.bfloat16), (W1 * scale).to(torch.bfloat16), opts).columns
    assert gram_calls == []
    for c in ("angle_u_max_deg", "angle_v_max_deg", "angle_u_mean_deg", "angle_v_mean_deg"):
        assert tiny[c] == pytest.approx(unit[c], abs=1e-4), c
    assert tiny["sv_drift_topk"] == pytest.approx(unit["sv_drift_topk"], rel=1e-4)
    assert not spectral._tile_safe(torch.full((4, 4), 2.0**-41))
    assert spectral._tile_safe(torch.full((4, 4), 2.0**-40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul64_on_a_transposed_view_matches_float64(monkeypatch, dtype):
    # The fast solver sees a wide matrix as the transpose of a contiguous one; _matmul64 then sums products of
    # blocks of the stored rows. Small blocks force several (and a ragged last one); the row-major path is
    # checked against the same reference.
    monkeypatch.setattr(spectral, "_ROW_BLOCK", 64)
    X = torch.randn(300, 170, generator=torch.Generator().manual_seed(5)).to(dtype)
    Z = torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    want = X.double().T @ Z
    for W in (X.T, X.T.contiguous()):
        got = spectral._matmul64(W, Z)
        assert got.dtype == torch.float64 and got.shape == (170, 9)
        assert float((got - want).abs().max()) <= 1e-13 * float(want.abs().max())
    # The magnitude check reads the stored order of a transposed view: same answer either way.
    tiny = torch.full((40, 30), 2.0**-41)
    tiny[3, 7] = 2.0**-40
    assert spectral._tile_safe(tiny.T) and spectral._tile_safe(tiny.T.contiguous())
    assert not spectral._tile_safe(torch.full((40, 30), 2.0**-41).T)


@pytest.mark.parametrize(("m", "n", "k", "cycle"), [(2000, 400, 64, None), (1200, 300, 16, 2)])
def test_thick_restarts_keep_the_documented_accuracy(monkeypatch, m, n, k, cycle):
    # Through the Gram matrix (a tall matrix here) the basis restarts from its top k + k/2 Ritz vectors every
    # RESTART_STEPS steps: with the default cycle (basis capped at 320 columns for k = 64) and with a short
    # one, a dense spectrum around k restarts and still meets the tolerances, for the values and for the
    # angles between base and tuned, as the same solver without restarts does.
    W0, W1 = noise_bulk_pair(m, n)
    if cycle is not None:
        monkeypatch.setattr(spectral, "RESTART_STEPS", cycle)
    opts = SpectralOptions(max_iter=80)
    r0 = topk_svd_fast(W0, k, opts)
    r1 = topk_svd_fast(W1, k, opts, first_check=r0.iterations, expected_steps=r0.iterations)
    assert r0.restarts >= 1 and r1.restarts >= 1, (r0.restarts, r1.restarts)
    monkeypatch.setattr(spectral, "RESTART_STEPS", 10**6)
    plain = topk_svd_fast(W0, k, opts)
    assert plain.restarts == 0
    ref = reference.spectral(W0.double().numpy(), W1.double().numpy(), k=k, r=k)
    for res, W in ((r0, W0), (r1, W1), (plain, W0)):
        ref_s = np.linalg.svd(W.double().numpy(), compute_uv=False)[:k]
        assert np.max(np.abs(res.S.numpy() - ref_s) / ref_s) < 1e-6
        # The vectors are orthonormal (the kept Ritz vectors carry the basis through each restart).
        eye = torch.eye(k, dtype=torch.float64)
        assert float((res.V.T @ res.V - eye).abs().max()) < 1e-10
    got_u = float(torch.rad2deg(principal_angles(r0.U, r1.U)).max())
    got_v = float(torch.rad2deg(principal_angles(r0.V, r1.V)).max())
    assert abs(got_u - ref["angle_u_max_deg"]) <= 0.01 + 0.02 * ref["angle_u_max_deg"]
    assert abs(got_v - ref["angle_v_max_deg"]) <= 0.01 + 0.02 * ref["angle_v_max_deg"]


def test_no_restarts_through_w():
    # Applied through W itself (a square matrix without bf16 tiles), the steps' products dominate, and extra
    # steps after a restart would cost more than the smaller basis saves: the basis grows as before.
    W0, _ = noise_bulk_pair(500, 500)
    res = topk_svd_fast(W0, 16, SpectralOptions(), expected_steps=1)
    assert res.restarts == 0


def test_orth_cholesky_qr_and_its_fallback(monkeypatch):
    # CholeskyQR2 for well-conditioned blocks, Householder QR for the rest; either way an orthonormal basis of
    # Y's columns with Q^T Y upper triangular (Y = Q R).
    g = torch.Generator().manual_seed(3)
    good = torch.randn(500, 12, dtype=torch.float64, generator=g)
    ill = good.clone()
    ill[:, 5] = ill[:, 4] + 1e-9 * ill[:, 6]  # condition number ~1e9
    deficient = good.clone()
    deficient[:, 7] = 0.0
    calls: list[int] = []
    real_qr = torch.linalg.qr

    def qr(A: torch.Tensor, mode: str = "reduced") -> Any:
        calls.append(A.shape[1])
        return real_qr(A, mode=mode)

    monkeypatch.setattr(torch.linalg, "qr", qr)
    for Y, householder in ((good, False), (ill, True), (deficient, True)):
        calls.clear()
        Q = spectral._orth(Y)
        assert bool(calls) == householder
        assert bool(torch.isfinite(Q).all())
        assert float((Q.T @ Q - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-13
        R = Q.T @ Y
        assert float(R.tril(-1).abs().max()) < 1e-12 * float(R.abs().max())


def test_a_run_that_restarts_gets_twice_the_steps(monkeypatch):
    # Restarted iterations need more (cheaper) steps: a step limit just under what this run needs would stop it
    # short without the allowance, and with it the run converges exactly as with a generous limit.
    W0, _ = noise_bulk_pair(1200, 300)
    monkeypatch.setattr(spectral, "RESTART_STEPS", 2)
    generous = topk_svd_fast(W0, 16, SpectralOptions(max_iter=80))
    tight = topk_svd_fast(W0, 16, SpectralOptions(max_iter=generous.iterations - 2))
    assert tight.restarts >= 1 and tight.iterations == generous.iterations
    assert torch.equal(tight.S, generous.S) and torch.equal(tight.V, generous.V)


def test_a_fast_run_stopped_by_its_step_limit_falls_back_to_gram():
    # Values that have not settled are not reported as if they had: the pair's columns come from the float64
    # Gram solver instead, and svd_solver says so.
    W0, W1 = noise_bulk_pair(700, 600)
    assert topk_svd_fast(W0, 16, SpectralOptions()).converged
    assert not topk_svd_fast(W0, 16, SpectralOptions(max_iter=2)).converged
    short = spectral_metrics(W0, W1, SpectralOptions(solver="fast", rank=16, principal_rank=16, max_iter=2))
    gram = spectral_metrics(W0, W1, SpectralOptions(solver="gram", rank=16, principal_rank=16))
    got, want = short.columns, gram.columns
    assert got["svd_solver"] == "gram"
    for c in ("angle_u_max_deg", "angle_v_max_deg", "sv_drift", "sv_drift_topk", "sigma1_rel_change"):
        assert got[c] == pytest.approx(want[c], rel=1e-9, abs=1e-12), c
    assert short.vectors["sv_base"] == gram.vectors["sv_base"]  # the full spectrum, as gram gives it
    for c in ("principal_overlap", "lowmag_overlap", "principal_energy"):
        assert got[c] == pytest.approx(want[c], abs=1e-3), c


def ulp_moved(W0: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """W0 (bf16 values) with two thirds of its elements moved by one bf16 rounding step: a noise-like update
    whose entries (differences of neighbouring bf16 values) are themselves bf16 values."""
    g = torch.Generator().manual_seed(seed)
    bits = W0.to(torch.bfloat16).view(torch.int16)
    # -1, 0 or +1 on the bit pattern: a step down or up in magnitude (never below zero), with random signs.
    step = torch.randint(-1, 2, W0.shape, generator=g, dtype=torch.int16)
    step[(bits & 0x7FFF) == 0] = 0
    return (bits + step).view(torch.bfloat16).float()


def test_bf16_valued():
    W0, _ = noise_bulk_pair(300, 200)
    D = ulp_moved(W0) - W0
    assert spectral._bf16_valued(D) and spectral._bf16_valued(D.T)  # stored and transposed order
    assert not spectral._bf16_valued(D + 1e-6 * (D != 0))
    off = D.clone()
    off[-1, -1] = 1 + 2.0**-10  # one entry with more significant bits than bf16's 8
    assert not spectral._bf16_valued(off) and not spectral._bf16_valued(off.T)


def _update_norm_reference(D: torch.Tensor) -> float:
    return float(np.linalg.norm(D.double().numpy(), ord=2))


def test_noise_like_update_switches_to_its_gram_matrix(gram_calls):
    # sigma_1 of a noise-like update (every element moved by a rounding step or two) settles slowly: after
    # UPDATE_GRAM_AFTER steps through dW its values still move, and the rest of the run goes through dW's
    # Gram matrix from bf16 tiles (exact: dW's entries are bf16 values), restarting, in the same Krylov space.
    W0, _ = noise_bulk_pair(1500, 400)
    D = ulp_moved(W0) - W0
    opts = SpectralOptions(solver="fast")
    got = spectral._spectral_norm(D, opts, "fast")
    assert gram_calls == [True]
    assert abs(got - _update_norm_reference(D)) <= 1e-5 * _update_norm_reference(D)
    # The same run without the switch stays direct, and agrees to the solver's tolerance.
    res = topk_svd_fast(D, 1, SpectralOptions(tol=1e-5, max_iter=60, seed=1), block=16, float64_ritz=False)
    assert gram_calls == [True] and res.iterations > spectral.UPDATE_GRAM_AFTER
    assert abs(got - float(res.S[0])) <= 2e-5 * got
    # The switched run restarted (its basis is capped) and used more than UPDATE_GRAM_AFTER steps.
    switched = topk_svd_fast(
        D, 1, SpectralOptions(tol=1e-5, max_iter=60, seed=1), block=16, float64_ritz=False, gram_after=4
    )
    assert switched.restarts >= 1 and switched.converged
    assert float(switched.S[0]) == got


def test_update_that_settles_early_or_is_not_bf16_valued_stays_direct(gram_calls):
    # A low-rank (trained-like) update settles within UPDATE_GRAM_AFTER steps: no Gram matrix. A noise-like
    # update whose entries are not all bf16 values (a weight near zero that moved far, relative to its own
    # size) cannot use the tiles: it stays direct too. Both are right.
    W0, W1 = noise_bulk_pair(1500, 400)
    assert not spectral._bf16_valued(W1 - W0)
    g = torch.Generator().manual_seed(5)
    low = 1e-2 * torch.randn(1500, 2, generator=g) @ torch.randn(2, 400, generator=g)
    W2 = (W0 + low).to(torch.bfloat16).float()
    opts = SpectralOptions(solver="fast")
    for D in (W2 - W0, W1 - W0):
        got = spectral._spectral_norm(D, opts, "fast")
        assert abs(got - _update_norm_reference(D)) <= 1e-5 * _update_norm_reference(D)
    assert gram_calls == []
