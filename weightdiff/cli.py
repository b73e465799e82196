"""The ``weightdiff`` command line: a thin typer layer over the Python API.

Parses options, shows the plan, progress and summaries, and maps every ``WeightdiffError`` to its exit code in
one place (``main``). Data goes to stdout, progress and diagnostics to stderr. No metric is computed here.
Exit codes: 0 success, 1 a gate failed, 2 usage/input/IO/network error, 3 nothing comparable.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from weightdiff import distributed
from weightdiff.errors import EXIT_USAGE, WeightdiffError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="How a fine-tuned model differs from its base, weight by weight.",
)

# Reusable option types, so every command spells its options the same way.
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", help="Only tensors whose name matches this glob (repeatable)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Skip tensors whose name matches this glob (repeatable)."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto picks CUDA when present).")
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hugging Face token for private or gated repos (default: HF_TOKEN, then the stored login).",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no plan on stderr.")]
# The CI gate's options, shared by compare and check (docs/ci-gate.md).
FailIfOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-if",
        metavar="RULE",
        help="Fail (exit 1) when this rule holds, e.g. 'sparsity_bf16 < 0.5' (repeatable).",
    ),
]
PolicyOpt = Annotated[
    str | None,
    typer.Option("--policy", metavar="FILE.toml", help="Gate rules ([[rule]] tables) from a TOML file."),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Fail when a tensor is on one side only or the shapes differ."),
]
ExitZeroOpt = Annotated[
    bool, typer.Option("--exit-zero", help="Report the gate's verdict but exit 0 when it fails.")
]
MarkdownOpt = Annotated[
    str | None,
    typer.Option("--markdown", metavar="PATH", help="Write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)."),
]


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(text: str, option: str) -> int:
    """'8GB', '512MiB', '1.5g' or a plain byte count -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a size (e.g. 8GB, 512MiB, 1.5g)", param_hint=option)
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _stdout(to_stderr: bool = False) -> Console:
    return Console(stderr=to_stderr, highlight=False)


class _Progress:
    """Progress on stderr: a bar on a terminal, nothing otherwise (and nothing with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]comparing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tensors"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_stderr(),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("compare", total=total_bytes)
        self.total_tensors = total_tensors
        self.done = 0

    def advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.done += 1
            self.progress.update(self.task, advance=nbytes)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _session(json_path: str | None, quiet: bool, device: str) -> tuple[Console, Console, _Progress, Any]:
    """What every computing command sets up first: the --json path checked (on rank 0, before any work), the
    two consoles (the summary moves to stderr when --json writes to stdout), progress, and the device."""
    from weightdiff.engine import device_name
    from weightdiff.writers import check_output_path

    if json_path is not None and json_path != "-" and distributed.is_leader():
        check_output_path(json_path, "--json")
    return _stderr(), _stdout(to_stderr=json_path == "-"), _Progress(quiet), device_name(device)


def _version_callback(value: bool) -> None:
    if value:
        from weightdiff import __version__

        typer.echo(f"weightdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """How a fine-tuned model differs from its base, weight by weight."""


@app.command()
@distributed.collective  # under torchrun: one session of all ranks, rank 0 prints (distributed.py)
def compare(
    base: Annotated[
        str, typer.Argument(help="Base checkpoint: a .safetensors file, a directory, or a Hub repo id.")
    ],
    tuned: Annotated[
        str,
        typer.Argument(
            help="Fine-tuned checkpoint, same forms as BASE, or a LoRA adapter directory of BASE."
        ),
    ],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write the per-tensor report to this Parquet file.")
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Write a JSON summary to this path ('-' for stdout).")
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename",
            metavar="REGEX=REPLACEMENT",
            help="Rename tuned-side tensors before pairing (Python re.sub syntax; repeatable, applied in order).",
        ),
    ] = None,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance for changed_atol.")] = 1e-5,
    device: DeviceOpt = "auto",
    no_spectral: Annotated[
        bool, typer.Option("--no-spectral", help="Element-wise metrics only (no SVDs).")
    ] = False,
    rank: Annotated[int, typer.Option("--rank", help="k: singular subspace size for angles and drift.")] = 64,
    principal_rank: Annotated[
        int,
        typer.Option(
            "--principal-rank", help="r: rank of the reconstruction that defines principal weights."
        ),
    ] = 64,
    alpha: Annotated[
        float, typer.Option("--alpha", help="Fraction of entries in the principal and low-magnitude masks.")
    ] = 0.5,
    svd: Annotated[str, typer.Option("--svd", help="SVD solver: exact, gram, fast or auto.")] = "auto",
    spectra: Annotated[
        str | None,
        typer.Option("--spectra", help="Also write singular values and angle vectors to this Parquet file."),
    ] = None,
    base_revision: Annotated[
        str | None, typer.Option("--base-revision", help="Hub revision of BASE.")
    ] = None,
    tuned_revision: Annotated[
        str | None, typer.Option("--tuned-revision", help="Hub revision of TUNED.")
    ] = None,
    token: TokenOpt = None,
    download: Annotated[
        bool,
        typer.Option(
            "--download", help="Hub: download shards into the HF cache instead of streaming ranges."
        ),
    ] = False,
    heatmap: Annotated[
        str, typer.Option("--heatmap", help="Column shown in the layer x module grid.")
    ] = "sparsity_bf16",
    top: Annotated[int, typer.Option("--top", help="How many most-changed tensors to list.")] = 10,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print where the time went.")] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory", help="Bound on host and device memory, e.g. 8GB or 512MiB.", show_default=False
        ),
    ] = None,
    fail_if: FailIfOpt = None,
    policy: PolicyOpt = None,
    strict: StrictOpt = False,
    exit_zero: ExitZeroOpt = False,
    markdown: MarkdownOpt = None,
) -> None:
    """Compare two checkpoints tensor by tensor and report how the weights changed."""
    from weightdiff import api, gate, summary, terminal
    from weightdiff.schema import COLUMN_NAMES
    from weightdiff.writers import check_output_path, write_json, write_text

    if heatmap not in COLUMN_NAMES and not heatmap.endswith("_overlap_ratio"):
        raise typer.BadParameter(f"unknown column {heatmap!r}", param_hint="--heatmap")
    err, out, progress, (dev, why) = _session(json_path, quiet, device)
    # Gate rules are parsed before any weight is read: a typo in a rule fails in a second, not after an hour.
    rules, policy_strict = gate.collect_rules(fail_if or (), policy)
    strict = strict or policy_strict
    gating = bool(rules) or strict
    if markdown is not None and markdown != "-" and distributed.is_leader():
        check_output_path(markdown, "--markdown")

    def on_plan(plan: Any, base_src: Any, tuned_src: Any) -> None:
        if not quiet:
            for src in (base_src, tuned_src):
                d = src.describe()
                if d.get("kind") != "local" or not Path(src.given).exists():
                    err.print(f"{src.given}: {d.get('kind')} source, resolved to {d.get('resolved')}")
            terminal.render_plan(plan, err, base_src.given, tuned_src.given)
            err.print(f"Device: {dev} ({why})")
            if note := distributed.share_note(plan.pairs):
                err.print(note)
        share = distributed.own_share(plan.pairs)  # under torchrun, rank 0's share: it shows its own progress
        progress.start(sum(p.nbytes for p in share), len(share))

    started = time.perf_counter()
    try:
        report = api.compare(
            base,
            tuned,
            output=output,
            include=include or (),
            exclude=exclude or (),
            renames=rename or (),
            atol=atol,
            device=str(dev),
            spectral=not no_spectral,
            rank=rank,
            principal_rank=principal_rank,
            alpha=alpha,
            svd=svd,
            spectra_output=spectra,
            base_revision=base_revision,
            tuned_revision=tuned_revision,
            token=token,
            download=download,
            max_memory=parse_size(max_memory, "--max-memory") if max_memory is not None else None,
            on_plan=on_plan,
            on_progress=lambda pair: progress.advance(pair.nbytes),
        )
    finally:
        progress.stop()
    if not distributed.is_leader():  # under torchrun rank 0 prints and writes the summaries
        return
    elapsed = time.perf_counter() - started
    rows = report.rows
    terminal.render_summary(rows, out, base, tuned, heatmap_column=heatmap, top=top)
    verdict = None
    if gating:
        from weightdiff import verdict as render

        verdict = gate.evaluate(rules, rows, report.plan.as_dict(), strict=strict)
        render.render_panel(verdict, out)
    if json_path is not None:
        doc = summary.summary_dict(rows, report.plan.as_dict(), report.metadata)
        if verdict is not None:
            doc["verdict"] = {k: v for k, v in verdict.as_dict().items() if k != "schema_version"}
        write_json(json_path, doc)
    if markdown is not None:
        from weightdiff.verdict import to_markdown

        write_text(markdown, to_markdown(verdict, rows, report.metadata))
    if output is not None and not quiet:
        err.print(f"Wrote {len(rows)} rows to {output}")
    if verbose:
        t = report.timings
        err.print(
            f"Time: {elapsed:.2f} s total; waiting for reads {t.read_wait:.2f} s (reader busy {t.reader_busy:.2f} s), "
            f"host-to-device {t.transfer:.2f} s, compute {t.compute:.2f} s"
        )
    _gate_exit(verdict, exit_zero)


def _gate_exit(verdict: Any, exit_zero: bool) -> None:
    """Exit 1 when the gate failed, unless --exit-zero asks CI to keep going (the verdict is still shown)."""
    if verdict is not None and verdict.failed and not exit_zero:
        raise typer.Exit(code=1)


@app.command()
def check(
    report: Annotated[str, typer.Argument(help="A Parquet report written by weightdiff compare -o.")],
    fail_if: FailIfOpt = None,
    policy: PolicyOpt = None,
    strict: StrictOpt = False,
    exit_zero: ExitZeroOpt = False,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Write the JSON verdict to this path ('-' for stdout).")
    ] = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Evaluate gate rules on a saved report, without reading any weights."""
    from weightdiff import gate
    from weightdiff import verdict as render
    from weightdiff.errors import RuleError
    from weightdiff.writers import check_output_path, write_json, write_text

    for path, option in ((json_path, "--json"), (markdown, "--markdown")):
        if path is not None and path != "-":
            check_output_path(path, option)
    saved = gate.load_report(report)
    rules, policy_strict = gate.collect_rules(fail_if or (), policy, columns=saved.columns())
    strict = strict or policy_strict
    if not rules and not strict:
        # A gate that checks nothing would pass every release: refuse it rather than exit 0.
        raise RuleError("nothing to check: give --fail-if RULE, --policy FILE.toml or --strict")
    verdict = gate.evaluate(
        rules,
        saved.rows,
        saved.plan,
        strict=strict,
        schema_version=saved.metadata.get("schema_version"),
        source=str(saved.path),
    )
    render.render_panel(verdict, _stdout(to_stderr=json_path == "-"), subject=str(saved.path))
    if json_path is not None:
        write_json(json_path, render.to_json(verdict))
    if markdown is not None:
        write_text(markdown, render.to_markdown(verdict, saved.rows, saved.metadata))
    _gate_exit(verdict, exit_zero)


@app.command()
@distributed.collective
def consistency(
    base: Annotated[
        str, typer.Argument(help="Base checkpoint: a .safetensors file, a directory, or a Hub repo id.")
    ],
    runs: Annotated[
        list[str], typer.Argument(help="Two or more fine-tuned runs of BASE, same forms as BASE.")
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Write the per-tensor table to this Parquet file.")
    ],
    stripes: Annotated[
        str | None,
        typer.Option(
            "--stripes", help="Also write the consensus map's row and column means to this Parquet file."
        ),
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Write a JSON summary to this path ('-' for stdout).")
    ] = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    token: TokenOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Do several fine-tunes of one base update the same weights? Compares their bf16 update masks."""
    from weightdiff import consistency as cons
    from weightdiff.errors import InputError
    from weightdiff.writers import write_json

    if len(runs) < 2:
        raise InputError(f"consistency needs BASE and at least two runs, got {len(runs)} run")
    err, out, progress, (dev, why) = _session(json_path, quiet, device)

    def on_plan(plan: Any, base_src: Any, run_srcs: Any) -> None:
        if not quiet:
            cons.render_plan(plan, err, base_src.given, [r.given for r in run_srcs])
            err.print(f"Device: {dev} ({why})")
            if note := distributed.share_note(plan.items):
                err.print(note)
        share = distributed.own_share(plan.items)  # under torchrun, rank 0's share: it shows its own progress
        progress.start(sum(i.nbytes for i in share), len(share))

    try:
        report = cons.consistency(
            base,
            runs,
            output=output,
            stripes_output=stripes,
            include=include or (),
            exclude=exclude or (),
            device=str(dev),
            token=token,
            on_plan=on_plan,
            on_progress=lambda item: progress.advance(item.nbytes),
        )
    finally:
        progress.stop()
    if not distributed.is_leader():  # under torchrun rank 0 prints and writes the summaries
        return
    rows = report.rows
    cons.render_summary(rows, out, base, runs)
    if json_path is not None:
        write_json(json_path, report.summary())
    if not quiet:
        err.print(f"Wrote {len(rows)} rows to {output}" + (f" and stripes to {stripes}" if stripes else ""))


@app.command()
@distributed.collective
def spectrum(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint to analyse: a file, a directory or a Hub repo id.")
    ],
    tuned: Annotated[
        str | None, typer.Argument(help="Optional second checkpoint: adds its spectrum and per-index drift.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write the per-tensor report to this Parquet file.")
    ] = None,
    rank: Annotated[
        int, typer.Option("--rank", help="How many top singular values to keep per tensor.")
    ] = 64,
    full: Annotated[
        bool, typer.Option("--full", help="Keep every singular value, not just the top k.")
    ] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    device: DeviceOpt = "auto",
    token: TokenOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Singular spectra of a checkpoint's matrices: norms, stable and effective rank, top-k energy."""
    from weightdiff import terminal
    from weightdiff.spectrum import spectrum as run_spectrum

    report = run_spectrum(
        checkpoint,
        tuned,
        output=output,
        rank=rank,
        full=full,
        include=include or (),
        exclude=exclude or (),
        device=device,
        token=token,
    )
    if not distributed.is_leader():  # under torchrun rank 0 prints
        return
    if report.skipped and not quiet:
        more = f" (+{len(report.skipped) - 5} more)" if len(report.skipped) > 5 else ""
        _stderr().print(
            f"{len(report.skipped)} tensors skipped (not 2-D, or not in both): {', '.join(report.skipped[:5])}{more}"
        )
    title = checkpoint if tuned is None else f"{checkpoint} → {tuned}"
    terminal.render_spectrum(report.rows, _stdout(), title)
    if output is not None and not quiet:
        _stderr().print(f"Wrote {len(report.rows)} rows to {output}")


@app.command()
def plot(
    report: Annotated[
        str,
        typer.Argument(
            help="A Parquet file written by weightdiff: compare, consistency or spectrum report, "
            "or a --spectra / --stripes file."
        ),
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="Image to write: .png, .svg or .pdf.")
    ],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="heatmap (layer x module grid), layers (per-layer curves), spectra or stripes; "
            "auto: the view a spectra or stripes file calls for, else heatmap.",
        ),
    ] = "auto",
    column: Annotated[
        str | None,
        typer.Option(
            "--column",
            help="Report column for the heatmap (default sparsity_bf16), or the only column of --kind layers.",
        ),
    ] = None,
    spectra: Annotated[
        str | None,
        typer.Option(
            "--spectra", metavar="FILE", help="The file from weightdiff compare --spectra (--kind spectra)."
        ),
    ] = None,
    stripes: Annotated[
        str | None,
        typer.Option(
            "--stripes",
            metavar="FILE",
            help="The file from weightdiff consistency --stripes (--kind stripes).",
        ),
    ] = None,
    tensor: Annotated[
        list[str] | None,
        typer.Option("--tensor", metavar="NAME", help="Tensor to show in spectra or stripes (repeatable)."),
    ] = None,
    top: Annotated[
        int, typer.Option("--top", help="Without --tensor: how many of the most-changed tensors to show.")
    ] = 4,
    dpi: Annotated[int, typer.Option("--dpi", help="Resolution of PNG output, in dots per inch.")] = 150,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the path written.")] = False,
) -> None:
    """Draw a saved report as an image: layer x module heatmap, per-layer curves, spectra or stripes."""
    from weightdiff.plot import plot as draw

    path = draw(
        report,
        output,
        kind=kind,
        column=column,
        spectra=spectra,
        stripes=stripes,
        tensors=tensor or (),
        top=top,
        dpi=dpi,
    )
    if not quiet:
        _stderr().print(f"Wrote {path}")


def run() -> None:
    """The installed ``weightdiff`` command and ``python -m weightdiff``: ``main``, then a quick exit.

    A finished command ends the process without the interpreter's module-by-module teardown, which with
    pyarrow, pandas, torch or the Hub client loaded takes 0.1-0.3 s and does nothing for the command. Before
    that, the atexit handlers run (the process-group teardown under torchrun, logging) and standard output
    and error are flushed; reports are complete and renamed into place before ``main`` returns. ``main``
    itself (for in-process callers and tests) returns or raises as usual.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):  # as the interpreter does for sys.exit("message")
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe (weightdiff ... | head) or a closed stream has nothing left to flush.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def main() -> None:
    """Entry point: run the app and turn weightdiff errors into one-line messages and exit codes."""
    try:
        app()
    except WeightdiffError as exc:
        if os.environ.get("WEIGHTDIFF_DEBUG") == "1":
            raise
        if not getattr(exc, "quiet", False):  # torchrun: rank 0 reports another rank's failure, once
            _stderr().print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _stderr().print("interrupted; no report written")
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, traceback on request
        if os.environ.get("WEIGHTDIFF_DEBUG") == "1":
            raise
        message = f"{type(exc).__name__}: {exc} (set WEIGHTDIFF_DEBUG=1 for a traceback)"
        _stderr().print(Text.assemble(("internal error: ", "bold red"), message), soft_wrap=True)
        sys.exit(EXIT_USAGE)
