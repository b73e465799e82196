"""Wall time of ``weightdiff compare`` as 1 process and as N torchrun processes on the CPU (docs/scaling.md).

Runs every configuration as a fresh command, as a user would, so start-up (importing torch, joining the process
group) is included. Configurations: one process with the default thread count, one process with one thread,
and N ranks under ``python -m torch.distributed.run`` (which gives each rank OMP_NUM_THREADS=1 unless told
otherwise). Checks that the N-rank report equals the one-thread report (metadata apart from "created").
Prints one JSON line per run. Usage:

    python benchmarks/synth.py /tmp/x --size-gb 0.5
    python benchmarks/bench_distributed.py /tmp/x --procs 2 [--spectral --include 'model.layers.0.*']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def same(a: Path, b: Path) -> bool:
    import pandas as pd
    import pyarrow.parquet as pq

    if not pd.read_parquet(a).equals(pd.read_parquet(b)):
        return False
    meta = [dict(pq.read_schema(p).metadata or {}) for p in (a, b)]
    for m in meta:
        m.pop(b"weightdiff.created", None)
    return meta[0] == meta[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("pair", type=Path, help="directory holding base/ and tuned/ (benchmarks/synth.py)")
    ap.add_argument("--procs", type=int, nargs="+", default=[2])
    ap.add_argument("--spectral", action="store_true", help="also compute the spectral metrics")
    ap.add_argument("--include", action="append", default=[])
    args = ap.parse_args()
    base, tuned = str(args.pair / "base"), str(args.pair / "tuned")
    extra = [] if args.spectral else ["--no-spectral"]
    for glob in args.include:
        extra += ["--include", glob]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE", "RANK")}
    cwd = args.pair
    compare = [sys.executable, "-m", "weightdiff", "compare", base, tuned, "-q", *extra, "-o"]
    startup = run([sys.executable, "-m", "weightdiff", "--version"], env, cwd)
    print(json.dumps({"run": "startup (weightdiff --version)", "wall_s": round(startup, 2)}), flush=True)
    results = {}
    for label, threads in (("1 process, default threads", None), ("1 process, 1 thread", "1")):
        e = dict(env, **({"OMP_NUM_THREADS": threads} if threads else {}))
        out = f"bench_1_{threads or 'default'}.parquet"
        results[label] = run([*compare, out], e, cwd)
        print(json.dumps({"run": label, "wall_s": round(results[label], 2), **vars_(args)}), flush=True)
    for n in args.procs:
        out = f"bench_{n}.parquet"
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
        launch += ["--master-port", str(29600 + n), "-m", "weightdiff", *compare[3:], out]
        wall = run(launch, dict(env, OMP_NUM_THREADS="1"), cwd)
        identical = same(cwd / "bench_1_1.parquet", cwd / out)
        print(
            json.dumps(
                {
                    "run": f"{n} ranks (torchrun, 1 thread each)",
                    "wall_s": round(wall, 2),
                    "speedup_vs_1_thread": round(results["1 process, 1 thread"] / wall, 2),
                    "speedup_vs_default_threads": round(results["1 process, default threads"] / wall, 2),
                    "identical_to_1_thread": identical,
                    **vars_(args),
                }
            ),
            flush=True,
        )


def vars_(args: argparse.Namespace) -> dict[str, object]:
    return {"spectral": args.spectral, "include": args.include, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
