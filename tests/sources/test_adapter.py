"""LoRA adapters in the PEFT layout (adapter_config.json + adapter_model.safetensors with PEFT's key names),
compared against their base. The merged weights are recomputed here with plain torch and the report is checked
against tests/reference.py on them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.checks import assert_elementwise, by_name
from tests.conftest import llama_like, write_checkpoint
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.errors import CheckpointFormatError, InputError, UnsupportedCheckpointError
from weightdiff.sources import open_source
from weightdiff.sources.adapter import AdapterSource

P = "base_model.model."


def _adapter(root: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return root


def _factors(g: torch.Generator, out: int, inp: int, r: int, dtype=torch.bfloat16):
    return (torch.randn(r, inp, generator=g) * 0.1).to(dtype), (torch.randn(out, r, generator=g) * 0.1).to(
        dtype
    )


def merged(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + scaling * B @ A in float32, rounded once to W0's dtype."""
    return (w0.float() + (b.float() @ a.float()) * scaling).to(w0.dtype)


def test_lora_adapter_is_merged_onto_its_base(tmp_path):
    base_t = llama_like(layers=2)
    write_checkpoint(tmp_path / "base" / "model.safetensors", base_t)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    g = torch.Generator().manual_seed(0)
    q0 = "model.layers.0.self_attn.q_proj"
    q1 = "model.layers.1.self_attn.q_proj"
    up1 = "model.layers.1.mlp.up_proj"
    a_q0, b_q0 = _factors(g, 32, 32, 4)
    a_q1, b_q1 = _factors(g, 32, 32, 4)
    a_up1, b_up1 = _factors(g, 48, 32, 2)  # rank_pattern gives this module r=2 ...
    emb_a = (torch.randn(4, 50, generator=g) * 0.1).to(torch.bfloat16)  # lora_embedding_A: (r, vocab)
    emb_b = (torch.randn(32, 4, generator=g) * 0.1).to(torch.bfloat16)  # lora_embedding_B: (dim, r)
    head = (base_t["lm_head.weight"].float() * 1.01).to(torch.bfloat16)  # modules_to_save: a full tensor
    adapter = _adapter(
        tmp_path / "adapter",
        {
            f"{P}{q0}.lora_A.weight": a_q0,
            f"{P}{q0}.lora_B.weight": b_q0,
            f"{P}{q1}.lora_A.weight": a_q1,
            f"{P}{q1}.lora_B.weight": b_q1,
            f"{P}{up1}.lora_A.weight": a_up1,
            f"{P}{up1}.lora_B.weight": b_up1,
            f"{P}model.embed_tokens.lora_embedding_A": emb_a,
            f"{P}model.embed_tokens.lora_embedding_B": emb_b,
            f"{P}lm_head.weight": head,
        },
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj", "embed_tokens"],
        rank_pattern={"layers.1.mlp.up_proj": 2},
        alpha_pattern={"layers\\.1\\..*": 3, "up_proj": 100},  # ... and, first match wins, alpha=3
        modules_to_save=["lm_head"],
        use_rslora=False,
    )
    report = compare(str(tmp_path / "base"), str(adapter), spectral=False)
    rows = by_name(report.rows)
    assert set(rows) == set(base_t)
    expected = {
        q0 + ".weight": merged(base_t[q0 + ".weight"], a_q0, b_q0, 8 / 4),
        q1 + ".weight": merged(base_t[q1 + ".weight"], a_q1, b_q1, 3 / 4),
        up1 + ".weight": merged(base_t[up1 + ".weight"], a_up1, b_up1, 3 / 2),
        "model.embed_tokens.weight": (
            base_t["model.embed_tokens.weight"].float() + (emb_b.float() @ emb_a.float()).T * 2.0
        ).to(torch.bfloat16),
        "lm_head.weight": head,
    }
    for name, row in rows.items():
        assert_elementwise(row, base_t[name], expected.get(name, base_t[name]))
        assert (row["changed_exact"] > 0) == (name in expected), name
    tuned = report.metadata["tuned"]
    assert tuned["kind"] == "lora-adapter" and tuned["r"] == 4 and tuned["lora_alpha"] == 8
    assert tuned["target_modules"] == ["q_proj", "up_proj", "embed_tokens"]
    assert tuned["modules_merged"] == 4 and tuned["tensors_replaced"] == ["lm_head.weight"]
    assert tuned["base"]["given"] == str(tmp_path / "base")
    assert report.plan.only_base == [] and report.plan.only_tuned == []
    assert report.plan.notes[0] == (
        f"LoRA adapter {adapter} merged onto {tmp_path / 'base'}: 4 modules (r=4, lora_alpha=8), "
        "1 tensors replaced whole"
    )


def test_rslora_fan_in_fan_out_and_prefix_normalised_targets(tmp_path):
    g = torch.Generator().manual_seed(1)
    # A GPT-2-style base: Conv1D weights stored (in, out), names without a "model." wrapper.
    base_t = {"h.0.attn.c_attn.weight": torch.randn(16, 48, generator=g), "h.0.ln.weight": torch.ones(16)}
    write_checkpoint(tmp_path / "base.safetensors", base_t)
    a, b = _factors(g, 48, 16, 8, dtype=torch.float32)
    # The adapter was trained on a wrapped model ("model.h.0..."): its targets are found by prefix normalisation.
    adapter = _adapter(
        tmp_path / "adapter",
        {f"{P}model.h.0.attn.c_attn.lora_A.weight": a, f"{P}model.h.0.attn.c_attn.lora_B.weight": b},
        r=8,
        lora_alpha=16,
        use_rslora=True,
        fan_in_fan_out=True,
    )
    with open_source(str(tmp_path / "base.safetensors")) as base, AdapterSource(base, adapter) as src:
        info = src.tensors()["h.0.attn.c_attn.weight"]
        w0 = base_t["h.0.attn.c_attn.weight"]
        expected = w0 + (b @ a).T * (16 / math.sqrt(8))
        assert torch.equal(src.read(info), expected)
        assert torch.equal(src.read(src.tensors()["h.0.ln.weight"]), base_t["h.0.ln.weight"])


def test_cli_compares_base_with_adapter_directory(tmp_path, capsys, monkeypatch):
    base_t = llama_like(layers=1)
    write_checkpoint(tmp_path / "base" / "model.safetensors", base_t)
    g = torch.Generator().manual_seed(2)
    a, b = _factors(g, 32, 32, 4)
    adapter = _adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": a,
            f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": b,
        },
        r=4,
        lora_alpha=4,
        target_modules=["q_proj"],
    )
    out = tmp_path / "r.parquet"
    args = ["weightdiff", "compare", str(tmp_path / "base"), str(adapter), "--no-spectral", "-o", str(out)]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    assert f"{adapter}: lora-adapter source" in err
    import pandas as pd

    df = pd.read_parquet(out).set_index("name")
    assert (df["changed_exact"] > 0).sum() == 1
    assert df.loc["model.layers.0.self_attn.q_proj.weight", "changed_exact"] > 0


def _base(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "base" / "model.safetensors", llama_like(layers=1))
    return tmp_path / "base"


def test_adapter_tensor_matching_no_base_module_is_refused(tmp_path):
    a, b = _factors(torch.Generator().manual_seed(3), 32, 32, 4)
    adapter = _adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.7.self_attn.q_proj.lora_A.weight": a,
            f"{P}model.layers.7.self_attn.q_proj.lora_B.weight": b,
        },
        r=4,
        lora_alpha=8,
    )
    with pytest.raises(InputError) as exc:
        compare(str(_base(tmp_path)), str(adapter), spectral=False)
    assert str(exc.value) == (
        f"{adapter / 'adapter_model.safetensors'}: adapter tensor "
        f"'{P}model.layers.7.self_attn.q_proj' targets 'model.layers.7.self_attn.q_proj.weight', which matches "
        f"no tensor of the base checkpoint in {tmp_path / 'base'}; is this adapter for another model?"
    )


@pytest.mark.parametrize(
    ("tensors", "config", "error", "message"),
    [
        ({}, {"use_dora": True}, UnsupportedCheckpointError, "DoRA adapters (use_dora) are not supported"),
        ({}, {"peft_type": "IA3"}, UnsupportedCheckpointError, "peft_type IA3 is not supported"),
        (
            {f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
            {},
            CheckpointFormatError,
            "module 'model.layers.0.self_attn.q_proj' has no lora_B factor",
        ),
        (
            {
                f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
            },
            {"r": 16},
            CheckpointFormatError,
            "has factors of rank 4/4 but adapter_config.json gives r=16",
        ),
    ],
    ids=["dora", "ia3", "missing-factor", "rank-mismatch"],
)
def test_adapter_problems_are_one_line_errors(tmp_path, tensors, config, error, message):
    adapter = _adapter(tmp_path / "adapter", tensors or {f"{P}lm_head.weight": torch.zeros(50, 32)}, **config)
    with pytest.raises(error) as exc:
        compare(str(_base(tmp_path)), str(adapter), spectral=False)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_adapter_given_as_base_is_refused(tmp_path):
    adapter = _adapter(tmp_path / "adapter", {f"{P}lm_head.weight": torch.zeros(50, 32)})
    with pytest.raises(InputError, match="is a LoRA adapter directory, not a full checkpoint"):
        compare(str(adapter), str(_base(tmp_path)), spectral=False)


def test_adapter_that_trains_the_head_of_a_tied_base_unties_it(tmp_path):
    base_t = llama_like(layers=1)
    del base_t["lm_head.weight"]
    write_checkpoint(tmp_path / "base" / "model.safetensors", base_t)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    head = (base_t["model.embed_tokens.weight"].float() * 0.5).to(torch.bfloat16)
    adapter = _adapter(tmp_path / "adapter", {f"{P}lm_head.weight": head}, modules_to_save=["lm_head"])
    report = compare(str(tmp_path / "base"), str(adapter), spectral=False)
    rows = by_name(report.rows)
    assert_elementwise(rows["lm_head.weight"], base_t["model.embed_tokens.weight"], head)
    assert rows["model.embed_tokens.weight"]["changed_exact"] == 0
    assert report.plan.tied[0]["tuned"] == "untied" and report.plan.only_tuned == []


def test_adapter_on_an_fp8_base_merges_bf16_modules_and_keeps_fp8_weights(tmp_path):
    from tests.sources.test_quant import FP8_CONFIG, dequantize, quantize

    g = torch.Generator().manual_seed(6)
    codes, scale = quantize(torch.randn(40, 32, generator=g))
    q = torch.randn(32, 32, generator=g).to(torch.bfloat16)
    base_t = {
        "model.layers.0.mlp.up_proj.weight": codes,
        "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
        "model.layers.0.self_attn.q_proj.weight": q,
    }
    write_checkpoint(tmp_path / "base" / "model.safetensors", base_t)
    (tmp_path / "base" / "config.json").write_text(json.dumps(FP8_CONFIG))
    a, b = _factors(g, 32, 32, 2)
    adapter = _adapter(
        tmp_path / "adapter",
        {
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": a,
            f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": b,
        },
        r=2,
        lora_alpha=2,
    )
    rows = by_name(compare(str(tmp_path / "base"), str(adapter), spectral=False).rows)
    up = rows["model.layers.0.mlp.up_proj.weight"]
    assert_elementwise(up, dequantize(codes, scale), dequantize(codes, scale))
    assert up["changed_stored"] == 0 and up["dtype_tuned"] == "F8_E4M3"
    assert_elementwise(rows["model.layers.0.self_attn.q_proj.weight"], q, merged(q, a, b, 1.0))
    # LoRA on the FP8 weight itself is refused.
    adapter2 = _adapter(
        tmp_path / "adapter2",
        {
            f"{P}model.layers.0.mlp.up_proj.lora_A.weight": a,
            f"{P}model.layers.0.mlp.up_proj.lora_B.weight": b,
        },
        r=2,
    )
    with pytest.raises(UnsupportedCheckpointError, match="merging LoRA into FP8 weights is not supported"):
        compare(str(tmp_path / "base"), str(adapter2), spectral=False)
