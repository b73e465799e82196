"""``weightdiff plot``: every view renders a real, non-blank PNG and SVG from reports that weightdiff itself
wrote, and every bad input is a one-line error with exit code 2 that leaves no file behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import weightdiff
from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import plot as wplot
from weightdiff.cli import main
from weightdiff.errors import InputError

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """A compare report with its spectra file, a --no-spectral report, and a consistency report with stripes,
    all written by weightdiff from small Llama-shaped checkpoints."""
    d = tmp_path_factory.mktemp("plot")
    base = llama_like(layers=3, hidden=32, inter=48)
    write_checkpoint(d / "base" / "model.safetensors", base)
    write_checkpoint(d / "tuned" / "model.safetensors", perturb(base, frac=0.3))
    out = {
        "report": d / "report.parquet",
        "spectra": d / "spectra.parquet",
        "elementwise": d / "elementwise.parquet",
        "consistency": d / "consistency.parquet",
        "stripes": d / "stripes.parquet",
    }
    weightdiff.compare(
        str(d / "base"),
        str(d / "tuned"),
        output=str(out["report"]),
        spectra_output=str(out["spectra"]),
        rank=8,
    )
    weightdiff.compare(str(d / "base"), str(d / "tuned"), output=str(out["elementwise"]), spectral=False)
    runs = []
    for i in range(3):
        run = perturb(base, frac=0.2, seed=10 + i)
        q = run["model.layers.1.self_attn.q_proj.weight"].float()
        q[3] += 0.05  # one output row every run changes: a stripe
        run["model.layers.1.self_attn.q_proj.weight"] = q.to(torch.bfloat16)
        write_checkpoint(d / f"run{i}" / "model.safetensors", run)
        runs.append(str(d / f"run{i}"))
    from weightdiff.consistency import consistency

    consistency(str(d / "base"), runs, output=str(out["consistency"]), stripes_output=str(out["stripes"]))
    return out


def check_png(path: Path, min_side: int = 300) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(str(path))
    height, width = pixels.shape[:2]
    assert min(height, width) >= min_side and max(height, width) <= 5000
    assert pixels[..., :3].var() > 0  # not a blank canvas


def check_svg(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")
    assert len(text) > 5000 and "<path" in text


def no_leftovers(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("heatmap", {}),
        ("layers", {}),
        ("spectra", {"spectra": "spectra", "top": 2}),
        ("stripes", {"stripes": "stripes", "top": 2}),
    ],
)
@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_every_view_renders_a_valid_image(reports, tmp_path, kind, extra, suffix):
    report = reports["consistency"] if kind == "stripes" else reports["report"]
    options = {key: value if isinstance(value, int) else str(reports[value]) for key, value in extra.items()}
    out = tmp_path / f"{kind}{suffix}"
    # A low resolution keeps the test fast; the size check below still sees a real figure.
    assert wplot.plot(report, out, kind=kind, dpi=72, **options) == out
    (check_png if suffix == ".png" else check_svg)(out)
    no_leftovers(tmp_path)


def test_heatmap_columns_and_other_reports(reports, tmp_path):
    # A diverging scale around 1 (a ratio), a reversed one (larger cosine = less change), element counts.
    for column in ("principal_overlap_ratio", "cosine", "changed_bf16"):
        out = tmp_path / f"{column}.png"
        wplot.plot(reports["report"], out, column=column, dpi=80)
        check_png(out)
    # A consistency report's heatmap defaults to jaccard_ratio; a --no-spectral report still has sparsities.
    wplot.plot(reports["consistency"], tmp_path / "cons.png", dpi=80)
    check_png(tmp_path / "cons.png")
    wplot.plot(reports["elementwise"], tmp_path / "elem.png", column="sparsity_atol", dpi=80)
    check_png(tmp_path / "elem.png")
    # One column by layer.
    wplot.plot(reports["report"], tmp_path / "one.png", kind="layers", column="rel_delta", dpi=80)
    check_png(tmp_path / "one.png")


def test_auto_kind_follows_the_file(reports, tmp_path):
    # A spectra or stripes file given as REPORT draws its own view; --tensor picks what is shown.
    name = "model.layers.2.self_attn.q_proj.weight"
    wplot.plot(reports["spectra"], tmp_path / "s.png", tensors=[name], dpi=80)
    check_png(tmp_path / "s.png")
    wplot.plot(
        reports["stripes"],
        tmp_path / "t.png",
        tensors=[name, "model.layers.0.input_layernorm.weight"],
        dpi=80,
    )
    check_png(tmp_path / "t.png")
    wplot.plot(reports["spectra"], tmp_path / "s.pdf", top=1)
    assert (tmp_path / "s.pdf").read_bytes()[:5] == b"%PDF-"


def test_svg_is_reproducible(reports, tmp_path):
    a, b = tmp_path / "a.svg", tmp_path / "b.svg"
    wplot.plot(reports["report"], a)
    wplot.plot(reports["report"], b)
    assert a.read_bytes() == b.read_bytes()


def test_titles_name_the_checkpoints(reports):
    meta = wplot.load(reports["report"]).metadata
    short = wplot._shorten
    assert wplot.subject(meta) == f"{short(meta['base']['given'])} → {short(meta['tuned']['given'])}"
    assert wplot.subject({"base": {"given": "b"}, "tuned": {"given": "org/t"}}) == "b → org/t"
    runs = {"base": {"given": "b"}, "runs": [{"given": "r1"}, {"given": "r2"}]}
    assert wplot.subject(runs) == "b vs 2 runs (r1, r2)"
    assert wplot.subject({"checkpoint": {"given": "c"}, "tuned": None}) == "c"
    # Long paths keep their informative tail.
    assert short("/a/very/long/path/to/some/checkpoints/that/never/ends/base") == "…/ends/base"


def test_default_tensors_are_the_most_changed(reports, tmp_path, monkeypatch):
    chosen: list[str] = []
    pick = wplot._pick

    def spy(*args):
        chosen.extend(pick(*args))
        return chosen

    monkeypatch.setattr(wplot, "_pick", spy)
    # Stripes: the q_proj whose row 3 every run changed comes first.
    wplot.plot(reports["stripes"], tmp_path / "t.png", top=1, dpi=60)
    assert chosen == ["model.layers.1.self_attn.q_proj.weight"]


# ----------------------------------------------------------------------------------------------------------------
# Errors: exact one-line messages, exit code 2, no output file
# ----------------------------------------------------------------------------------------------------------------


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["weightdiff", "plot", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    return int(exc.value.code or 0), err


def test_cli_writes_the_image(reports, tmp_path, monkeypatch, capsys):
    out = tmp_path / "h.png"
    code, err = cli(monkeypatch, capsys, str(reports["report"]), "-o", str(out), "--column", "sparsity_exact")
    assert code == 0 and err.strip() == f"Wrote {out}"
    check_png(out)


def test_cli_subprocess_end_to_end(reports, tmp_path):
    # One fresh interpreter: importing the CLI and the plot module must not import matplotlib (it is optional
    # and slow to import); running the command then draws the image.
    out = tmp_path / "layers.svg"
    code = (
        "import sys, weightdiff.plot, weightdiff.cli as cli; "
        "assert 'matplotlib' not in sys.modules, 'imported at module level'; "
        f"sys.argv = ['weightdiff', 'plot', {str(reports['report'])!r}, '-o', {str(out)!r}, '--kind', 'layers', '-q']; "
        "cli.main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
    check_svg(out)


def _bad_inputs(reports: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    plain = tmp / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), str(plain))
    report = str(reports["report"])
    spectra = str(reports["spectra"])
    return [
        ([str(tmp / "missing.parquet")], f"{tmp / 'missing.parquet'}: no such report file"),
        ([str(tmp)], f"{tmp}: is a directory, not a Parquet report"),
        ([str(garbage)], f"{garbage}: not a Parquet report ("),
        ([str(plain)], f"{plain}: not a weightdiff report (the Parquet file has no weightdiff metadata)"),
        (
            [report, "--column", "nope"],
            f"{report}: no column 'nope'; numeric columns are numel, changed_exact",
        ),
        ([report, "--column", "module"], f"{report}: column 'module' is not numeric; choose one of numel"),
        ([report, "--kind", "pie"], "--kind must be one of heatmap, layers, spectra, stripes; got 'pie'"),
        (
            [report, "--kind", "spectra"],
            "--kind spectra needs --spectra FILE.parquet (written by weightdiff compare",
        ),
        ([report, "--kind", "spectra", "--spectra", report], f"{report}: is not a spectra file"),
        (
            [report, "--kind", "spectra", "--spectra", spectra, "--column", "x"],
            "--column applies to --kind heatmap",
        ),
        (
            [report, "--kind", "spectra", "--spectra", spectra, "--tensor", "w"],
            "--tensor 'w' is not in the spectra",
        ),
        (
            [spectra, "--kind", "layers"],
            f"{spectra}: is a spectra file; --kind layers needs a compare report",
        ),
        (
            [str(reports["elementwise"]), "--kind", "layers"],
            f"{reports['elementwise']}: the report has no spectral metrics (written with --no-spectral?)",
        ),
        ([report, "--top", "0"], "--top must be at least 1, got 0"),
    ]


def test_bad_inputs_are_one_line_errors_and_write_nothing(reports, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "plot.png"
    for args, message in _bad_inputs(reports, inputs):
        code, err = cli(monkeypatch, capsys, *args, "-o", str(out))
        assert code == 2, (args, err)
        assert err.startswith("error: " + message), (args, err)
        assert err.count("\n") == 1, err
        assert list(outdir.iterdir()) == [], args


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("plot.jpg", "plot.jpg: unsupported image type '.jpg'; use one of .png, .svg, .pdf"),
        ("plot", "plot: unsupported image type '(no suffix)'; use one of .png, .svg, .pdf"),
        ("nodir/plot.png", "nodir/plot.png: cannot write --output: directory nodir does not exist"),
    ],
)
def test_bad_output_paths(reports, tmp_path, monkeypatch, capsys, output, message):
    monkeypatch.chdir(tmp_path)
    code, err = cli(monkeypatch, capsys, str(reports["report"]), "-o", output)
    assert code == 2 and err.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_an_error_never_clobbers_an_existing_image(reports, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plot.png"
    out.write_bytes(b"the old picture")
    code, _ = cli(monkeypatch, capsys, str(reports["report"]), "-o", str(out), "--column", "nope")
    assert code == 2 and out.read_bytes() == b"the old picture"
    no_leftovers(tmp_path)


def test_a_failure_while_rendering_leaves_no_file(reports, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("renderer broke")

    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        wplot.plot(reports["report"], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_clear_error(reports, tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as on a machine without it.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match=r"^matplotlib is not installed; pip install 'weightdiff\[plot\]'$"):
        wplot.plot(reports["report"], tmp_path / "x.png")
    code, err = cli(monkeypatch, capsys, str(reports["report"]), "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert err == "error: matplotlib is not installed; pip install 'weightdiff[plot]'\n"
    assert list(tmp_path.iterdir()) == []
