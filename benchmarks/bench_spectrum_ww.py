"""Scenario 3: ``weightdiff spectrum`` against WeightWatcher's ``analyze()`` on the same real checkpoint.

The checkpoint is SmolLM2-135M-Instruct converted by ``examples/smollm2/convert.py`` (a directory holding
``model.safetensors`` and ``config.json``). Both tools read that same file themselves.

Each contender runs in its own child process, one after another (never concurrently), so that peak resident
memory (ru_maxrss from wait4) and CPU time are its own; the page cache is warmed first. Contenders:
- wd_cli: ``weightdiff spectrum CKPT -o OUT --full -q`` as a subprocess: the wall time includes interpreter
          start-up, imports and CLI set-up (what a user waits for);
- wd_api: ``weightdiff.spectrum.spectrum(CKPT, output=OUT, full=True)`` timed inside the child after imports and
          a one-matrix warm-up (LAPACK/MKL first-call set-up): start-up excluded;
- ww:     ``weightwatcher.WeightWatcher().analyze(model=CKPT)`` with its defaults, timed the same way after imports
          and a warm-up SVD; the child also reports how much of that time went to WeightWatcher's SVDs
          (``apply_esd``) and to its power-law fits (``apply_powerlaw``), which weightdiff does not do, and
          the whole child's wall time (start-up included) for the comparison with wd_cli.
To read WeightWatcher's eigenvalues the ww child wraps ``WeightWatcher.apply_esd`` and keeps a reference to
each layer's ``evals`` array (plus two perf_counter calls per layer): negligible next to an SVD.

Agreement (per matrix, names matched as ``WW name + ".weight"``), after converting definitions: WeightWatcher
works with the eigenvalues lambda = sigma^2 of W^T W, unnormalised (``normalize`` is off by default), so its
``spectral_norm`` is sigma_1^2, ``norm`` is ||W||_F^2 and ``stable_rank`` = norm / spectral_norm =
||W||_F^2 / sigma_1^2, the same definition as weightdiff's; its ``sv_max`` is sigma_1. The singular values
compared are weightdiff's (``--full``) against sqrt(WW evals), both sorted descending.

What it does not do: it does not compare metrics with different definitions (WW's ``alpha`` power-law exponent,
its ``entropy``, which is normalised by log(rank) and uses sigma^2, and weightdiff's exp-entropy
``effective_rank``), and it does not run on a GPU (on CUDA machines WeightWatcher casts weights to fp16 first).

On a machine shared with other jobs, two-thread BLAS/OpenMP teams spin while a thread is descheduled and the
wall times spread by up to 50x (benchmarks/RESULTS-spectrum-ww.md); for reproducible figures run it under
``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` (recorded in the output as ``threads_env``).

Usage: python benchmarks/bench_spectrum_ww.py CKPT_DIR [--repeat 1] [--workdir /tmp/bench_spectrum_ww]
       [--jsonl benchmarks/results/spectrum_ww.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WARM = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1] + "/model.safetensors", framework="pt") as f:
    for k in f.keys():
        f.get_tensor(k)
"""

WD_API = """
import json, sys, time
t0 = time.perf_counter()
import torch
from weightdiff.metrics.spectral import matrix_spectrum
from weightdiff.spectrum import spectrum
import_s = time.perf_counter() - t0
matrix_spectrum(torch.randn(64, 32), 8, False)  # warm-up: LAPACK/MKL one-time set-up is not timed
t, c = time.perf_counter(), time.process_time()
rep = spectrum(sys.argv[1], output=sys.argv[2], full=True)
print(json.dumps({"work_s": time.perf_counter() - t, "work_cpu_s": time.process_time() - c,
                  "import_s": import_s, "matrices": len(rep.rows)}))
"""

WW = """
import json, logging, sys, time, warnings
t0 = time.perf_counter()
import numpy as np
import weightwatcher as ww
from weightwatcher.RMT_Util import svd_vals
from weightwatcher.weightwatcher import WeightWatcher
import_s = time.perf_counter() - t0
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
svd_vals(np.random.default_rng(0).standard_normal((64, 32)))  # warm-up, as for weightdiff
evals, spent = {}, {"esd_s": 0.0, "powerlaw_s": 0.0}
orig_esd, orig_pl = WeightWatcher.apply_esd, WeightWatcher.apply_powerlaw
def apply_esd(self, layer, params=None):
    t = time.perf_counter(); out = orig_esd(self, layer, params); spent["esd_s"] += time.perf_counter() - t
    evals[layer.longname or layer.name] = layer.evals
    return out
def apply_powerlaw(self, layer, params=None):
    t = time.perf_counter(); out = orig_pl(self, layer, params); spent["powerlaw_s"] += time.perf_counter() - t
    return out
WeightWatcher.apply_esd, WeightWatcher.apply_powerlaw = apply_esd, apply_powerlaw
t, c = time.perf_counter(), time.process_time()
details = ww.WeightWatcher().analyze(model=sys.argv[1])
work_s, work_cpu_s = time.perf_counter() - t, time.process_time() - c
details.to_pickle(sys.argv[2] + ".details.pkl")  # exact floats (to_json keeps 10 digits)
np.savez(sys.argv[2] + ".evals.npz", **{k: np.asarray(v, dtype=np.float64) for k, v in evals.items()})
print(json.dumps({"work_s": work_s, "work_cpu_s": work_cpu_s, "import_s": import_s, "matrices": len(details),
                  **spent, "ww_version": ww.__version__}))
"""


def run_measured(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one child; wall time from the parent (interpreter start-up included), its own CPU time and peak RSS
    from wait4. Output goes to files, not pipes: a chatty child (WeightWatcher logs) would otherwise block on a
    full pipe while the parent waits."""
    with open(log, "w") as out_fh, open(str(log) + ".err", "w") as err_fh:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = Path(str(log) + ".err").read_text()
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {err[-3000:]}")
    result: dict[str, Any] = {
        "process_wall_s": wall,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }
    for line in log.read_text().splitlines()[::-1]:
        if line.startswith("{"):
            result.update(json.loads(line))
            break
    return result


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scipy
    import torch

    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "loadavg_start": os.getloadavg(),
        # Inherited by every child: thread counts decide how badly a shared machine hurts each side.
        "threads_env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0


def agreement(wd_parquet: Path, ww_prefix: Path, topk: int = 64) -> dict[str, Any]:
    """Per-matrix agreement after converting WW's sigma^2 quantities to weightdiff's definitions."""
    import numpy as np
    import pandas as pd

    wd = pd.read_parquet(wd_parquet).set_index("name")
    details = pd.read_pickle(str(ww_prefix) + ".details.pkl")  # written by our own ww child
    evals = dict(np.load(str(ww_prefix) + ".evals.npz"))
    # WW names a layer by its state-dict key without ".weight" (longname == name for safetensors input).
    details["wd_name"] = [n + ".weight" for n in details["name"]]
    ww_rows = details.set_index("wd_name")
    both = [n for n in wd.index if n in ww_rows.index]
    worst: dict[str, tuple[float, str]] = {}

    def note(key: str, value: float, name: str) -> None:
        if key not in worst or value > worst[key][0]:
            worst[key] = (value, name)

    for name in both:
        w, r = wd.loc[name], ww_rows.loc[name]
        s_wd = np.asarray(w["singular_values"], dtype=np.float64)
        ev = evals[name[: -len(".weight")]]
        s_ww = np.sqrt(np.clip(np.sort(ev)[::-1], 0, None))
        n = min(len(s_wd), len(s_ww))
        note("count_mismatch", float(len(s_wd) != len(s_ww)), name)
        note("sigma1_vs_sv_max", rel(w["spectral_norm"], r["sv_max"]), name)
        note("sigma1_vs_sqrt_spectral_norm", rel(w["spectral_norm"], math.sqrt(r["spectral_norm"])), name)
        note("fro2_vs_norm", rel(w["frobenius_norm"] ** 2, r["norm"]), name)
        note("stable_rank", rel(w["stable_rank"], r["stable_rank"]), name)
        k = min(topk, n)
        top = np.abs(s_wd[:k] - s_ww[:k]) / s_ww[:k]
        note(f"top{topk}_sv_max_rel", float(top.max()), name)
        note("all_sv_max_abs_over_sigma1", float(np.abs(s_wd[:n] - s_ww[:n]).max() / s_ww[0]), name)
        # Tail values (bottom half), relative to themselves: the Gram route's weak spot (abs. error ~
        # sqrt(eps) * sigma_1), reported so that nobody reads the other figures as covering the whole spectrum.
        tail = slice(n // 2, n)
        note("bottom_half_sv_max_rel", float((np.abs(s_wd[tail] - s_ww[tail]) / s_ww[tail]).max()), name)
    return {
        "matrices_weightdiff": len(wd),
        "matrices_weightwatcher": len(details),
        "matrices_compared": len(both),
        "only_weightdiff": sorted(set(wd.index) - set(ww_rows.index))[:10],
        "only_weightwatcher": sorted(set(ww_rows.index) - set(wd.index))[:10],
        "max_rel_diff": {k: v[0] for k, v in worst.items() if k != "count_mismatch"},
        "worst_matrix": {k: v[1] for k, v in worst.items() if k != "count_mismatch"},
        "sv_count_mismatches": int(worst.get("count_mismatch", (0.0, ""))[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path, help="directory with model.safetensors (examples/smollm2/convert.py)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each round runs every contender once")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_spectrum_ww"))
    ap.add_argument("--jsonl", type=Path, help="also append the JSON lines to this file")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = str(args.ckpt)
    wd_exe = shutil.which("weightdiff")
    cli = [wd_exe] if wd_exe else [sys.executable, "-m", "weightdiff"]
    cli_parquet = args.workdir / "wd_cli.parquet"
    contenders = {
        "wd_cli": [*cli, "spectrum", ckpt, "-o", str(cli_parquet), "--full", "-q"],
        "wd_api": [sys.executable, "-c", WD_API, ckpt, str(args.workdir / "wd_api.parquet")],
        "ww": [sys.executable, "-c", WW, ckpt, str(args.workdir / "ww")],
    }
    lines: list[dict[str, Any]] = [{"machine": machine(), "checkpoint": ckpt, "repeat": args.repeat}]
    run_measured([sys.executable, "-c", WARM, ckpt], args.workdir / "warm.log")  # page cache warm for all
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
    for i in range(args.repeat):
        # Alternate the order between rounds so that drifting background load does not favour one side.
        order = list(contenders) if i % 2 == 0 else list(contenders)[::-1]
        for name in order:
            if name.startswith("wd_"):  # weightdiff refuses to overwrite a report; each side owns one file
                (args.workdir / f"{name}.parquet").unlink(missing_ok=True)
            # The 1-minute load average before each run: on a shared machine it explains most of the spread.
            load1 = os.getloadavg()[0]
            r = run_measured(contenders[name], args.workdir / f"{name}.log")
            r["loadavg1_before"] = load1
            results[name].append(r)
            print(json.dumps({"round": i, "contender": name, **r}), file=sys.stderr)
    for name, rs in results.items():
        best = min(rs, key=lambda r: r.get("work_s", r["process_wall_s"]))
        lines.append(
            {
                "contender": name,
                "command": " ".join(
                    [*contenders[name][:2], "<snippet>"] if name != "wd_cli" else contenders[name]
                ),
                "rounds": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rs],
                "best": {k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()},
            }
        )
    best = {ln["contender"]: ln["best"] for ln in lines[1:]}
    lines.append(
        {
            "ratio": "weightwatcher / weightdiff (best rounds; >1 means weightdiff is faster)",
            "ww_work_over_wd_api_work": round(best["ww"]["work_s"] / best["wd_api"]["work_s"], 2),
            "ww_work_cpu_over_wd_api_work_cpu": round(
                best["ww"]["work_cpu_s"] / best["wd_api"]["work_cpu_s"], 2
            ),
            "ww_esd_only_over_wd_api_work": round(best["ww"]["esd_s"] / best["wd_api"]["work_s"], 2),
            "ww_process_over_wd_cli_process": round(
                best["ww"]["process_wall_s"] / best["wd_cli"]["process_wall_s"], 2
            ),
            "ww_peak_rss_over_wd_cli_peak_rss": round(
                best["ww"]["peak_rss_mb"] / best["wd_cli"]["peak_rss_mb"], 2
            ),
        }
    )
    lines.append(
        {
            "agreement": agreement(
                cli_parquet if cli_parquet.exists() else args.workdir / "wd_api.parquet", args.workdir / "ww"
            )
        }
    )
    lines.append({"loadavg_end": os.getloadavg()})
    text = "\n".join(json.dumps(ln) for ln in lines)
    print(text)
    if args.jsonl:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with args.jsonl.open("a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
