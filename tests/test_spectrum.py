"""``weightdiff spectrum`` against numpy's float64 SVD, on generated and real matrices."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff.cli import app
from weightdiff.metrics.spectral import matrix_spectrum
from weightdiff.spectrum import spectrum


def ref_figures(W: np.ndarray, k: int) -> dict:
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    fro2 = float(np.sum(W.astype(np.float64) ** 2))
    return {
        "s": s,
        "spectral_norm": s[0],
        "stable_rank": fro2 / s[0] ** 2,
        "effective_rank": math.exp(-float(np.sum(p * np.log(p)))),
        "topk_energy_share": float(np.sum(s[:k] ** 2)) / fro2,
    }


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (64, 64)])
def test_matrix_spectrum_matches_numpy(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g) * torch.logspace(0, -2, shape[1])
    got = matrix_spectrum(W, 8, full=True)
    ref = ref_figures(W.numpy(), 8)
    np.testing.assert_allclose(got["singular_values"][:8], ref["s"][:8], rtol=1e-9)
    for key in ("spectral_norm", "stable_rank", "effective_rank", "topk_energy_share"):
        assert got[key] == pytest.approx(ref[key], rel=1e-7), key
    assert len(got["singular_values"]) == min(shape)


def test_spectrum_command_one_and_two_checkpoints(tmp_path):
    base = llama_like(layers=2)
    tuned = perturb(base, frac=0.5, scale=0.05)
    write_checkpoint(tmp_path / "b" / "model.safetensors", base)
    write_checkpoint(tmp_path / "t" / "model.safetensors", tuned)
    out = tmp_path / "s.parquet"
    res = CliRunner().invoke(app, ["spectrum", str(tmp_path / "b"), "-o", str(out), "--rank", "4"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    # 1-D norms are skipped; every 2-D matrix has a row with its top 4 singular values.
    assert len(df) == sum(1 for v in base.values() if v.dim() == 2)
    for row in df.itertuples():
        ref = ref_figures(base[row.name].float().numpy(), 4)
        np.testing.assert_allclose(row.singular_values, ref["s"][:4], rtol=1e-9)
        assert row.stable_rank == pytest.approx(ref["stable_rank"], rel=1e-7)
    assert df["tuned_spectral_norm"].isna().all()

    res = CliRunner().invoke(
        app, ["spectrum", str(tmp_path / "b"), str(tmp_path / "t"), "-o", str(out), "--full"]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    for row in df.itertuples():
        s0 = ref_figures(base[row.name].float().numpy(), 4)["s"]
        s1 = ref_figures(tuned[row.name].float().numpy(), 4)["s"]
        np.testing.assert_allclose(row.sv_rel_drift, (s1 - s0) / s0, rtol=1e-6, atol=1e-12)
        assert row.sv_drift == pytest.approx(np.linalg.norm(s1 - s0) / np.linalg.norm(s0), rel=1e-6)
        assert len(row.singular_values) == min(base[row.name].shape)


def test_spectrum_of_real_checkpoint(silero):
    report = spectrum(str(silero), rank=8)
    from safetensors.torch import load_file

    tensors = load_file(str(silero))
    assert report.rows
    for row in report.rows:
        ref = ref_figures(tensors[row["name"]].numpy(), 8)
        np.testing.assert_allclose(row["singular_values"], ref["s"][:8], rtol=1e-8)
        assert row["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-6)


def test_spectrum_nothing_to_analyse(tmp_path):
    write_checkpoint(tmp_path / "v.safetensors", {"bias": torch.zeros(4)})
    res = CliRunner().invoke(app, ["spectrum", str(tmp_path / "v.safetensors")])
    assert res.exit_code != 0
