"""The shipped examples keep working: the miniature training script (quick mode) and the committed checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from weightdiff import compare
from weightdiff.consistency import consistency

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "examples" / "miniature" / "checkpoints"


def test_training_script_quick_mode_writes_comparable_checkpoints(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "miniature" / "train.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) >= {"base", "sft", "rl_seed0"}
    report = compare(str(tmp_path / "base"), str(tmp_path / "sft"), spectral=False)
    names = {r["name"] for r in report.rows}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert all(r["dtype_base"] == "BF16" for r in report.rows)


@pytest.mark.skipif(not (CKPT / "base").exists(), reason="committed miniature checkpoints are missing")
def test_committed_checkpoints_match_the_documented_figures():
    # The figures quoted in examples/miniature/README.md, recomputed from the committed files.
    rl = compare(str(CKPT / "base"), str(CKPT / "rl_seed0"))
    sft = compare(str(CKPT / "base"), str(CKPT / "sft"), spectral=False)
    sparsity = {name: r.summary()["overall"]["sparsity_bf16"] for name, r in (("rl", rl), ("sft", sft))}
    assert round(sparsity["rl"], 3) == 0.321 and round(sparsity["sft"], 3) == 0.100
    cons = consistency(str(CKPT / "base"), [str(CKPT / f"rl_seed{i}") for i in range(3)])
    weighted = [r for r in cons.rows if r["jaccard_ratio"] is not None]
    assert (
        1.2
        < sum(r["jaccard_ratio"] * r["numel"] for r in weighted) / sum(r["numel"] for r in weighted)
        < 1.35
    )
