"""Scenario 2 on a whole checkpoint pair: ``weightdiff compare`` with every metric against the naive way.

Naive: load both state dicts whole with ``safetensors.torch.load_file``, then per tensor count the changed
elements and the float64 update norm, and for every matrix take the full float32 ``torch.linalg.svd`` of base
and tuned (what a simple script needs to get singular values and vectors). weightdiff: ``weightdiff compare
BASE TUNED -o report.parquet`` with its defaults (all element-wise and spectral columns, ``--svd auto``). Each
runs in its own process, page cache warm; prints JSON lines with wall times, peak RSS and the ratio.

The pair comes from ``synth.py --spectrum trained`` (matrices with a trained weight's power-law spectrum; on
pure noise an iterative solver needs about twice the steps, and trained weights are not noise). By default it is scenario 1's
pair (bench_elementwise.py with the same DIR writes the same one: the ``small`` preset, 19 layers, 1.98 GB
per checkpoint; the naive side takes about 7 minutes on 2 cores); ``--layers 1`` is a quick check dominated
by the embedding and LM head. A pair already in
DIR is used as it is (``.bench/s1``, a pure-noise pair from ``bench_elementwise.py --spectrum noise``). Usage:
    python benchmarks/bench_allmetrics.py DIR [--layers 19] [--preset small|qwen3-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_elementwise import run  # the same subprocess timing and ru_maxrss
from synth import ensure_pair

NAIVE = """
import sys, time, json, torch
from safetensors.torch import load_file
t = time.perf_counter()
a = load_file(sys.argv[1] + "/model.safetensors"); b = load_file(sys.argv[2] + "/model.safetensors")
changed = 0; fro = 0.0; svds = 0
for k in a:
    changed += int((a[k] != b[k]).sum())
    fro += float(((b[k].double() - a[k].double()) ** 2).sum())
    if a[k].dim() == 2:
        torch.linalg.svd(a[k].float(), full_matrices=False)
        torch.linalg.svd(b[k].float(), full_matrices=False)
        svds += 2
print(json.dumps({"work_s": time.perf_counter() - t, "changed": changed, "svds": svds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=19)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    base, tuned = ensure_pair(
        args.dir, "--layers", str(args.layers), "--preset", args.preset, "--spectrum", "trained"
    )
    report = args.dir / "report.parquet"
    wd = [
        sys.executable,
        "-m",
        "weightdiff",
        "compare",
        str(base),
        str(tuned),
        "-q",
        "-o",
        str(report),
        "--device",
        "cpu",
        "--verbose",
    ]
    naive = [sys.executable, "-c", NAIVE, str(base), str(tuned)]
    run(
        [
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'rb').read(); open(sys.argv[2], 'rb').read()",
            str(base / "model.safetensors"),
            str(tuned / "model.safetensors"),
        ]
    )  # warm the page cache
    results = {"naive": run(naive), "weightdiff": run(wd)}
    size = sum((p / "model.safetensors").stat().st_size for p in (base, tuned)) / 1e9
    print(
        json.dumps(
            {
                "machine": f"{platform.node()} {os.cpu_count()} cpus",
                "pair_gb": round(size, 3),
                "layers": args.layers,
            }
        )
    )
    for name, r in results.items():
        print(
            json.dumps(
                {"contender": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}
            )
        )
    w, n = results["weightdiff"], results["naive"]
    print(
        json.dumps(
            {
                "naive_over_weightdiff_wall": round(n["wall_s"] / w["wall_s"], 2),
                "weightdiff_vs_naive_peak_rss": round(w["peak_rss_mb"] / n["peak_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
