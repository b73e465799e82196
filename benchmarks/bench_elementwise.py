"""Scenario 1: element-wise metrics on a synthetic LLM-shaped bf16 pair, against the naive way and the read floor.

Each contender runs in its own process, so that peak resident memory (ru_maxrss from wait4) is its own; the page
cache is warmed first, so every contender reads from memory. Contenders:
- read:       read every tensor of both files once through safetensors' ``safe_open`` as torch tensors (the
              read floor, as a PyTorch user reads a checkpoint: the torch import included);
- read_raw:   read both files' bytes into a reused 64 MiB buffer with plain Python file reads: no framework,
              no torch import, no tensor made (the lowest floor);
- naive:      load both state dicts whole with ``safetensors.torch.load_file`` and compare tensor by tensor
              (changed count and float64 update norm per tensor), as the simple scripts do;
- weightdiff: ``weightdiff compare BASE TUNED --no-spectral -o report.parquet``.
Prints one JSON line per contender and the ratios. The pair is the one scenario 2 (bench_allmetrics.py) uses
with the same DIR: 2 GB per checkpoint of the ``small`` preset is 19 layers, with trained-like spectra (the
element-wise pass does the same work on any values; ``--spectrum noise`` gives pure Gaussian noise). A pair
already in DIR is used as it is. Usage: python benchmarks/bench_elementwise.py DIR [--size-gb 2]
[--spectrum trained|noise]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from synth import ensure_pair

READ = """
import sys, time, json
from safetensors import safe_open
t = time.perf_counter(); n = 0
for path in sys.argv[1:3]:
    with safe_open(path + "/model.safetensors", framework="pt") as f:
        for k in f.keys():
            n += f.get_tensor(k).numel()
print(json.dumps({"work_s": time.perf_counter() - t, "elements": n}))
"""

READ_RAW = """
import sys, time, json
t = time.perf_counter(); n = 0; buf = memoryview(bytearray(64 << 20))
for path in sys.argv[1:3]:
    with open(path + "/model.safetensors", "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
print(json.dumps({"work_s": time.perf_counter() - t, "bytes": n}))
"""

NAIVE = """
import sys, time, json, torch
from safetensors.torch import load_file
t = time.perf_counter()
a = load_file(sys.argv[1] + "/model.safetensors"); b = load_file(sys.argv[2] + "/model.safetensors")
changed = 0; fro = 0.0
for k in a:
    changed += int((a[k] != b[k]).sum())
    fro += float(((b[k].double() - a[k].double()) ** 2).sum())
print(json.dumps({"work_s": time.perf_counter() - t, "changed": changed, "delta_fro2": fro}))
"""


def run(cmd: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed: {err[-2000:]}")
    result: dict = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    for line in out.splitlines()[::-1]:
        if line.startswith("{"):
            result.update(json.loads(line))
            break
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spectrum", choices=("trained", "noise"), default="trained")
    args = ap.parse_args()
    base, tuned = ensure_pair(args.dir, "--size-gb", str(args.size_gb), "--spectrum", args.spectrum)
    size = sum((p / "model.safetensors").stat().st_size for p in (base, tuned)) / 1e9
    report = args.dir / "report.parquet"
    contenders = {
        "read": [sys.executable, "-c", READ, str(base), str(tuned)],
        "read_raw": [sys.executable, "-c", READ_RAW, str(base), str(tuned)],
        "naive": [sys.executable, "-c", NAIVE, str(base), str(tuned)],
        "weightdiff": [
            sys.executable,
            "-m",
            "weightdiff",
            "compare",
            str(base),
            str(tuned),
            "--no-spectral",
            "-q",
            "-o",
            str(report),
            "--device",
            args.device,
            "--verbose",
        ],
    }
    run(contenders["read"])  # warm the page cache
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, cmd in contenders.items():
            r = run(cmd)
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = r
    info = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "pair_gb": round(size, 3),
        "repeat": args.repeat,
    }
    print(json.dumps(info))
    for name, r in best.items():
        print(
            json.dumps(
                {"contender": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}
            )
        )
    w, n, rd = best["weightdiff"], best["naive"], best["read"]
    print(
        json.dumps(
            {
                "weightdiff_vs_naive_wall": round(w["wall_s"] / n["wall_s"], 3),
                "weightdiff_vs_read_wall": round(w["wall_s"] / rd["wall_s"], 3),
                "weightdiff_vs_read_raw_wall": round(w["wall_s"] / best["read_raw"]["wall_s"], 3),
                "weightdiff_vs_naive_peak_rss": round(w["peak_rss_mb"] / n["peak_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
