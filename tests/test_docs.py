"""The documentation keeps up with the code: generated pages are current, every column and command is
documented, the metadata keys a report really carries are described, and the pages' pictures exist."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from weightdiff import docgen, schema

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "run `python -m weightdiff.docgen` and commit the result"


@pytest.mark.parametrize("page", ["report-schema.md", "cli.md"])
def test_generated_pages_are_current(page):
    expected = docgen.pages()[DOCS / page]
    path = DOCS / page
    assert path.exists(), f"docs/{page} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == expected, f"docs/{page} is out of date: {REGENERATE}"


def _column_tuples() -> dict[str, tuple[schema.Column, ...]]:
    return {
        name: value
        for name, value in vars(schema).items()
        if name.endswith("_COLUMNS")
        and isinstance(value, tuple)
        and value
        and all(isinstance(c, schema.Column) for c in value)
    }


def test_every_column_is_documented():
    text = (DOCS / "metrics.md").read_text(encoding="utf-8") + (DOCS / "report-schema.md").read_text(
        encoding="utf-8"
    )
    tuples = _column_tuples()
    assert {"COMPARE_COLUMNS", "SPECTRUM_COLUMNS"} <= set(tuples)
    missing = [f"{tup}.{c.name}" for tup, cols in tuples.items() for c in cols if f"`{c.name}`" not in text]
    assert not missing, (
        f"columns documented nowhere: {missing}; {REGENERATE}, and describe them in metrics.md"
    )


def test_schema_page_lists_every_table_with_types():
    text = docgen.schema_markdown()
    for cols in _column_tuples().values():
        for c in cols:
            row = f"| `{c.name}` | {docgen._arrow_type(c.type)} | {'yes' if c.nullable else 'no'} |"
            assert row in text, row
    assert "(undocumented)" not in text
    for key, _, _ in docgen.METADATA_KEYS:
        assert f"| `{key}` |" in text


def test_metadata_keys_written_by_compare_are_documented(tmp_path):
    import weightdiff
    from tests.conftest import llama_like, perturb, write_checkpoint

    base = llama_like(layers=1, hidden=8, inter=8)
    write_checkpoint(tmp_path / "b.safetensors", base)
    write_checkpoint(tmp_path / "t.safetensors", perturb(base))
    out = tmp_path / "r.parquet"
    weightdiff.compare(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), output=str(out))
    meta = schema.decode_metadata(pq.read_schema(out).metadata)
    documented = {key for key, _, _ in docgen.METADATA_KEYS}
    assert set(meta) <= documented, set(meta) - documented
    # Options are keyed by the compare option that set them, so cli.md documents each one.
    compare = dict(docgen.commands())["compare"]
    flags = {opt for p in compare.params for opt in p.opts}
    for key in meta["options"]:
        flag = "--" + key.replace("_", "-")
        assert flag in flags or f"--no-{flag[2:]}" in flags, key
    text = (DOCS / "report-schema.md").read_text(encoding="utf-8")
    for key in meta["plan"]:
        assert f"`{key}`" in text, key


def test_every_command_and_option_is_in_cli_md():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = docgen.commands()
    assert {"compare", "check", "spectrum", "plot"} <= {name for name, _ in commands}
    for name, cmd in commands:
        assert f"## weightdiff {name}" in text, name
        for param in cmd.params:
            if param.param_type_name == "option" and not param.hidden:
                for opt in param.opts:
                    assert f"`{opt}`" in text, (name, opt)


def test_cli_md_help_texts_match_the_cli():
    # Spot-check the generator's reading of typer's objects against values known from cli.py.
    text = docgen.cli_markdown()
    assert "| `-o`, `--output` FILE | required | Image to write: .png, .svg or .pdf. |" in text
    assert "| `--rank` INTEGER | `64` |" in text
    assert "| `--tensor` NAME (repeatable) | — |" in text
    assert "weightdiff consistency BASE RUNS... [OPTIONS]" in text
    assert "weightdiff spectrum CHECKPOINT [TUNED] [OPTIONS]" in text


def test_docgen_check_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(docgen, "DOCS", tmp_path)
    assert docgen.main(["--check"]) == 1  # nothing written yet
    assert docgen.main([]) == 0
    assert docgen.main(["--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.md", "report-schema.md"]


def test_metrics_page_has_the_solver_accuracy_table_and_sources():
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert "#### Measured solver accuracy" in text
    for solver in ("exact", "gram", "fast", "auto"):
        assert f"`{solver}`" in text
    for source in ("2511.08567", "2505.11711", "2506.00772", "2606.07082"):
        assert source in text


def test_index_picture_exists_and_is_a_png():
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images, "docs/index.md shows no plot"
    for image in images:
        data = (DOCS / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", image
        assert len(data) < 300_000, f"{image} is {len(data)} bytes: keep committed pictures small"


def test_own_pages_link_to_existing_files():
    # Links between the pages written with the generated reference; performance.md is filled by benchmarks.
    pending = {"performance.md"}
    for page in ("index.md", "metrics.md", "numerics.md", "report-schema.md", "cli.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target or target in pending:
                continue
            assert (DOCS / target).exists(), f"docs/{page} links to missing {target}"
