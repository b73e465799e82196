"""Real-world checkpoint pairs end to end, from real safetensors files: tied embeddings, resized vocabularies,
renamed tensors, mixed float dtypes and mixture-of-experts names. Every number is checked against
tests/reference.py on tensors the test builds itself.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.checks import assert_elementwise, by_name
from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import compare
from weightdiff.cli import main
from weightdiff.errors import InputError
from weightdiff.schema import COLUMN_NAMES


def _write(root: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    write_checkpoint(root / "model.safetensors", tensors)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def _run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The CLI in-process (no interpreter start-up): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["weightdiff", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


# --- tied embeddings -------------------------------------------------------------------------------------


def test_untied_base_vs_tied_tuned_pairs_lm_head_with_embedding(tmp_path):
    b = llama_like(layers=1)
    t = perturb(b)
    del t["lm_head.weight"]
    base = _write(tmp_path / "base", b, {"tie_word_embeddings": False})
    tuned = _write(tmp_path / "tuned", t, {"tie_word_embeddings": True})
    report = compare(str(base), str(tuned), spectral=False)
    rows = by_name(report.rows)
    # The base's own head is compared with the matrix the tuned model uses as its head: its embedding.
    assert_elementwise(rows["lm_head.weight"], b["lm_head.weight"], t["model.embed_tokens.weight"])
    assert_elementwise(
        rows["model.embed_tokens.weight"], b["model.embed_tokens.weight"], t["model.embed_tokens.weight"]
    )
    plan = report.plan.as_dict()
    assert plan["only_base"] == [] and plan["only_tuned"] == []
    assert plan["tied"] == [
        {
            "name": "lm_head.weight",
            "embedding": "model.embed_tokens.weight",
            "base": "untied",
            "tuned": "tied, no head stored",
            "compared": "base lm_head.weight with tuned model.embed_tokens.weight",
        }
    ]
    assert any("tie status of lm_head.weight changed: tuned ties it" in n for n in plan["notes"])
    assert report.metadata["plan"]["tied"] == plan["tied"]


def test_tied_base_vs_untied_tuned_and_inferred_tie(tmp_path):
    b = llama_like(layers=1)
    del b["lm_head.weight"]
    t = perturb(llama_like(layers=1))
    # No config.json on the base: a checkpoint without a head but with an embedding is taken as tied.
    base = _write(tmp_path / "base", b)
    tuned = _write(tmp_path / "tuned", t, {"tie_word_embeddings": False})
    report = compare(str(base), str(tuned), spectral=False)
    rows = by_name(report.rows)
    assert_elementwise(rows["lm_head.weight"], b["model.embed_tokens.weight"], t["lm_head.weight"])
    assert rows["lm_head.weight"]["dtype_base"] == "BF16"
    (tied,) = report.plan.tied
    assert tied["base"] == "tied (inferred), no head stored" and tied["tuned"] == "untied"
    assert tied["compared"] == "base model.embed_tokens.weight with tuned lm_head.weight"


def test_both_tied_compares_the_matrix_once(tmp_path):
    b = llama_like(layers=1)
    b["lm_head.weight"] = b["model.embed_tokens.weight"].clone()  # stored as an alias on the base side only
    t = perturb(b)
    del t["lm_head.weight"]
    base = _write(tmp_path / "base", b, {"tie_word_embeddings": True})
    tuned = _write(tmp_path / "tuned", t, {"text_config": {"tie_word_embeddings": True}})
    report = compare(str(base), str(tuned), spectral=False)
    names = [r["name"] for r in report.rows]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    assert report.plan.only_base == []
    assert report.plan.tied[0]["compared"] == "once, as model.embed_tokens.weight"
    # Totals count the tied matrix once: every stored parameter except the alias.
    total = sum(v.numel() for k, v in b.items() if k != "lm_head.weight")
    assert report.summary()["overall"]["numel"] == total


# --- resized vocabularies --------------------------------------------------------------------------------


def test_resized_vocabulary_compares_shared_rows_and_reports_added_rows(tmp_path):
    b = llama_like(layers=1)
    t = perturb(b)
    g = torch.Generator().manual_seed(5)
    added = torch.randn(3, 32, generator=g).to(torch.bfloat16)
    t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"], added])
    t["lm_head.weight"] = t["lm_head.weight"][:48].clone()  # and a head that lost two rows
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32, dtype=torch.bfloat16)  # not a vocabulary
    base = _write(tmp_path / "base", b)
    tuned = _write(tmp_path / "tuned", t)
    out = tmp_path / "report.parquet"
    report = compare(str(base), str(tuned), spectral=True, rank=4, principal_rank=4, output=str(out))
    rows = by_name(report.rows)
    emb = rows["model.embed_tokens.weight"]
    assert_elementwise(emb, b["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:50])
    assert (emb["rows_compared"], emb["rows_added"], emb["shape"]) == (50, 3, [50, 32])
    assert emb["added_rows_fro"] == pytest.approx(float(added.double().norm()), rel=1e-12)
    assert emb["rank_k"] == 4  # every metric, spectral ones included, runs on the shared rows
    head = rows["lm_head.weight"]
    assert_elementwise(head, b["lm_head.weight"][:48], t["lm_head.weight"])
    assert (head["rows_compared"], head["rows_added"]) == (48, -2)
    assert head["added_rows_fro"] == pytest.approx(float(b["lm_head.weight"][48:].double().norm()), rel=1e-12)
    assert rows["model.norm.weight"]["rows_compared"] is None
    plan = report.plan.as_dict()
    assert plan["shape_mismatch"] == [
        {"name": "model.layers.0.mlp.up_proj.weight", "base": [48, 32], "tuned": [40, 32]}
    ]
    assert {r["name"]: r["rows_added"] for r in plan["resized"]} == {
        "lm_head.weight": -2,
        "model.embed_tokens.weight": 3,
    }
    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMN_NAMES)
    assert str(df["rows_added"].dtype) == "Int64" and str(df["changed_stored"].dtype) == "Int64"
    assert df.set_index("name").loc["model.embed_tokens.weight", "rows_added"] == 3


def test_tie_and_resize_together(tmp_path):
    b = llama_like(layers=1)
    t = perturb(b)
    del t["lm_head.weight"]
    t["model.embed_tokens.weight"] = torch.cat(
        [t["model.embed_tokens.weight"], torch.ones(2, 32, dtype=torch.bfloat16)]
    )
    base = _write(tmp_path / "base", b, {"tie_word_embeddings": False})
    tuned = _write(tmp_path / "tuned", t, {"tie_word_embeddings": True})
    rows = by_name(compare(str(base), str(tuned), spectral=False).rows)
    head = rows["lm_head.weight"]
    assert_elementwise(head, b["lm_head.weight"], t["model.embed_tokens.weight"][:50])
    assert (head["rows_added"], head["added_rows_fro"]) == (2, pytest.approx(8.0))


# --- renames ---------------------------------------------------------------------------------------------


def test_wrapper_prefixes_and_rename_rules(tmp_path):
    b = llama_like(layers=2)
    t = perturb(b)
    renamed = {}
    for k, v in t.items():
        if k.startswith("model.layers.1."):
            # A checkpoint with its own block naming: only a --rename rule can pair these.
            k = k.replace("model.layers.1.", "blocks.1.").replace("self_attn.", "attn.")
        elif k.startswith("model."):
            k = "language_model." + k  # a multimodal wrapper: prefix normalisation pairs these
        renamed[k] = v
    base = _write(tmp_path / "base", b)
    tuned = _write(tmp_path / "tuned", renamed)
    report = compare(
        str(base),
        str(tuned),
        spectral=False,
        renames=[r"^blocks\.(\d+)\.=model.layers.\1.", r"\.attn\.=.self_attn."],
    )
    rows = by_name(report.rows)
    assert set(rows) == set(b)  # every row under its base name
    for name, row in rows.items():
        assert_elementwise(row, b[name], t[name])
    plan = report.plan.as_dict()
    assert plan["only_base"] == [] and plan["only_tuned"] == []
    how = {r["tuned"]: (r["base"], r["by"]) for r in plan["renamed"]}
    assert how["blocks.1.attn.q_proj.weight"] == ("model.layers.1.self_attn.q_proj.weight", "rule")
    assert how["language_model.model.norm.weight"] == ("model.norm.weight", "prefix")
    assert "lm_head.weight" not in how
    assert report.metadata["options"]["rename"] == [
        r"^blocks\.(\d+)\.=model.layers.\1.",
        r"\.attn\.=.self_attn.",
    ]


def test_rename_errors(tmp_path):
    b = {"model.a.weight": torch.ones(2, 2), "model.b.weight": torch.ones(2, 2)}
    base = _write(tmp_path / "base", b)
    with pytest.raises(
        InputError, match=re.escape("--rename maps both 'model.a.weight' and 'model.b.weight' to 'x.weight'")
    ):
        compare(str(base), str(base), renames=[r"^model\.[ab]=x"], spectral=False)
    with pytest.raises(InputError, match="expected REGEX=REPLACEMENT"):
        compare(str(base), str(base), renames=["no-equals-sign"], spectral=False)


def test_cli_invalid_rename_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    base = _write(tmp_path / "base", {"w": torch.ones(2, 2)})
    code, _out, err = _run_cli(
        ["compare", str(base), str(base), "--rename", "model.(=x"], capsys, monkeypatch
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --rename 'model.(=x': invalid regular expression")


def test_cli_shows_renames_ties_and_resizes_in_the_plan(tmp_path, capsys, monkeypatch):
    b = llama_like(layers=1)
    t = {("model." + k if k.startswith("layers") else k): v for k, v in perturb(b).items()}
    t = {k.replace("model.layers.0.", "layers.0."): v for k, v in t.items()}
    del t["lm_head.weight"]
    t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"], t["model.norm.weight"][None]])
    base = _write(tmp_path / "base", b, {"tie_word_embeddings": False})
    tuned = _write(tmp_path / "tuned", t, {"tie_word_embeddings": True})
    code, _out, err = _run_cli(["compare", str(base), str(tuned), "--no-spectral"], capsys, monkeypatch)
    assert code == 0, err
    assert (
        "5 tuned tensors paired after removing wrapper prefixes, e.g. layers.0.input_layernorm.weight -> "
        in err
    )
    assert "tied embeddings: lm_head.weight (base: untied; tuned: tied, no head stored)" in err
    assert "2 resized vocabularies, compared on shared rows: lm_head.weight [50, 32] vs [51, 32]" in err


# --- dtypes and mixture of experts ------------------------------------------------------------------------


def test_every_combination_of_fp32_fp16_bf16(tmp_path):
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    g = torch.Generator().manual_seed(3)
    b, t = {}, {}
    for da, ta in dtypes.items():
        for db, tb in dtypes.items():
            w = torch.randn(24, 16, generator=g)
            w[0, :4] = torch.tensor([0.0, -0.0, 65504.0, 1e-8])  # signed zeros, fp16's max, a subnormal
            w2 = w + (torch.rand(w.shape, generator=g) < 0.4) * 1e-3 * torch.randn(w.shape, generator=g)
            b[f"m.{da}_{db}.weight"] = w.to(ta)
            t[f"m.{da}_{db}.weight"] = w2.to(tb)
    base = _write(tmp_path / "base", b)
    tuned = _write(tmp_path / "tuned", t)
    report = compare(str(base), str(tuned), spectral=False)
    assert len(report.rows) == 9
    for row in report.rows:
        assert_elementwise(row, b[row["name"]], t[row["name"]])
        assert (row["dtype_base"], row["dtype_tuned"]) == tuple(row["name"][2:-7].split("_"))
        assert row["changed_stored"] is None  # only FP8 tensors get a bit-level count
    assert len(report.plan.dtype_mismatch) == 6


def test_mixture_of_experts_rows_carry_layer_and_expert(tmp_path):
    g = torch.Generator().manual_seed(4)
    b = {}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp."
        b[p + "gate.weight"] = torch.randn(4, 8, generator=g)
        b[p + "shared_experts.up_proj.weight"] = torch.randn(6, 8, generator=g)
        for e in range(4):
            b[p + f"experts.{e}.up_proj.weight"] = torch.randn(6, 8, generator=g)
            b[p + f"experts.{e}.down_proj.weight"] = torch.randn(8, 6, generator=g)
    t = {k: v + (1e-2 if ".experts.2." in k else 0.0) for k, v in b.items()}
    base = _write(tmp_path / "base", b)
    tuned = _write(tmp_path / "tuned", t)
    df = compare(str(base), str(tuned), spectral=False).to_pandas().set_index("name")
    row = df.loc["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert (row["layer"], row["expert"], row["module"]) == (1, 2, "mlp.experts.down_proj")
    assert pd.isna(df.loc["model.layers.0.mlp.shared_experts.up_proj.weight", "expert"])
    assert pd.isna(df.loc["model.layers.0.mlp.gate.weight", "expert"])
    changed = df[df["changed_exact"] > 0]
    assert set(changed["expert"]) == {2} and len(changed) == 4
    assert str(df["expert"].dtype) == "Int64"
    per_expert = df.groupby("expert")["changed_exact"].sum()
    assert per_expert.loc[2] == 4 * 48 and per_expert.drop(2).sum() == 0
    assert math.isclose(
        df.loc["model.layers.0.mlp.experts.2.up_proj.weight", "delta_max"], 1e-2, rel_tol=1e-5
    )
