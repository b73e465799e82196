"""Assertions shared by the real-world checkpoint tests: a report row against tests/reference.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests import reference

EXACT = ("numel", "changed_exact", "changed_bf16", "changed_atol", "hidden_by_bf16", "ulp_hist")
CLOSE = ("delta_fro", "base_fro", "cosine", "delta_max")


def assert_elementwise(row: dict[str, Any], base: torch.Tensor, tuned: torch.Tensor) -> None:
    """``row``'s element-wise columns equal the float64 numpy reference on these (float32-exact) values."""
    ref = reference.elementwise(base.float().numpy(), tuned.float().numpy())
    for key in EXACT:
        assert row[key] == ref[key], (row["name"], key, row[key], ref[key])
    for key in CLOSE:
        if ref[key] is None:
            assert row[key] is None, (row["name"], key)
        else:
            assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (row["name"], key)


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}
