"""A real checkpoint nobody on the team wrote: silero-vad's fp32 safetensors file from its PyPI wheel (MIT).

The wheel is fetched with ``pip download`` once per session into a cache directory; where that is impossible
(no network, no pip) the tests are skipped with the reason printed, never silently.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import reference
from weightdiff import compare


def test_real_checkpoint_against_itself_and_a_perturbed_copy(silero, tmp_path):
    tensors = load_file(str(silero))
    assert len(tensors) > 5 and all(t.dtype == torch.float32 for t in tensors.values())
    same = compare(str(silero), str(silero), spectral=False)
    assert all(r["changed_exact"] == 0 and r["sparsity_bf16"] == 1.0 for r in same.rows)

    g = torch.Generator().manual_seed(0)
    tuned = {}
    for k, v in tensors.items():
        mask = torch.rand(v.shape, generator=g) < 0.25
        tuned[k] = v + mask * torch.randn(v.shape, generator=g) * 1e-3 * v.abs()
    path = tmp_path / "tuned.safetensors"
    save_file(tuned, str(path))
    report = compare(str(silero), str(path))
    for row in report.rows:
        ref = reference.elementwise(tensors[row["name"]].numpy(), tuned[row["name"]].numpy())
        for key in ("changed_exact", "changed_bf16", "changed_atol", "ulp_hist", "hidden_by_bf16"):
            assert row[key] == ref[key], (row["name"], key)
        assert row["delta_fro"] == pytest.approx(ref["delta_fro"], rel=1e-9)
        assert row["base_fro"] == pytest.approx(ref["base_fro"], rel=1e-9)
        t0 = tensors[row["name"]]
        if t0.dim() == 2 and min(t0.shape) >= 2:
            spec = reference.spectral(t0.double().numpy(), tuned[row["name"]].double().numpy())
            assert row["angle_u_max_deg"] == pytest.approx(spec["angle_u_max_deg"], abs=1e-6)
            assert row["sv_drift"] == pytest.approx(spec["sv_drift"], rel=1e-9)
    # A real fp32 fine-tune-like update hides many changes under bf16 rounding.
    assert sum(r["hidden_by_bf16"] for r in report.rows) > 0
    json.dumps(report.summary())
