"""FP8 checkpoints with DeepSeek-style block scales, from real float8 bytes written by safetensors, and the
quantisation formats that are refused. Dequantisation is redone here block by block with plain torch and the
report is checked against tests/reference.py on those values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.checks import assert_elementwise, by_name
from tests.conftest import write_checkpoint
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.errors import UnsupportedCheckpointError
from weightdiff.sources import open_source
from weightdiff.sources.quant import Fp8Source
from weightdiff.sources.rows import row_slice

E4M3 = torch.float8_e4m3fn
FP8_CONFIG = {
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
}


def quantize(w: torch.Tensor, block=(128, 128), scales: torch.Tensor | None = None):
    """Block-quantise ``w`` to e4m3 codes and float32 scale_inv (one per block, amax / 448 unless given)."""
    bm, bn = block
    sm, sn = -(-w.shape[0] // bm), -(-w.shape[1] // bn)
    codes = torch.empty(w.shape, dtype=E4M3)
    scale = torch.empty(sm, sn) if scales is None else scales
    for i in range(sm):
        for j in range(sn):
            blk = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            if scales is None:
                scale[i, j] = blk.abs().max() / torch.finfo(E4M3).max
            codes[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = (blk / scale[i, j]).to(E4M3)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The test's own dequantisation: every block multiplied by its scalar, in float32."""
    bm, bn = block
    w = codes.to(torch.float32)
    out = torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            out[rows, cols] = w[rows, cols] * scale[i, j]
    return out


def _write(root: Path, tensors: dict[str, torch.Tensor], config: dict | None = FP8_CONFIG) -> Path:
    write_checkpoint(root / "model.safetensors", tensors)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def test_fp8_block_scaled_checkpoints_are_dequantized(tmp_path):
    g = torch.Generator().manual_seed(0)
    up = torch.randn(300, 200, generator=g) * 0.05  # ragged edge blocks in both directions: scales 3 x 2
    up_codes, up_scale = quantize(up)
    up2 = up + (torch.rand(up.shape, generator=g) < 0.3) * torch.randn(up.shape, generator=g) * 5e-3
    up2_codes, _ = quantize(up2, scales=up_scale.clone())  # same scales, some codes move
    q = torch.randn(130, 129, generator=g)
    q_codes, q_scale = quantize(q)
    q_scale2 = q_scale.clone()
    q_scale2[1, 0] *= 1.5  # identical codes, one rescaled block
    down = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    down_codes, down_scale = quantize(down.float())
    raw = torch.randn(16, 8, generator=g).to(torch.float8_e5m2)
    raw2 = raw.clone()
    raw2[0] = torch.full((8,), 2.0).to(torch.float8_e5m2)
    up_name = "model.layers.0.mlp.experts.1.up_proj.weight"
    q_name = "model.layers.0.self_attn.q_proj.weight"
    down_name = "model.layers.0.mlp.down_proj.weight"
    base = _write(
        tmp_path / "base",
        {
            up_name: up_codes,
            up_name + "_scale_inv": up_scale,
            q_name: q_codes,
            q_name + "_scale_inv": q_scale,
            down_name: down,
            "model.layers.0.raw.weight": raw,
            "model.norm.weight": torch.ones(8, dtype=torch.bfloat16),
        },
    )
    tuned = _write(
        tmp_path / "tuned",
        {
            up_name: up2_codes,
            up_name + "_scale_inv": up_scale,
            q_name: q_codes,
            q_name + "_scale_inv": q_scale2,
            down_name: down_codes,
            down_name + "_scale_inv": down_scale,
            "model.layers.0.raw.weight": raw2,
            "model.norm.weight": torch.ones(8, dtype=torch.bfloat16),
        },
    )
    report = compare(str(base), str(tuned), spectral=True, rank=8, principal_rank=8)
    rows = by_name(report.rows)
    assert set(rows) == {up_name, q_name, down_name, "model.layers.0.raw.weight", "model.norm.weight"}

    row = rows[up_name]
    assert_elementwise(row, dequantize(up_codes, up_scale), dequantize(up2_codes, up_scale))
    assert (row["dtype_base"], row["dtype_tuned"], row["layer"], row["expert"]) == (
        "F8_E4M3",
        "F8_E4M3",
        0,
        1,
    )
    stored = int((up_codes.view(torch.uint8) != up2_codes.view(torch.uint8)).sum())
    assert row["changed_stored"] == stored > 0
    assert row["angle_u_max_deg"] is not None  # spectral metrics run on the dequantised matrix

    row = rows[q_name]
    assert_elementwise(row, dequantize(q_codes, q_scale), dequantize(q_codes, q_scale2))
    # The codes are bit-identical; only the rescaled 128 x 1 block (rows 128..129, column 0..127) moved.
    assert row["changed_stored"] == 0
    assert 0 < row["changed_exact"] <= 2 * 128

    row = rows[down_name]  # bf16 base against its FP8 release: compared on values, no bit-level count
    assert_elementwise(row, down, dequantize(down_codes, down_scale))
    assert (row["dtype_base"], row["dtype_tuned"], row["changed_stored"]) == ("BF16", "F8_E4M3", None)

    row = rows["model.layers.0.raw.weight"]  # FP8 without a scale: raw fp8 values
    assert_elementwise(row, raw, raw2)
    assert row["changed_stored"] == int((raw.view(torch.uint8) != raw2.view(torch.uint8)).sum())
    assert rows["model.norm.weight"]["changed_stored"] is None

    plan = report.plan.as_dict()
    assert plan["consumed_scales"] == [n + "_scale_inv" for n in (down_name, up_name, q_name)]
    assert plan["only_base"] == [] and plan["only_tuned"] == []
    assert any("1 FP8 tensors have no scale tensor" in n and "raw.weight" in n for n in plan["notes"])
    assert any(n.startswith("5 FP8 tensors dequantized") for n in plan["notes"])


def test_block_size_from_config_and_row_slices(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, 70, generator=g)
    codes, scale = quantize(w, block=(64, 32))
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}
    root = _write(tmp_path / "ckpt", {"w.weight": codes, "w.weight_scale_inv": scale}, config)
    with open_source(str(root)) as src:
        assert isinstance(src, Fp8Source)
        assert list(src.tensors()) == ["w.weight"]
        info = src.tensors()["w.weight"]
        expected = dequantize(codes, scale, block=(64, 32))
        assert torch.equal(src.read(info), expected)
        assert torch.equal(src.read(row_slice(info, 60, 90)), expected[60:90])
        assert torch.equal(src.read_stored(info).view(torch.uint8), codes.view(torch.uint8))
        assert src.describe()["kind"] == "local"


def test_scale_that_does_not_fit_the_block_size_is_refused(tmp_path):
    codes, scale = quantize(torch.randn(100, 70), block=(64, 32))
    root = _write(tmp_path / "ckpt", {"w.weight": codes, "w.weight_scale_inv": scale}, config=None)
    with pytest.raises(UnsupportedCheckpointError) as exc:
        open_source(str(root))
    message = str(exc.value)
    assert "'w.weight_scale_inv' has shape [2, 3]" in message and "needs [1, 1]" in message
    assert "\n" not in message


REFUSED = {
    "gptq": (
        {
            "model.layers.0.q_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
            "model.layers.0.q_proj.qzeros": torch.zeros(1, 8, dtype=torch.int32),
            "model.layers.0.q_proj.scales": torch.ones(1, 64, dtype=torch.float16),
        },
        "tensor 'model.layers.0.q_proj.qweight' is part of a GPTQ/AWQ packed int4 weight",
    ),
    "bitsandbytes": (
        {
            "x.weight": torch.zeros(16, 1, dtype=torch.uint8),
            "x.weight.absmax": torch.ones(1),
            "x.weight.quant_map": torch.ones(16),
        },
        "tensor 'x.weight.absmax' is part of a bitsandbytes 4-bit weight",
    ),
    "per-tensor weight_scale": (
        {"x.weight": torch.zeros(4, 4).to(E4M3), "x.weight_scale": torch.ones(1)},
        "tensor 'x.weight_scale' is a weight_scale of a per-tensor/per-channel FP8 or INT8 convention",
    ),
    "int8 weight": (
        {"x.weight": torch.zeros(4, 4, dtype=torch.int8)},
        "tensor 'x.weight' is an integer-quantised weight (I8)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_quantisation_is_refused_naming_file_and_tensor(tmp_path, case):
    tensors, message = REFUSED[case]
    path = write_checkpoint(tmp_path / "q.safetensors", tensors)
    with pytest.raises(UnsupportedCheckpointError) as exc:
        compare(str(path), str(path), spectral=False)
    assert str(exc.value).startswith(f"{path}: {message}")
    assert str(exc.value).endswith("compare dequantized bf16/fp16/fp32 checkpoints instead")


def test_cli_refusal_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    tensors, message = REFUSED["gptq"]
    path = write_checkpoint(tmp_path / "q.safetensors", tensors)
    monkeypatch.setattr(sys, "argv", ["weightdiff", "compare", str(path), str(path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and message in err[0]
