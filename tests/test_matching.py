"""The pure name-matching layer: wrapper prefixes, --rename parsing, tie resolution and row slices."""

from __future__ import annotations

import pytest

from weightdiff.errors import CheckpointFormatError, InputError
from weightdiff.matching import (
    apply_ties,
    build_plan,
    canonical,
    is_resizable_name,
    match_names,
    parse_renames,
    plan_lines,
    tie_flag,
)
from weightdiff.sources.format import TensorInfo
from weightdiff.sources.rows import row_range, row_slice


def info(
    name: str, shape: tuple[int, ...], dtype: str = "BF16", start: int = 0, file: str = "f"
) -> TensorInfo:
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, dtype, shape, start, start + 2 * n, file)


def test_canonical_strips_every_wrapper_prefix():
    assert canonical("base_model.model.model.layers.0.q.weight") == "layers.0.q.weight"
    assert canonical("model.language_model.layers.0.q.weight") == "layers.0.q.weight"
    assert canonical("language_model.model.layers.0.q.weight") == "layers.0.q.weight"
    assert canonical("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical("model.") == "model."  # never strips a name down to nothing
    assert is_resizable_name("transformer.wte.weight") and is_resizable_name("output.weight")
    assert not is_resizable_name("model.layers.0.attention.output.weight")
    assert not is_resizable_name("model.embed_positions.weight")


def test_parse_renames():
    (rule,) = parse_renames([r"(?=layers)layers\.(\d+)=blocks.\1"])  # '=' inside the regex: split at the last
    assert rule.apply("model.layers.3.q") == "model.blocks.3.q"
    for spec, message in [
        ("nothing", "expected REGEX=REPLACEMENT"),
        ("=x", "expected REGEX=REPLACEMENT"),
        ("a(=b", "invalid regular expression"),
        (r"a=\2", "bad replacement"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_renames([spec])


def test_match_names_leaves_ambiguous_prefixes_unpaired():
    key_of, renamed, notes = match_names(
        ["model.x.weight", "x.weight", "model.y.weight"], ["language_model.x.weight", "y.weight"]
    )
    assert key_of == {"language_model.x.weight": "language_model.x.weight", "y.weight": "model.y.weight"}
    assert renamed == [{"base": "model.y.weight", "tuned": "y.weight", "by": "prefix"}]
    assert notes == [
        "1 names match several tensors after removing wrapper prefixes and were not paired: x.weight"
    ]


def test_tie_flag_reads_top_level_then_text_config():
    assert tie_flag(None) is None and tie_flag({}) is None
    assert tie_flag({"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}) is False
    assert tie_flag({"text_config": {"tie_word_embeddings": True}}) is True
    assert tie_flag({"tie_word_embeddings": "yes"}) is None


def test_explicitly_untied_side_without_head_is_not_tied():
    base = {
        "lm_head.weight": info("lm_head.weight", (10, 4)),
        "model.embed_tokens.weight": info("e", (10, 4)),
    }
    tuned = {"model.embed_tokens.weight": info("e", (10, 4))}
    tied, notes = apply_ties(base, tuned, None, False)
    assert tied == [] and notes == []
    plan = build_plan(base, tuned, tuned_tied=False)
    assert plan.only_base == ["lm_head.weight"]


def test_tie_with_mismatched_columns_is_not_resolved():
    base = {
        "lm_head.weight": info("lm_head.weight", (10, 4)),
        "model.embed_tokens.weight": info("e", (10, 4)),
    }
    tuned = {"model.embed_tokens.weight": info("e", (10, 8))}
    tied, notes = apply_ties(base, tuned, False, True)
    assert tied[0]["compared"] == "not compared"
    assert notes[0].startswith("lm_head.weight: stored on one side only")
    assert "lm_head.weight" not in tuned


def test_row_slices_and_ranges():
    full = info("emb", (10, 4), start=100)
    part = row_slice(full, 3, 7)
    assert (part.shape, part.start, part.end) == ((4, 4), 100 + 3 * 8, 100 + 7 * 8)
    assert row_range(full, part) == (3, 7) and row_range(full, full) is None
    with pytest.raises(CheckpointFormatError, match="not a run of whole rows"):
        row_range(full, info("emb", (2, 4), start=101))
    with pytest.raises(ValueError):
        row_slice(full, 5, 11)


def test_plan_lines_cover_every_new_plan_field():
    base = {
        "model.embed_tokens.weight": info("model.embed_tokens.weight", (10, 4)),
        "a.weight": info("a.weight", (2,)),
    }
    tuned = {
        "model.embed_tokens.weight": info("model.embed_tokens.weight", (12, 4)),
        "lm_head.weight": info("lm_head.weight", (12, 4)),
        "model.a.weight": info("model.a.weight", (2,)),
    }
    plan = build_plan(base, tuned, base_tied=True, tuned_tied=False, consumed_scales=["s_scale_inv"])
    lines = plan_lines(plan)
    assert lines == [
        "1 tuned tensors paired after removing wrapper prefixes, e.g. model.a.weight -> a.weight",
        "tied embeddings: lm_head.weight (base: tied, no head stored; tuned: untied); compared base "
        "model.embed_tokens.weight with tuned lm_head.weight",
        "2 resized vocabularies, compared on shared rows: lm_head.weight [10, 4] vs [12, 4] (10 rows compared, "
        "+2 rows), model.embed_tokens.weight [10, 4] vs [12, 4] (10 rows compared, +2 rows)",
        "1 FP8 scale tensors folded into their weights: s_scale_inv",
        "tie status of lm_head.weight changed: base ties it, tuned does not (base model.embed_tokens.weight "
        "with tuned lm_head.weight)",
    ]
