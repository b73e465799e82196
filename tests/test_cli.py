"""The command line end to end: outputs, exit codes and exact one-line errors, with real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests import reference
from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff.schema import COLUMN_NAMES, SCHEMA_VERSION, decode_metadata


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "weightdiff", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=300,
    )


def test_compare_writes_report_matching_reference(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "report.parquet"
    res = run("compare", str(base), str(tuned), "-o", str(out), "--no-spectral")
    assert res.returncode == 0, res.stderr
    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMN_NAMES)
    assert str(df["numel"].dtype) == "int64" and str(df["layer"].dtype) == "Int64"
    assert df["layer"].isna().sum() == 3  # embed_tokens, norm and lm_head sit outside the blocks
    b = llama_like()
    t = perturb(b)
    for row in df.itertuples():
        ref = reference.elementwise(b[row.name].float().numpy(), t[row.name].float().numpy())
        assert row.changed_exact == ref["changed_exact"]
        assert row.changed_bf16 == ref["changed_bf16"]
        assert list(row.ulp_hist) == ref["ulp_hist"]
        assert row.delta_fro == pytest.approx(ref["delta_fro"], rel=1e-9)
    # Natural layer order: layers.0 < layers.1 < layers.2, and the report reads back in pandas with groupby.
    layers = [x for x in df["layer"].tolist() if x is not pd.NA]
    assert layers == sorted(layers)
    assert set(df.groupby("module").sparsity_bf16.mean().index) >= {"self_attn.q_proj", "mlp.up_proj"}
    meta = decode_metadata(pq.read_schema(out).metadata)
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["base"]["given"] == str(base) and meta["tuned"]["resolved"] == str(tuned.resolve())
    assert meta["options"]["atol"] == 1e-5 and "created" in meta
    assert "bf16-aware sparsity" in res.stdout


def test_natural_layer_order(tmp_path):
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(4, 4) for i in (10, 2, 1, 9)}
    write_checkpoint(tmp_path / "a.safetensors", tensors)
    out = tmp_path / "r.parquet"
    assert (
        run(
            "compare", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "-o", str(out)
        ).returncode
        == 0
    )
    assert pd.read_parquet(out)["layer"].tolist() == [1, 2, 9, 10]


def test_plan_mismatches_and_filters(tmp_path):
    b = {
        "a.weight": torch.zeros(2, 2),
        "b.weight": torch.zeros(3),
        "only_base": torch.zeros(1),
        "d": torch.zeros(2),
    }
    t = {
        "a.weight": torch.ones(2, 2),
        "b.weight": torch.zeros(4),
        "only_tuned": torch.zeros(1),
        "d": torch.zeros(2, dtype=torch.bfloat16),
    }
    write_checkpoint(tmp_path / "b.safetensors", b)
    write_checkpoint(tmp_path / "t.safetensors", t)
    js = tmp_path / "s.json"
    res = run("compare", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--json", str(js))
    assert res.returncode == 0, res.stderr
    assert "1 only in base: only_base" in res.stderr and "1 only in tuned: only_tuned" in res.stderr
    assert "1 shape mismatches, skipped: b.weight [3] vs [4]" in res.stderr
    assert "1 dtype mismatches, compared after exact upcasting: d F32 vs BF16" in res.stderr
    summary = json.loads(js.read_text())
    assert summary["plan"]["only_base"] == ["only_base"]
    assert summary["plan"]["shape_mismatch"] == [{"name": "b.weight", "base": [3], "tuned": [4]}]
    assert summary["overall"]["changed_exact"] == 4 and summary["overall"]["tensors"] == 2
    res = run(
        "compare",
        str(tmp_path / "b.safetensors"),
        str(tmp_path / "t.safetensors"),
        "--include",
        "a.*",
        "--json",
        "-",
    )
    assert res.returncode == 0
    assert json.loads(res.stdout)["overall"]["tensors"] == 1


def test_nothing_comparable_exits_3(tmp_path):
    write_checkpoint(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    write_checkpoint(tmp_path / "t.safetensors", {"y": torch.zeros(2)})
    out = tmp_path / "r.parquet"
    res = run("compare", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "-o", str(out))
    assert res.returncode == 3
    assert "nothing to compare" in res.stderr and not out.exists()


def test_sharded_and_single_file_give_identical_reports(tmp_path):
    tensors = llama_like(layers=2)
    tuned = perturb(tensors)
    write_checkpoint(tmp_path / "single" / "model.safetensors", tensors)
    names = sorted(tensors)
    wm = {}
    for i, chunk in enumerate((names[:5], names[5:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        write_checkpoint(tmp_path / "sharded" / shard, {k: tensors[k] for k in chunk})
        wm.update({k: shard for k in chunk})
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    write_checkpoint(tmp_path / "tuned.safetensors", tuned)
    for name in ("single", "sharded"):
        assert (
            run(
                "compare",
                str(tmp_path / name),
                str(tmp_path / "tuned.safetensors"),
                "-o",
                str(tmp_path / f"{name}.parquet"),
            ).returncode
            == 0
        )
    a = pd.read_parquet(tmp_path / "single.parquet")
    b = pd.read_parquet(tmp_path / "sharded.parquet")
    pd.testing.assert_frame_equal(a, b)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = write_checkpoint(tmp_path / "good.safetensors", {"w": torch.zeros(2, 2)})
    notst = tmp_path / "notes.txt"
    notst.write_text("hello world, not a checkpoint")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-4])
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../good.safetensors"}})
    )
    return {
        "missing": (
            [str(tmp_path / "missing"), str(good)],
            f"{tmp_path / 'missing'}: no such file or directory",
        ),
        "not safetensors": ([str(notst), str(good)], f"{notst}: not a safetensors file (header length"),
        "truncated": ([str(good), str(trunc)], f"{trunc}: truncated file: tensor 'w' ends at byte"),
        "pickle": ([str(pickles), str(good)], f"{pickles}: holds only pickle files (pytorch_model.bin)"),
        "outside": (
            [str(evil), str(good)],
            "shard '../good.safetensors' lies outside the checkpoint directory",
        ),
        "unwritable output": (
            [str(good), str(good), "-o", str(tmp_path / "no-such-dir" / "r.parquet")],
            f"{tmp_path / 'no-such-dir' / 'r.parquet'}: cannot write --output: directory",
        ),
        "bad device": ([str(good), str(good), "--device", "tpu"], "--device: 'tpu' is not a device"),
        "bad alpha": ([str(good), str(good), "--alpha", "0"], "--alpha must be in (0, 1], got 0.0"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not safetensors",
        "truncated",
        "pickle",
        "outside",
        "unwritable output",
        "bad device",
        "bad alpha",
    ],
)
def test_bad_input_one_line_error_exit_2_no_report(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "report.parquet"
    extra = [] if "-o" in args else ["-o", str(out)]
    res = run("compare", *args, *extra)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.parquet")]


def test_debug_env_shows_traceback(tmp_path):
    res = run("compare", str(tmp_path / "a"), str(tmp_path / "b"), env={"WEIGHTDIFF_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_failure_mid_stream_leaves_no_report_and_keeps_old_one(tmp_path, monkeypatch):
    from weightdiff import api

    tensors = llama_like(layers=2)
    write_checkpoint(tmp_path / "b.safetensors", tensors)
    out = tmp_path / "r.parquet"
    out.write_bytes(b"previous good report")
    calls = {"n": 0}
    real = api.compare_pairs

    def failing(*a, **k):
        for row in real(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(api, "compare_pairs", failing)
    with pytest.raises(KeyboardInterrupt):
        api.compare(
            str(tmp_path / "b.safetensors"), str(tmp_path / "b.safetensors"), output=str(out), spectral=False
        )
    assert out.read_bytes() == b"previous good report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "r.parquet"]


def test_usage_error_exit_2():
    res = run("compare")
    assert res.returncode == 2


def test_version_and_help():
    assert run("--version").stdout.startswith("weightdiff ")
    assert "compare" in run("--help").stdout


def test_nan_weights_are_counted_not_errors(tmp_path):
    b = {"w": torch.tensor([[1.0, float("nan")], [2.0, 3.0]])}
    t = {"w": torch.tensor([[1.0, 1.0], [float("inf"), 3.0]])}
    write_checkpoint(tmp_path / "b.safetensors", b)
    write_checkpoint(tmp_path / "t.safetensors", t)
    res = run("compare", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--json", "-")
    assert res.returncode == 0, res.stderr
    ov = json.loads(res.stdout)["overall"]
    assert ov["nonfinite_base"] == 1 and ov["nonfinite_tuned"] == 1 and ov["changed_exact"] == 2


def test_max_memory_option(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "r.parquet"
    res = run("compare", str(base), str(tuned), "--max-memory", "2KB", "-o", str(out))
    assert res.returncode == 2 and "--max-memory 2.0 KiB is too small" in res.stderr and not out.exists()
    res = run("compare", str(base), str(tuned), "--max-memory", "lots")
    assert res.returncode == 2 and "'lots' is not a size" in res.stderr
    res = run("compare", str(base), str(tuned), "--max-memory", "64MiB", "--no-spectral", "--json", "-")
    assert res.returncode == 0 and json.loads(res.stdout)["overall"]["tensors"] == 18


def test_the_command_flushes_output_and_runs_atexit_handlers_before_its_quick_exit(pair, tmp_path):
    # ``weightdiff`` (cli.run) skips the interpreter's teardown; what a caller can see must not change.
    base, tuned = pair
    code = (
        "import atexit, sys; atexit.register(lambda: sys.stderr.write('atexit ran\\n'));"
        "sys.argv = ['weightdiff', *sys.argv[1:]]; from weightdiff.cli import run; run()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "compare", str(base), str(tuned), "-o", str(tmp_path / "r.parquet"), "--json", "-", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["overall"]  # the whole JSON document reached the pipe
    assert res.stderr.endswith("atexit ran\n")
    res = subprocess.run(
        [sys.executable, "-c", code, "compare", str(tmp_path / "nope"), str(tuned)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "error: " in res.stderr and res.stderr.endswith("atexit ran\n")
