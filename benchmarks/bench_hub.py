"""Hub source on loopback: ``weightdiff compare`` of a pair served by the test suite's fake Hub, against the
local compare of the same files, in the same run.

The fake Hub (tests/hub_server.py) runs in its own process, so the server's Python does not compete with the
compare for the interpreter lock. Each contender is a fresh ``python -m weightdiff compare --no-spectral``
process (element-wise only: the least compute to hide the transfer behind, the hardest case), or with
``--all-metrics`` a plain ``weightdiff compare`` (every metric, the command's default); the best of
``--repeat`` runs is kept, with its CPU time and the server's CPU time during it (the server shares the
machine's cores with the compare). Prints JSON lines. Usage:
    python benchmarks/bench_hub.py BASE_DIR TUNED_DIR [--repeat 2] [--all-metrics]
(for example the pair written by ``python benchmarks/synth.py /tmp/x --size-gb 0.5``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.hub_server import FakeHub, files_from_dir
hub = FakeHub().start()
hub.add_commit("bench/base", files_from_dir(Path(sys.argv[2])))
hub.add_commit("bench/tuned", files_from_dir(Path(sys.argv[3])))
print(hub.endpoint, flush=True)
time.sleep(3600)
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], server: int) -> tuple[float, float, float]:
    """Wall seconds of ``cmd``, its CPU seconds, and the server's CPU seconds meanwhile."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    served = cpu_seconds(server)
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{cmd[3:6]} failed: {res.stderr[-1500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, cpu_seconds(server) - served


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("tuned", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--all-metrics", action="store_true", help="every metric (compare's default)")
    args = ap.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(ROOT), str(args.base), str(args.tuned)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        endpoint = server.stdout.readline().strip()
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(Path("/tmp") / "wd-bench-hf"),
            "HF_TOKEN": "",
        }
        base = [sys.executable, "-m", "weightdiff", "compare", "-q"]
        if not args.all_metrics:
            base.append("--no-spectral")
        size = sum(p.stat().st_size for d in (args.base, args.tuned) for p in d.rglob("*.safetensors"))
        inf = (float("inf"), 0.0, 0.0)
        best = {"local": inf, "hub": inf}
        for _ in range(args.repeat):
            best["local"] = min(
                best["local"], timed([*base, str(args.base), str(args.tuned)], env, server.pid)
            )
            best["hub"] = min(best["hub"], timed([*base, "bench/base", "bench/tuned"], env, server.pid))
        print(
            json.dumps(
                {
                    "pair_gb": round(size / 1e9, 3),
                    "metrics": "all" if args.all_metrics else "element-wise",
                    "repeat": args.repeat,
                    "local_s": round(best["local"][0], 2),
                    "hub_s": round(best["hub"][0], 2),
                    "hub_over_local": round(best["hub"][0] / best["local"][0], 2),
                    # CPU seconds of the best runs: the compare process, and the server while it ran. On a
                    # machine where both share the cores, their sum bounds how fast a loopback run can be.
                    "local_cpu_s": round(best["local"][1], 2),
                    "hub_cpu_s": round(best["hub"][1], 2),
                    "hub_server_cpu_s": round(best["hub"][2], 2),
                    "cores": os.cpu_count(),
                }
            )
        )
    finally:
        server.kill()


if __name__ == "__main__":
    main()
