"""All GPU figures in one run: CPU/GPU agreement, then a Qwen3-8B-shaped bf16 pair (a slice of its layers plus
the full embedding and LM head) generated on the device and compared element-wise and with all metrics.

Prints JSON lines and writes them to $OUT/gpu_results.jsonl when OUT is set. Usage (on a CUDA machine):
    PYTHONPATH=. python benchmarks/gpu_bench.py --layers 4 --dir /tmp/wdbench
With --smoke it runs a tiny configuration on whatever device exists (for testing the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synth import write_pair

from weightdiff import compare
from weightdiff.metrics.elementwise import elementwise_metrics
from weightdiff.metrics.spectral import SpectralOptions, spectral_metrics

RESULTS: list[dict] = []


def emit(**kw: object) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "gpu_results.jsonl", "a") as fh:
            fh.write(json.dumps(kw) + "\n")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def agreement(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 2000, generator=g) * 0.02
    b = a + (torch.rand(a.shape, generator=g) < 0.4) * torch.randn(a.shape, generator=g) * 1e-4
    a[0, 0] = float("nan")
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x, y = a.to(dtype), b.to(dtype)
        cpu = elementwise_metrics(x, y, use_kernel=False)
        gpu = elementwise_metrics(x.to(device), y.to(device))
        same = all(
            cpu[k] == gpu[k]
            for k in ("changed_exact", "changed_bf16", "changed_atol", "ulp_hist", "nonfinite_base")
        )
        rel = max(abs(cpu[k] - gpu[k]) / abs(cpu[k]) for k in ("delta_fro", "base_fro", "cosine"))
        emit(check="elementwise_cpu_vs_gpu", dtype=str(dtype), counts_identical=same, max_rel_norm_diff=rel)
    W0 = (
        torch.randn(1024, 768, generator=g, dtype=torch.float64)
        * torch.logspace(0, -1, 768, dtype=torch.float64)
    ).float()
    W1 = W0 + 1e-4 * torch.randn(W0.shape, generator=g)
    ref = spectral_metrics(W0.double(), W1.double(), SpectralOptions(solver="exact")).columns
    for solver in ("gram", "exact"):
        sync()
        t = time.perf_counter()
        got = spectral_metrics(W0.to(device), W1.to(device), SpectralOptions(solver=solver)).columns
        sync()
        errs = {
            c: abs(got[c] - ref[c])
            for c in ("angle_u_max_deg", "angle_v_max_deg", "angle_u_mean_deg", "principal_overlap")
        }
        emit(
            check="spectral_gpu_vs_cpu_float64",
            solver=solver,
            seconds=time.perf_counter() - t,
            abs_err=errs,
            sv_drift_rel_err=abs(got["sv_drift"] - ref["sv_drift"]) / ref["sv_drift"],
        )


def timed_compare(base: Path, tuned: Path, device: str, spectral: bool) -> dict:
    sync()
    t = time.perf_counter()
    stamps: list[tuple[str, float]] = []
    report = compare(
        str(base),
        str(tuned),
        device=device,
        spectral=spectral,
        on_progress=lambda pair: stamps.append((pair.name, time.perf_counter())),
    )
    sync()
    wall = time.perf_counter() - t
    tm = report.timings
    # Seconds spent per tensor (between consecutive completions): separates the repeated layers from the
    # embedding and LM head, so the full 36-layer figure can be extrapolated from a slice.
    prev = t
    in_layers = outside = 0.0
    for name, stamp in stamps:
        if ".layers." in name:
            in_layers += stamp - prev
        else:
            outside += stamp - prev
        prev = stamp
    return {
        "wall_s": wall,
        "read_wait_s": tm.read_wait,
        "reader_busy_s": tm.reader_busy,
        "transfer_s": tm.transfer,
        "compute_s": tm.compute,
        "rows": report.table.num_rows,
        "layer_tensors_s": in_layers,
        "other_tensors_s": outside,
        "per_tensor": report.rows,
    }


def read_only(base: Path, tuned: Path, device: str | None = None) -> float:
    """Read every tensor of both files (touching every page), and optionally copy it to ``device``."""
    from safetensors import safe_open

    t = time.perf_counter()
    for p in (base, tuned):
        with safe_open(str(p / "model.safetensors"), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                x = f.get_tensor(k)
                if device is not None and device != "cpu":
                    x.to(device, non_blocking=False)
                else:
                    x.reshape(-1).view(torch.uint8)[::4096].sum()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wdbench"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emit(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__)
    agreement(device)
    preset = "small" if args.smoke else "qwen3-8b"
    t = time.perf_counter()
    base, tuned = write_pair(args.dir, preset=preset, layers=args.layers, device=device)
    size = (base / "model.safetensors").stat().st_size
    emit(
        step="generate",
        preset=preset,
        layers=args.layers,
        bytes_per_checkpoint=size,
        seconds=time.perf_counter() - t,
    )
    read_only(base, tuned)  # warm the page cache
    emit(step="read_only", seconds=read_only(base, tuned))
    emit(step="read_and_copy_to_device", seconds=read_only(base, tuned, device))
    ew = timed_compare(base, tuned, device, spectral=False)
    emit(step="compare_elementwise", **{k: v for k, v in ew.items() if k != "per_tensor"})
    full = timed_compare(base, tuned, device, spectral=True)
    per = full.pop("per_tensor")
    emit(step="compare_all_metrics", **full)
    layer_names = [r["name"] for r in per if r["layer"] is not None]
    emit(
        step="solvers_used",
        solvers=sorted({str(r["svd_solver"]) for r in per}),
        layer_tensors=len(layer_names),
    )


if __name__ == "__main__":
    main()
