"""Pictures of saved weightdiff reports: ``weightdiff plot`` and ``weightdiff.plot.plot()``.

Views (``kind``):

- ``heatmap``: a layer x module grid of one numeric column (default ``sparsity_bf16``: PNT's "stripes" of
  update density across the network). Cells are aggregated by ``weightdiff.summary.heatmap``, the same function
  behind the terminal grid, so the picture and the terminal agree: sparsities parameter-weighted from the exact
  counts, every other column the median over the cell's tensors (experts of one MoE module).
- ``layers``: small multiples over layer index: the largest principal angles of U and V, singular-value drift,
  and the update's overlap with the principal and low-magnitude masks and its principal energy, each divided by
  its random baseline so that 1.0 (drawn as a line) means "no preference". One thin line per module and a thick
  line for the median over modules.
- ``spectra``: from a ``weightdiff compare --spectra`` file, base and tuned singular values, their relative
  change and the principal angles per index, for chosen tensors (default: the largest singular-value drift).
- ``stripes``: from a ``weightdiff consistency --stripes`` file, the row and column means of the consensus map
  for chosen tensors (default: the most uneven ones).

This module reads Parquet files and writes one image file (PNG, SVG or PDF, chosen by the suffix), atomically:
the figure is rendered to a temporary file beside the destination and renamed into place, so an error never
leaves a partial image. It computes no metric from weights and parses no command line. matplotlib is an optional
dependency (``pip install 'weightdiff[plot]'``), imported only when a figure is drawn; figures are built with
the object-oriented API on an Agg canvas, never through ``pyplot``, so plotting from a notebook or a script
changes no global backend or state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from weightdiff import schema, summary
from weightdiff.errors import InputError, OutputError

KINDS = ("heatmap", "layers", "spectra", "stripes")
#: Output suffix -> matplotlib format name.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DEFAULT_TOP = 4
DEFAULT_DPI = 150
INSTALL_HINT = "matplotlib is not installed; pip install 'weightdiff[plot]'"

# Columns computed from two report columns: an observed share divided by its random baseline.
DERIVED_COLUMNS = {
    "principal_overlap_ratio": ("principal_overlap", "principal_mask_density"),
    "lowmag_overlap_ratio": ("lowmag_overlap", "lowmag_mask_density"),
    "principal_energy_ratio": ("principal_energy", "principal_energy_baseline"),
}
_DERIVED_DOCS = {
    "principal_overlap_ratio": "principal_overlap / principal_mask_density: 1 = the update lands on principal "
    "weights as often as a random mask would, below 1 = it avoids them",
    "lowmag_overlap_ratio": "lowmag_overlap / lowmag_mask_density: 1 = as random, above 1 = the update prefers "
    "low-magnitude weights",
    "principal_energy_ratio": "principal_energy / principal_energy_baseline: share of the update's energy in the "
    "base's top-k block, relative to a random update direction",
}

# The columns whose larger values mean LESS change; their colour scale is reversed so that darker always means
# more change.
_LESS_IS_MORE_CHANGE = ("sparsity_exact", "sparsity_bf16", "sparsity_atol", "cosine")

# Which file a table is, from its columns (the first rule that matches wins).
_SIGNATURES = (
    ("spectra", {"name", "series", "index", "value"}),
    ("stripes", {"name", "axis", "index", "fraction"}),
    ("consistency", {"name", "jaccard_mean", "runs"}),
    ("spectrum", {"name", "spectral_norm", "singular_values"}),
    ("compare", {"name", "numel", "changed_bf16"}),
)


class PlotDependencyError(InputError):
    """matplotlib, needed only to draw plots, is not installed."""


@dataclass
class LoadedFile:
    """One Parquet file written by weightdiff: its table, decoded metadata and which kind of file it is."""

    path: Path
    table: pa.Table
    metadata: dict[str, Any]
    kind: str

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> LoadedFile:
    """Read a weightdiff Parquet file (compare, consistency or spectrum report, spectra or stripes file).

    Raises ``InputError`` for a missing file, a directory, a file that is not Parquet, a Parquet file without
    weightdiff metadata or of another schema major version, and one whose columns match no weightdiff file.
    """
    from weightdiff.reports import read_schema, read_table

    p, arrow_schema, metadata = read_schema(path)
    names = set(arrow_schema.names)
    kind = next((k for k, cols in _SIGNATURES if cols <= names), None)
    if kind is None:
        raise InputError(
            f"{p}: not a weightdiff report (its columns match no report, spectra or stripes file)"
        )
    table = read_table(p)
    return LoadedFile(p, table, metadata, kind)


def output_format(path: str | os.PathLike[str]) -> str:
    """The matplotlib format for ``path`` from its suffix; ``InputError`` for anything but .png, .svg, .pdf."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"{path}: unsupported image type {suffix or '(no suffix)'!r}; use one of {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def numeric_columns(table: pa.Table) -> list[str]:
    """The table's integer and floating columns, then the derived ratio columns it can provide."""
    # layer and expert are the grid's axes, not values to show on it.
    cols = [
        f.name
        for f in table.schema
        if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) and f.name not in ("layer", "expert")
    ]
    cols += [
        d for d, (a, b) in DERIVED_COLUMNS.items() if a in table.column_names and b in table.column_names
    ]
    return cols


def with_derived(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the derived ratio columns added (null when either part is null or the baseline is 0)."""
    out = []
    for row in rows:
        extra: dict[str, Any] = {}
        for name, (num, den) in DERIVED_COLUMNS.items():
            a, b = row.get(num), row.get(den)
            extra[name] = float(a) / float(b) if a is not None and b is not None and b != 0 else None
        out.append({**row, **extra})
    return out


def column_doc(column: str) -> str:
    """The schema's one-line meaning of ``column`` (or of a derived column)."""
    if column in _DERIVED_DOCS:
        return _DERIVED_DOCS[column]
    for columns in (schema.COMPARE_COLUMNS, schema.CONSISTENCY_COLUMNS, schema.SPECTRUM_COLUMNS):
        for c in columns:
            if c.name == column:
                return c.doc
    return ""


def column_unit(column: str) -> str:
    """A short unit for axis and colour-bar labels."""
    if column.startswith("sparsity_"):
        return "share of weights unchanged"
    if column.endswith("_deg"):
        return "degrees"
    if column.endswith("_ratio"):
        return "× random baseline"
    if column.startswith(("changed", "hidden_by", "nonfinite", "numel", "unanimous")) and not column.endswith(
        "fraction"
    ):
        return "elements"
    if column in ("rel_delta", "sv_drift", "sv_drift_topk", "sigma1_rel_change", "topk_energy_rel_change"):
        return "relative to the base"
    if column.endswith(("_overlap", "_density", "_fraction", "_mean", "_random", "_energy", "_share")):
        return "fraction"
    if column.endswith("_baseline"):
        return "fraction"
    return ""


def subject(metadata: dict[str, Any]) -> str:
    """Which checkpoints a file describes, from its metadata: 'BASE → TUNED', 'BASE vs 3 runs', ..."""

    def given(d: Any) -> str:
        if isinstance(d, dict):
            return _shorten(str(d.get("given") or d.get("resolved") or "?"))
        return "?"

    if isinstance(metadata.get("runs"), list):
        runs = metadata["runs"]
        return (
            f"{given(metadata.get('base'))} vs {len(runs)} runs ({', '.join(given(r) for r in runs[:3])}"
            + (", …)" if len(runs) > 3 else ")")
        )
    if "checkpoint" in metadata:
        tuned = metadata.get("tuned")
        return given(metadata["checkpoint"]) + (f" → {given(tuned)}" if tuned else "")
    return f"{given(metadata.get('base'))} → {given(metadata.get('tuned'))}"


def _shorten(text: str, width: int = 48) -> str:
    # Titles name checkpoints by what the user typed; long absolute paths keep their informative tail.
    if len(text) <= width:
        return text
    parts = text.replace("\\", "/").split("/")
    tail = "/".join(parts[-2:])
    return "…/" + tail if len(tail) < width else "…" + text[-(width - 1) :]


def _short_name(name: str) -> str:
    return name.removeprefix("model.")


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def plot(
    report: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    kind: str = "auto",
    column: str | None = None,
    spectra: str | os.PathLike[str] | None = None,
    stripes: str | os.PathLike[str] | None = None,
    tensors: Sequence[str] = (),
    top: int = DEFAULT_TOP,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Draw one view of a saved report into ``output`` (.png, .svg or .pdf) and return its path.

    ``kind`` is one of ``KINDS`` or ``auto`` (a spectra or stripes file given as ``report`` picks its own view,
    any report the heatmap). ``column`` picks the heatmap's column, or a single column for the layers view.
    ``spectra`` / ``stripes`` name the companion files of those views when ``report`` is the main report.
    Every bad input raises ``InputError`` (exit code 2) before anything is written.
    """
    fmt = output_format(output)
    if kind not in ("auto", *KINDS):
        raise InputError(f"--kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    if not 20 <= dpi <= 1200:
        raise InputError(f"--dpi must be between 20 and 1200, got {dpi}")
    mpl = _matplotlib()
    from weightdiff.writers import check_output_path

    check_output_path(output, "--output")
    main = load(report)
    if kind == "auto":
        kind = main.kind if main.kind in ("spectra", "stripes") else "heatmap"
    if column is not None and kind not in ("heatmap", "layers"):
        raise InputError(f"--column applies to --kind heatmap and layers, not {kind}")

    with mpl.rc_context(_STYLE):
        if kind == "heatmap":
            fig = _heatmap_figure(mpl, _require_report(main, kind), column)
        elif kind == "layers":
            fig = _layers_figure(mpl, _require_report(main, kind, ("compare",)), column)
        elif kind == "spectra":
            data = _companion(main, spectra, "spectra", "--spectra", "weightdiff compare --spectra")
            fig = _spectra_figure(mpl, data, tensors, top)
        else:
            data = _companion(main, stripes, "stripes", "--stripes", "weightdiff consistency --stripes")
            fig = _stripes_figure(mpl, data, tensors, top)
        _save(fig, Path(output), fmt, dpi)
    return Path(output)


def _matplotlib() -> Any:
    try:
        # The submodules are used as attributes of the package object handed to the drawing functions.
        import matplotlib
        import matplotlib.colors
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        raise PlotDependencyError(INSTALL_HINT) from None
    return matplotlib


def _require_report(
    loaded: LoadedFile, kind: str, kinds: Sequence[str] = ("compare", "consistency", "spectrum")
):
    if loaded.kind not in kinds:
        what = {"spectra": "a spectra file", "stripes": "a stripes file"}.get(
            loaded.kind, f"a {loaded.kind} report"
        )
        need = " or ".join(f"a {k} report" for k in kinds)
        raise InputError(f"{loaded.path}: is {what}; --kind {kind} needs {need}")
    return loaded


def _companion(main: LoadedFile, path: Any, kind: str, option: str, writer: str) -> LoadedFile:
    """The spectra or stripes file: ``main`` itself when it is one, else the file named by ``option``."""
    if path is None:
        if main.kind == kind:
            return main
        raise InputError(f"--kind {kind} needs {option} FILE.parquet (written by {writer})")
    data = load(path)
    if data.kind != kind:
        raise InputError(f"{data.path}: is not a {kind} file ({option} expects the file written by {writer})")
    return data


_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    # Stable SVG ids and no timestamps, so that re-rendering an unchanged report gives an identical file.
    "svg.hashsalt": "weightdiff",
}


def _new_figure(mpl: Any, width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = mpl.figure.Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, output: Path, fmt: str, dpi: int) -> None:
    from weightdiff.writers import AtomicFile

    metadata = {"png": {"Software": "weightdiff"}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    f = AtomicFile(output)
    try:
        fig.savefig(str(f.tmp), format=fmt, dpi=dpi, metadata=metadata)
        # The temporary file is private (0600); an image is meant to be shared like any file the user saves.
        os.chmod(f.tmp, output.stat().st_mode & 0o777 if output.exists() else 0o644)
        f.commit()
    except OSError as exc:
        f.abort()
        raise OutputError(f"{output}: cannot write the image ({exc.strerror or exc})") from None
    except BaseException:
        f.abort()
        raise


# --------------------------------------------------------------------------------------------------------------
# heatmap
# --------------------------------------------------------------------------------------------------------------


def _default_column(loaded: LoadedFile) -> str:
    return {"compare": "sparsity_bf16", "consistency": "jaccard_ratio", "spectrum": "stable_rank"}[
        loaded.kind
    ]


def _check_column(loaded: LoadedFile, column: str) -> None:
    numeric = numeric_columns(loaded.table)
    if column in numeric:
        return
    if column in loaded.table.column_names:
        raise InputError(
            f"{loaded.path}: column {column!r} is not numeric; choose one of {', '.join(numeric)}"
        )
    raise InputError(f"{loaded.path}: no column {column!r}; numeric columns are {', '.join(numeric)}")


def _grid(loaded: LoadedFile, rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    grid = summary.heatmap(rows, column)
    if not grid["layers"]:
        raise InputError(
            f"{loaded.path}: no tensor has a layer index (names like model.layers.N...), so there is no layer axis"
        )
    return grid


def _matrix(grid: dict[str, Any]) -> Any:
    import numpy as np

    return np.array(
        [[math.nan if v is None else float(v) for v in line] for line in grid["values"]], dtype=np.float64
    )


def _heatmap_figure(mpl: Any, loaded: LoadedFile, column: str | None) -> Any:
    import numpy as np

    column = column or _default_column(loaded)
    _check_column(loaded, column)
    grid = _grid(loaded, with_derived(loaded.rows), column)
    values = _matrix(grid)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError(f"{loaded.path}: column {column!r} is null for every tensor inside the layers")
    layers, modules = grid["layers"], grid["modules"]

    if column.endswith("_ratio"):
        # Ratios to a random baseline: diverging around 1, red = more than random, blue = less.
        spread = max(float(np.max(np.abs(finite - 1.0))), 0.05)
        norm = mpl.colors.TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread)
        cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#e6e6e6")
        meaning = "red: above random, blue: below"
    else:
        lo, hi = float(finite.min()), float(finite.max())
        if hi <= lo:  # a constant grid still needs a non-empty colour range
            pad = abs(lo) * 0.01 or 0.01
            lo, hi = lo - pad, hi + pad
        norm = mpl.colors.Normalize(vmin=lo, vmax=hi)
        reverse = column in _LESS_IS_MORE_CHANGE
        cmap = mpl.colormaps["Blues_r" if reverse else "Blues"].with_extremes(bad="#e6e6e6")
        meaning = "darker = more weights changed" if reverse else "darker = larger value"

    width = min(max(3.4 + 0.85 * len(modules), 5.5), 20.0)
    height = min(max(2.2 + 0.3 * len(layers), 4.4), 26.0)
    fig = _new_figure(mpl, width, height)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(len(modules)), [m for m in modules], rotation=35, ha="right", rotation_mode="anchor")
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for spine in ax.spines.values():
        spine.set_visible(False)
    unit = column_unit(column)
    bar = fig.colorbar(image, ax=ax, shrink=0.95, pad=0.02)
    bar.set_label(f"{column}" + (f": {unit}" if unit else "") + f"\n({meaning})")
    if column.startswith("sparsity_"):
        bar.ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(xmax=1.0))

    if len(layers) * len(modules) <= 400 and len(modules) <= 16:
        percent = column.startswith("sparsity_")
        for i in range(len(layers)):
            for j in range(len(modules)):
                v = values[i, j]
                if not math.isfinite(v):
                    continue
                text = f"{100 * v:.1f}%" if percent else f"{v:.3g}"
                r, g, b, _ = cmap(norm(v))
                dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "#222222"
                )

    how = (
        "parameter-weighted over the tensors of a cell"
        if column.startswith("sparsity_")
        else "median over the tensors of a cell"
    )
    fig.suptitle(f"{column} by layer and module\n{subject(loaded.metadata)}", fontsize=10.5)
    caption = (
        f"{column_doc(column)}.\nCells: {how}; grey = no tensor or no value. Tensors outside the layers "
    )
    caption += "(embeddings, final norm, head) are not shown."
    fig.supxlabel(_wrap(caption, int(width * 14)), fontsize=7, color="#555555")
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, max(width, 40)) for line in text.splitlines())


# --------------------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Panel:
    column: str
    title: str
    ylabel: str
    baseline: float | None = None
    log: bool = False


def _layer_panels(rows: list[dict[str, Any]]) -> list[_Panel]:
    full_drift = any(r.get("sv_drift") is not None for r in rows)
    drift = "sv_drift" if full_drift else "sv_drift_topk"
    return [
        _Panel(
            "angle_u_max_deg", "Rotation of the top-k left singular subspace", "largest angle, U (degrees)"
        ),
        _Panel(
            "angle_v_max_deg", "Rotation of the top-k right singular subspace", "largest angle, V (degrees)"
        ),
        _Panel(
            drift,
            "Singular-value drift" + ("" if full_drift else " (top k)"),
            f"{drift}: |S+ − S0| / |S0|",
        ),
        _Panel(
            "principal_overlap_ratio",
            "Update on principal weights, vs random",
            "overlap / mask density (× random)",
            baseline=1.0,
        ),
        _Panel(
            "lowmag_overlap_ratio",
            "Update on low-magnitude weights, vs random",
            "overlap / mask density (× random)",
            baseline=1.0,
        ),
        _Panel(
            "principal_energy_ratio",
            "Update energy in the base's top-k block, vs random",
            "principal_energy / baseline (× random)",
            baseline=1.0,
            log=True,
        ),
    ]


def _layers_figure(mpl: Any, loaded: LoadedFile, column: str | None) -> Any:
    import numpy as np

    rows = with_derived(loaded.rows)
    if column is not None:
        _check_column(loaded, column)
        unit = column_unit(column)
        panels = [
            _Panel(
                column,
                column,
                column + (f" ({unit})" if unit else ""),
                baseline=1.0 if column.endswith("_ratio") else None,
            )
        ]
    else:
        panels = _layer_panels(rows)
        if all(r.get("rank_k") is None for r in rows):
            raise InputError(
                f"{loaded.path}: the report has no spectral metrics (written with --no-spectral?); "
                "the layers view needs them, or pick one column with --column"
            )
    grids = [_grid(loaded, rows, p.column) for p in panels]
    modules: list[str] = []
    for g in grids:
        for i, m in enumerate(g["modules"]):
            if m not in modules and any(line[i] is not None for line in g["values"]):
                modules.append(m)
    if not modules:
        raise InputError(
            f"{loaded.path}: no values to plot by layer for {', '.join(p.column for p in panels)}"
        )
    palette = mpl.colormaps["tab10" if len(modules) <= 10 else "tab20"]
    colours = {m: palette(i % palette.N) for i, m in enumerate(modules)}

    ncols = 1 if len(panels) == 1 else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(mpl, 4.6 * ncols + (1.6 if len(panels) > 1 else 2.0), 3.2 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    handles: dict[str, Any] = {}
    for n, (panel, grid) in enumerate(zip(panels, grids, strict=True)):
        ax = axes[n // ncols][n % ncols]
        values = _matrix(grid)
        layers = np.array(grid["layers"], dtype=float)
        if panel.log:
            values = np.where(values > 0, values, np.nan)  # a log axis cannot show 0 or negative ratios
        for j, module in enumerate(grid["modules"]):
            col = values[:, j]
            if not np.isfinite(col).any():
                continue
            (line,) = ax.plot(layers, col, marker="o", ms=2.5, lw=1.0, alpha=0.8, color=colours[module])
            handles.setdefault(module, line)
        with np.errstate(all="ignore"):
            has = np.isfinite(values).any(axis=1)
            med = np.full(len(layers), np.nan)
            if has.any():
                med[has] = np.nanmedian(values[has], axis=1)
        if np.isfinite(med).any():
            (line,) = ax.plot(layers, med, color="black", lw=2.2, label="median over modules")
            handles.setdefault("median over modules", line)
        else:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="#777777")
        if panel.baseline is not None:
            line = ax.axhline(panel.baseline, color="#c0392b", ls="--", lw=1.1)
            handles.setdefault("random baseline (1.0)", line)
        finite = values[np.isfinite(values)]
        # Energy ratios span decades between SFT-like and RL-like updates; a log axis only once they do.
        if panel.log and finite.size and finite.max() / finite.min() > 20:
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, color="#eeeeee", lw=0.6)
        if n // ncols == nrows - 1 or n + ncols >= len(panels):
            ax.set_xlabel("layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
    for n in range(len(panels), nrows * ncols):
        axes[n // ncols][n % ncols].set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside right center",
        frameon=False,
        title="module",
    )
    title = "Per-layer spectral change" if column is None else f"{column} by layer"
    fig.suptitle(f"{title}\n{subject(loaded.metadata)}", fontsize=10.5)
    fig.supxlabel(
        "Each thin line is one module (median over its tensors, e.g. experts); the thick line is the median over "
        "modules. Ratios: 1.0 = what a random update of the same density would give.",
        fontsize=7,
        color="#555555",
    )
    return fig


# --------------------------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------------------------


def _series(table: pa.Table) -> dict[str, dict[str, Any]]:
    """{name: {series: values ordered by index}} from the long spectra table."""
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    cols = table.select(["name", "series", "index", "value"]).to_pydict()
    grouped: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name, series, index, value in zip(
        cols["name"], cols["series"], cols["index"], cols["value"], strict=True
    ):
        grouped.setdefault((name, series), []).append((int(index), float(value)))
    for (name, series), pairs in grouped.items():
        pairs.sort()
        out.setdefault(name, {})[series] = np.array([v for _, v in pairs], dtype=np.float64)
    return out


def _pick(
    available: Sequence[str], asked: Sequence[str], score: dict[str, float], top: int, what: str
) -> list[str]:
    if asked:
        missing = [t for t in asked if t not in available]
        if missing:
            sample = ", ".join(sorted(available)[:3])
            raise InputError(
                f"--tensor {missing[0]!r} is not in the {what} file ({len(available)} tensors, e.g. {sample})"
            )
        return list(dict.fromkeys(asked))
    return sorted(available, key=lambda n: (-score.get(n, 0.0), n))[:top]


def _spectra_figure(mpl: Any, data: LoadedFile, tensors: Sequence[str], top: int) -> Any:
    import numpy as np

    spectra = _series(data.table)
    paired = [n for n, s in spectra.items() if "sv_base" in s and "sv_tuned" in s and len(s["sv_base"])]
    if not paired:
        raise InputError(f"{data.path}: the spectra file holds no tensor with base and tuned singular values")
    score: dict[str, float] = {}
    for n in paired:
        b, t = spectra[n]["sv_base"], spectra[n]["sv_tuned"]
        k = min(len(b), len(t))
        denom = float(np.linalg.norm(b[:k]))
        score[n] = float(np.linalg.norm(t[:k] - b[:k])) / denom if denom > 0 else 0.0
    chosen = _pick(paired, tensors, score, top, "spectra")

    ncols = len(chosen)
    fig = _new_figure(mpl, max(3.6 * ncols + 0.6, 5.0), 8.2)
    axes = fig.subplots(3, ncols, squeeze=False)
    for j, name in enumerate(chosen):
        s = spectra[name]
        b, t = s["sv_base"], s["sv_tuned"]
        k = min(len(b), len(t))
        idx = np.arange(1, k + 1)
        ax = axes[0][j]
        ax.plot(idx, b[:k], color="#1f4e9c", lw=1.6, label="base")
        ax.plot(idx, t[:k], color="#e67e22", lw=1.2, ls="--", label="tuned")
        if np.all(b[:k] > 0) and np.all(t[:k] > 0):
            ax.set_yscale("log")
        ax.set_title(_wrap(_short_name(name), 38), fontsize=8.5)
        ax.set_ylabel("singular value σᵢ" if j == 0 else "")
        ax.legend(frameon=False)

        ax = axes[1][j]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(b[:k] != 0, (t[:k] - b[:k]) / b[:k], np.nan)
        ax.axhline(0.0, color="#999999", lw=0.8)
        ax.plot(idx, rel, color="#6c3483", lw=1.0, marker="o", ms=2)
        ax.set_ylabel("(σᵢ tuned − σᵢ base) / σᵢ base" if j == 0 else "")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

        ax = axes[2][j]
        drawn = False
        for series, label, colour in (
            ("angles_u_deg", "U (left)", "#117a65"),
            ("angles_v_deg", "V (right)", "#b03a2e"),
        ):
            if series in s and len(s[series]):
                a = s[series]
                ax.plot(np.arange(1, len(a) + 1), a, color=colour, lw=1.2, marker="o", ms=2, label=label)
                drawn = True
        if drawn:
            ax.legend(frameon=False)
        else:
            ax.text(0.5, 0.5, "no angles stored", transform=ax.transAxes, ha="center", color="#777777")
        ax.set_ylabel("principal angle θᵢ (degrees)" if j == 0 else "")
        ax.set_xlabel("index i (1 = largest)")
        for row in range(3):
            axes[row][j].grid(True, color="#eeeeee", lw=0.6)
    how = "chosen with --tensor" if tensors else f"the {len(chosen)} with the largest singular-value drift"
    fig.suptitle(f"Singular spectra, base vs tuned ({how})\n{subject(data.metadata)}", fontsize=10.5)
    return fig


# --------------------------------------------------------------------------------------------------------------
# stripes
# --------------------------------------------------------------------------------------------------------------


def _stripes_figure(mpl: Any, data: LoadedFile, tensors: Sequence[str], top: int) -> Any:
    import numpy as np

    cols = data.table.select(["name", "axis", "index", "fraction"]).to_pydict()
    grouped: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, axis, index, fraction in zip(
        cols["name"], cols["axis"], cols["index"], cols["fraction"], strict=True
    ):
        grouped.setdefault(name, {}).setdefault(axis, []).append((int(index), float(fraction)))
    if not grouped:
        raise InputError(f"{data.path}: the stripes file is empty")
    profiles = {
        name: {axis: np.array([f for _, f in sorted(pairs)]) for axis, pairs in axes.items()}
        for name, axes in grouped.items()
    }
    # The most striped tensors: where one row or column stands out most above the tensor's mean. Matrices come
    # first (+1, as the spread is at most 1): a 1-D tensor's "stripe" is single elements, noisy with few runs.
    score = {
        name: max((float(v.max() - v.mean()) for v in p.values() if v.size), default=0.0) + ("col" in p)
        for name, p in profiles.items()
    }
    chosen = _pick(list(profiles), tensors, score, top, "stripes")
    ncols = len(chosen)
    fig = _new_figure(mpl, max(3.6 * ncols + 0.6, 5.0), 5.8)
    axes = fig.subplots(2, ncols, squeeze=False)
    for j, name in enumerate(chosen):
        for i, (axis, label) in enumerate((("row", "row (output unit)"), ("col", "column (input unit)"))):
            ax = axes[i][j]
            v = profiles[name].get(axis)
            if v is None or v.size == 0:
                ax.text(
                    0.5,
                    0.5,
                    f"no {axis} stripes (1-D tensor)",
                    transform=ax.transAxes,
                    ha="center",
                    color="#777777",
                )
                ax.set_axis_off()
                continue
            ax.plot(np.arange(v.size), v, color="#1f4e9c", lw=0.9)
            ax.axhline(float(v.mean()), color="#c0392b", ls="--", lw=1.0, label=f"mean {v.mean():.3f}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(f"{label} index")
            ax.set_ylabel("share of (run, element) pairs changed" if j == 0 else "")
            ax.legend(frameon=False, loc="upper right")
            ax.grid(True, color="#eeeeee", lw=0.6)
            if i == 0:
                ax.set_title(_wrap(_short_name(name), 38), fontsize=8.5)
    how = "chosen with --tensor" if tensors else f"the {len(chosen)} most uneven"
    fig.suptitle(
        f"Consensus stripes: row and column means of the update map ({how})\n{subject(data.metadata)}",
        fontsize=10.5,
    )
    return fig
