"""weightdiff consistency (metrics.md section 3): known answers on constructed masks, a property test against a
plain float64 numpy implementation, the chunked streaming path, and the command line end to end on real
safetensors files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference
from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import cli
from weightdiff.consistency import (
    agreement_from_counts,
    consistency,
    make_consistency_plan,
    mask_agreement,
    tensor_agreement,
    update_masks,
)
from weightdiff.errors import InputError, NothingComparableError
from weightdiff.metrics.elementwise import elementwise_metrics
from weightdiff.schema import CONSISTENCY_COLUMN_NAMES, SCHEMA_VERSION, decode_metadata
from weightdiff.sources.format import TensorInfo

REPO = Path(__file__).resolve().parents[1]


def masks_of(*rows: str) -> list[torch.Tensor]:
    return [torch.tensor([c == "1" for c in row]) for row in rows]


# --------------------------------------------------------------------------------------------------------------
# Reference: metrics.md section 3 written plainly in float64 numpy, sharing no code with weightdiff
# --------------------------------------------------------------------------------------------------------------


def reference_agreement(masks: np.ndarray) -> dict:
    """masks: R x N bool array."""
    runs, n = masks.shape
    m = masks.astype(np.float64)
    p = m.mean(axis=1) if n else np.full(runs, np.nan)
    jac, base, ovl, ovl_base = [], [], [], []
    for r in range(runs):
        for s in range(runs):
            inter = float(np.sum(m[r] * m[s]))
            if r < s:
                union = float(np.sum(np.maximum(m[r], m[s])))
                if union > 0:
                    jac.append(inter / union)
                    base.append(p[r] * p[s] / (p[r] + p[s] - p[r] * p[s]))
            if r != s and m[r].sum() > 0:
                ovl.append(inter / m[r].sum())
                ovl_base.append(p[s])

    def mean(v: list) -> float | None:
        return float(np.mean(v)) if v else None

    jm, jr = mean(jac), mean(base)
    consensus = m.mean(axis=0)
    return {
        "changed": [int(x) for x in masks.sum(axis=1)],
        "density": [float(x) for x in p] if n else [None] * runs,
        "jaccard_mean": jm,
        "jaccard_random": jr,
        "jaccard_ratio": jm / jr if jm is not None and jr else None,
        "overlap_mean": mean(ovl),
        "overlap_random": mean(ovl_base),
        "consensus_mean": float(consensus.mean()) if n else None,
        "unanimous_fraction": float(np.all(masks, axis=0).mean()) if n else None,
    }


def assert_matches_reference(got: dict, ref: dict, rel: float = 1e-12) -> None:
    assert got["changed"] == ref["changed"]
    for key in ref:
        if key == "changed":
            continue
        want = ref[key]
        if want is None or (isinstance(want, list) and want and want[0] is None):
            assert got[key] == want, key
        else:
            assert got[key] == pytest.approx(want, rel=rel, abs=1e-15), key


# --------------------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------------------


def test_hand_computed_example_every_column():
    # N = 8; |M1| = 2, |M2| = 2, |M3| = 4; M1&M2 = 1, M1&M3 = 2, M2&M3 = 2; only element 0 is in all three.
    got = mask_agreement(masks_of("11000000", "10100000", "11110000"))
    jaccard = (Fraction(1, 3) + Fraction(1, 2) + Fraction(1, 2)) / 3  # 4/9
    random = (Fraction(1, 7) + Fraction(1, 5) + Fraction(1, 5)) / 3  # p=q=1/4 -> 1/7; 1/4, 1/2 -> 1/5
    expected = {
        "numel": 8,
        "runs": 3,
        "changed": [2, 2, 4],
        "density": [0.25, 0.25, 0.5],
        "jaccard_mean": float(jaccard),
        "jaccard_random": float(random),
        "jaccard_ratio": float(jaccard / random),  # 140/57
        # o(1,2)=1/2 o(1,3)=1 o(2,1)=1/2 o(2,3)=1 o(3,1)=1/2 o(3,2)=1/2; baselines 1/4 1/2 1/4 1/2 1/4 1/4
        "overlap_mean": 2 / 3,
        "overlap_random": 1 / 3,
        "consensus_mean": 1 / 3,  # C = [1, 2/3, 2/3, 1/3, 0, 0, 0, 0]
        "unanimous": 1,
        "unanimous_fraction": 1 / 8,
    }
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert got[key] == pytest.approx(want, rel=1e-15), key
    assert got["changed"] == [2, 2, 4] and all(isinstance(c, int) for c in got["changed"])


def test_identical_runs_give_jaccard_one_and_ratio_one_over_baseline():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(10_000, generator=g) < 0.2
    got = mask_agreement([m, m.clone(), m.clone()])
    p = int(m.sum()) / m.numel()
    baseline = p * p / (2 * p - p * p)
    assert got["jaccard_mean"] == 1.0 and got["overlap_mean"] == 1.0
    assert got["jaccard_random"] == pytest.approx(baseline, rel=1e-14)
    assert got["jaccard_ratio"] == pytest.approx(1 / baseline, rel=1e-14)
    assert got["overlap_random"] == pytest.approx(p, rel=1e-14)
    assert got["unanimous_fraction"] == got["consensus_mean"] == pytest.approx(p, rel=1e-14)


def test_independent_masks_match_the_bernoulli_baseline():
    g = torch.Generator().manual_seed(1)
    n = 1 << 20
    masks = [torch.rand(n, generator=g) < d for d in (0.3, 0.1, 0.05, 0.3)]
    got = mask_agreement(masks)
    # Per pair the Jaccard of 2^20 independent draws has a relative spread of about 1%; the mean of 6 pairs less.
    assert got["jaccard_ratio"] == pytest.approx(1.0, abs=0.02)
    assert got["overlap_mean"] == pytest.approx(got["overlap_random"], rel=0.02)
    assert got["unanimous_fraction"] == pytest.approx(0.3 * 0.1 * 0.05 * 0.3, rel=0.2)


def test_disjoint_masks_give_zero():
    got = mask_agreement(masks_of("110000", "001100", "000011"))
    assert got["jaccard_mean"] == 0.0 and got["jaccard_ratio"] == 0.0
    assert got["jaccard_random"] == pytest.approx(1 / 5)  # p = q = 1/3: (1/9) / (2/3 - 1/9)
    assert (
        got["overlap_mean"] == 0.0 and got["unanimous"] == 0 and got["consensus_mean"] == pytest.approx(1 / 3)
    )


def test_empty_masks_are_left_out_of_the_means():
    # Both empty: no union, so no pair; nothing changed anywhere: every mean is null.
    got = mask_agreement(masks_of("0000", "0000"))
    assert got["jaccard_mean"] is None and got["jaccard_random"] is None and got["jaccard_ratio"] is None
    assert got["overlap_mean"] is None and got["overlap_random"] is None
    assert got["consensus_mean"] == 0.0 and got["unanimous_fraction"] == 0.0 and got["changed"] == [0, 0]
    # Runs 1 and 2 empty, run 3 not: pair (1, 2) is left out; (1, 3) and (2, 3) give J = 0 and baseline 0, so the
    # ratio is null; only r = 3 has a non-empty M_r for the one-sided overlap.
    got = mask_agreement(masks_of("0000", "0000", "1100"))
    assert got["jaccard_mean"] == 0.0 and got["jaccard_random"] == 0.0 and got["jaccard_ratio"] is None
    assert got["overlap_mean"] == 0.0 and got["overlap_random"] == 0.0
    # A tensor with no elements has no densities at all.
    got = mask_agreement([torch.zeros(0, 3, dtype=torch.bool)] * 2)
    assert got["density"] == [None, None] and got["consensus_mean"] is None and got["jaccard_mean"] is None


def test_mask_agreement_refuses_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        mask_agreement(masks_of("01"))
    with pytest.raises(ValueError, match="bool"):
        mask_agreement([torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match="shape"):
        mask_agreement(masks_of("01", "011"))
    with pytest.raises(ValueError, match="layout"):
        agreement_from_counts(4, [1, 2, 3])


def test_counts_are_exact_beyond_float32_integers():
    # 2^24 + 1 cannot be counted in float32; the int64 popcount path must get it exactly.
    n = (1 << 24) + 3
    a = torch.ones(n, dtype=torch.bool)
    b = a.clone()
    b[:2] = False
    got = mask_agreement([a, b])
    assert got["changed"] == [n, n - 2] and got["unanimous"] == n - 2
    assert got["jaccard_mean"] == (n - 2) / n


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=2, max_value=5).flatmap(
        lambda r: st.integers(min_value=0, max_value=40).flatmap(
            lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=r, max_size=r)
        )
    )
)
def test_property_matches_float64_numpy_reference(rows):
    masks = np.array(rows, dtype=bool).reshape(len(rows), -1)
    got = mask_agreement([torch.from_numpy(m.copy()) for m in masks])
    assert_matches_reference(got, reference_agreement(masks))


# --------------------------------------------------------------------------------------------------------------
# Masks from weights, chunking and stripes
# --------------------------------------------------------------------------------------------------------------


def test_update_mask_is_compares_bf16_mask():
    base = torch.tensor([0.0, -0.0, 1.0, float("nan"), 1.0, 1.0 + 2**-10, 3.0])
    run = torch.tensor([-0.0, 0.0, float("nan"), float("nan"), 1.0 + 2**-10, 1.0, 3.5])
    # +0 == -0; NaN on either side counts as changed; 1 + 2^-10 rounds to 1 in bf16 (8 significand bits).
    assert update_masks(base, [run])[0].tolist() == [False, False, True, True, False, False, True]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, generator=g)
    for y in (
        x * (1 + 1e-3 * torch.randn(5000, generator=g)),
        (x * 1.01).to(torch.bfloat16),
        x.double() * 1.001,
    ):
        count = int(update_masks(x, [y])[0].sum())
        assert count == elementwise_metrics(x, y)["changed_bf16"]


def test_chunked_counts_and_stripes_equal_whole_masks():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 29, generator=g).to(torch.bfloat16)
    runs = [perturb({"w": base}, frac=f, seed=i)["w"] for i, f in enumerate((0.5, 0.2, 0.35))]
    masks = update_masks(base, runs)
    whole = mask_agreement(masks)
    consensus = torch.stack(masks).to(torch.int64).sum(0)
    for chunk in (1, 30, 100, 1 << 20):  # chunks smaller than a row, not dividing rows, and the whole tensor
        got = tensor_agreement(base, runs, stripes=True, chunk=chunk)
        assert agreement_from_counts(base.numel(), got.counts) == whole
        assert torch.equal(got.row_counts, consensus.sum(1)) and torch.equal(got.col_counts, consensus.sum(0))
    flat = tensor_agreement(base[0], [r[0] for r in runs], stripes=True, chunk=7)
    assert torch.equal(flat.row_counts, consensus[0]) and flat.col_counts is None


def test_plan_lists_missing_shape_and_dtype_mismatches():
    def info(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> TensorInfo:
        return TensorInfo(name=name, dtype=dtype, shape=shape, start=0, end=0, file="f")

    base = {n: info(n, (2, 2)) for n in ("a", "b", "c", "d", "layers.10.x", "layers.9.x")}
    base["e"] = info("e", (2,), "I64")
    run1 = dict(base)
    run2 = {**base, "b": info("b", (3, 2)), "c": info("c", (2, 2), "F32"), "extra": info("extra", (1,))}
    del run2["a"]
    plan = make_consistency_plan(base, [run1, run2], exclude=["d"])
    assert [i.name for i in plan.items] == ["c", "layers.9.x", "layers.10.x"]
    assert plan.missing == [("a", ["run2"]), ("extra", ["base", "run1"])]
    assert plan.shape_mismatch == [("b", {"base": (2, 2), "run1": (2, 2), "run2": (3, 2)})]
    assert plan.dtype_mismatch == [("c", {"base": "BF16", "run1": "BF16", "run2": "F32"})]
    assert plan.not_float == ["e"] and plan.excluded == 1


# --------------------------------------------------------------------------------------------------------------
# End to end on real safetensors files
# --------------------------------------------------------------------------------------------------------------

MISSING = "model.layers.1.mlp.up_proj.weight"
RESHAPED = "model.layers.0.mlp.down_proj.weight"
STRIPED = "model.layers.0.self_attn.q_proj.weight"


def write_runs(tmp_path: Path) -> tuple[Path, list[Path], dict, list[dict]]:
    """Base + 3 runs (bf16): run3 lacks one tensor, run2 reshapes another, and every run changes all of row 0 of
    one q_proj (so that the stripes must show that row at 1.0)."""
    base = llama_like(layers=2)
    runs = []
    for i in range(3):
        run = perturb(base, frac=0.1 + 0.1 * i, seed=10 + i)
        run[STRIPED][0] = base[STRIPED][0] * 2
        runs.append(run)
    runs[2].pop(MISSING)
    runs[1][RESHAPED] = runs[1][RESHAPED].reshape(-1)
    write_checkpoint(tmp_path / "base" / "model.safetensors", base)
    paths = []
    for i, run in enumerate(runs):
        paths.append(write_checkpoint(tmp_path / f"r{i + 1}.safetensors", run))
    return tmp_path / "base", paths, base, runs


def reference_masks(base: dict, runs: list[dict], name: str) -> np.ndarray:
    b = reference.bf16_value(reference.bf16_bits_from_f32(base[name].float().numpy()))
    out = []
    for run in runs:
        r = reference.bf16_value(reference.bf16_bits_from_f32(run[name].float().numpy()))
        out.append(~(b == r).ravel())
    return np.array(out)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "weightdiff", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def test_cli_end_to_end(tmp_path):
    base_dir, run_paths, base, runs = write_runs(tmp_path)
    out, stripes, js = tmp_path / "c.parquet", tmp_path / "s.parquet", tmp_path / "c.json"
    files = ["-o", str(out), "--stripes", str(stripes), "--json", str(js)]
    res = run_cli("consistency", str(base_dir), *map(str, run_paths), *files)
    assert res.returncode == 0, res.stderr
    assert f"1 missing from some checkpoint, skipped: {MISSING} (missing from run3)" in res.stderr
    assert (
        f"1 shape mismatches, skipped: {RESHAPED} base [32, 48] vs run1 [32, 48] vs run2 [1536]" in res.stderr
    )
    assert "Per module (numel-weighted mean over tensors)" in res.stdout
    assert "Layers by agreement" in res.stdout

    df = pd.read_parquet(out)
    assert list(df.columns) == list(CONSISTENCY_COLUMN_NAMES)
    expected_names = sorted(set(base) - {MISSING, RESHAPED})
    assert sorted(df["name"]) == expected_names and len(df) == len(base) - 2
    layers = [x for x in df["layer"].tolist() if x is not pd.NA]
    assert layers == sorted(layers) and str(df["numel"].dtype) == "int64"
    for row in df.itertuples():
        ref = reference_agreement(reference_masks(base, runs, row.name))
        got = {k: getattr(row, k) for k in ref}
        got["changed"] = [int(c) for c in row.changed]
        got["density"] = [float(d) for d in row.density]
        got = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in got.items()}
        assert_matches_reference(got, ref)
        assert row.runs == 3 and row.numel == base[row.name].numel()

    meta = decode_metadata(pq.read_schema(out).metadata)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["report"] == "consistency"
    assert [r["given"] for r in meta["runs"]] == [str(p) for p in run_paths]
    assert meta["base"]["given"] == str(base_dir) and "created" in meta and "weightdiff_version" in meta
    assert meta["plan"]["missing"] == [{"name": MISSING, "missing_from": ["run3"]}]
    assert meta["plan"]["shape_mismatch"][0]["name"] == RESHAPED
    assert meta["options"]["stripes"] is True

    s = pd.read_parquet(stripes)
    assert list(s.columns) == ["name", "axis", "index", "fraction"]
    q = s[s["name"] == STRIPED]
    rows_q = q[q["axis"] == "row"].sort_values("index")["fraction"].to_numpy()
    cols_q = q[q["axis"] == "col"].sort_values("index")["fraction"].to_numpy()
    consensus = reference_masks(base, runs, STRIPED).mean(axis=0).reshape(base[STRIPED].shape)
    assert rows_q[0] == 1.0
    np.testing.assert_allclose(rows_q, consensus.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(cols_q, consensus.mean(axis=0), rtol=1e-14)
    norm = s[s["name"] == "model.norm.weight"]  # 1-D: rows only, one per element
    assert set(norm["axis"]) == {"row"} and len(norm) == base["model.norm.weight"].numel()
    assert set(s["name"]) == set(expected_names)

    summary = json.loads(js.read_text())
    assert summary["overall"]["runs"] == 3 and summary["aggregation"] == "numel-weighted mean over tensors"
    assert {m["module"] for m in summary["modules"]} >= {"self_attn.q_proj", "mlp.up_proj"}
    assert summary["highest_agreement_layers"] and summary["lowest_agreement_layers"]


def test_cli_nothing_comparable_exits_3(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    b = write_checkpoint(tmp_path / "b.safetensors", {"y": torch.zeros(2)})
    out = tmp_path / "c.parquet"
    res = run_cli("consistency", str(a), str(b), str(b), "-o", str(out), "--stripes", str(tmp_path / "s.pq"))
    assert res.returncode == 3, res.stderr
    assert "error: nothing to compare across" in res.stderr
    assert (
        "2 missing from some checkpoint, skipped: x (missing from run1, run2), y (missing from base)"
        in res.stderr
    )
    assert not out.exists() and not (tmp_path / "s.pq").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_missing_path_is_one_line_exit_2(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    out = tmp_path / "c.parquet"
    res = run_cli("consistency", str(a), str(a), str(tmp_path / "nope"), "-o", str(out))
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'nope'}: no such file or directory"], res.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The CLI in-process (cheaper than a subprocess for errors raised before any tensor is read)."""
    monkeypatch.setattr(sys, "argv", ["weightdiff", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one run", "consistency needs BASE and at least two runs, got 1 run"),
        ("bad output dir", "cannot write --output: directory"),
        ("bad stripes dir", "cannot write --stripes: directory"),
        ("same file", "--stripes and --output name the same file"),
        ("bad device", "--device: 'tpu' is not a device"),
    ],
)
def test_cli_usage_errors_exit_2_before_reading(tmp_path, monkeypatch, capsys, case, message):
    a = str(write_checkpoint(tmp_path / "a.safetensors", {"x": torch.zeros(2)}))
    out = str(tmp_path / "c.parquet")
    args = {
        "one run": [a, a, "-o", out],
        "bad output dir": [a, a, a, "-o", str(tmp_path / "no" / "c.parquet")],
        "bad stripes dir": [a, a, a, "-o", out, "--stripes", str(tmp_path / "no" / "s.parquet")],
        "same file": [a, a, a, "-o", out, "--stripes", out],
        "bad device": [a, a, a, "-o", out, "--device", "tpu"],
    }[case]
    code, err = run_main(monkeypatch, capsys, "consistency", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not Path(out).exists()


def test_python_api_returns_table_and_plan(tmp_path):
    base_dir, run_paths, base, runs = write_runs(tmp_path)
    report = consistency(
        str(base_dir), [str(p) for p in run_paths], include=["model.layers.0.*"], device="cpu"
    )
    assert report.table.column_names == list(CONSISTENCY_COLUMN_NAMES)
    assert all(n.startswith("model.layers.0.") for n in report.table.column("name").to_pylist())
    assert report.plan.excluded > 0 and report.plan.shape_mismatch[0][0] == RESHAPED
    row = next(r for r in report.rows if r["name"] == STRIPED)
    assert row["changed"] == [int(m.sum()) for m in reference_masks(base, runs, STRIPED)]
    assert report.summary()["overall"]["tensors"] == report.table.num_rows
    with pytest.raises(InputError, match="at least two runs"):
        consistency(str(base_dir), [str(run_paths[0])])
    with pytest.raises(NothingComparableError):
        consistency(str(base_dir), [str(p) for p in run_paths], include=["nothing*"])
