"""All GPU figures in one run: CPU/GPU agreement, timings of the dense kernels the spectral metrics rest on,
then a Qwen3-8B-shaped bf16 pair (all 36 layers unless --layers says otherwise, plus the embedding and LM
head) generated on the device and compared element-wise and with all metrics, against reading the files.

Prints JSON lines and writes them to $OUT/gpu_results.jsonl when OUT is set. Usage (on a CUDA machine):
    PYTHONPATH=. python benchmarks/gpu_bench.py --dir /dev/shm/wdbench
With --smoke it runs a tiny configuration on whatever device exists (for testing the script on a CPU).
The all-metrics compare stops at --deadline seconds and reports how far it got and the extrapolated total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synth import SHAPES, layer_shapes, write_pair

from weightdiff import compare
from weightdiff.metrics import spectral
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


def timed(fn, repeat: int = 2) -> float:
    """Best of ``repeat`` timed calls after one warm-up, synchronised."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def kernels(device: str, smoke: bool) -> None:
    """The dense kernels behind the spectral metrics, one at a time, at the sizes of the model."""
    n = 256 if smoke else 4096
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(3 * n, n, generator=g) * 0.02).to(device)
    D = (W * (torch.rand(W.shape, generator=g).to(device) < 0.5) * 0.01).double()
    G = (W.double().T @ W.double()).contiguous()
    GD = D.T @ D
    small = G[: n // 4, : n // 4].contiguous()
    out = {
        "n": n,
        "gram_matmul_f64_3n_x_n": timed(lambda: W.double().T @ W.double()),
        "eigh_f64": timed(lambda: torch.linalg.eigh(G)),
        "eigvalsh_f64": timed(lambda: torch.linalg.eigvalsh(G)),
        "eigh_f64_quarter": timed(lambda: torch.linalg.eigh(small)),
        "lanczos_top_eigenvalue": timed(lambda: spectral.top_eigenvalue(GD)),
        "eigvalsh_update_gram": timed(lambda: torch.linalg.eigvalsh(GD)),
    }
    lam = spectral.top_eigenvalue(GD)
    out["lanczos_rel_err"] = abs(lam - float(torch.linalg.eigvalsh(GD)[-1])) / lam
    if device == "cuda":
        G2 = G + torch.eye(n, dtype=G.dtype, device=device) * 1e-3

        def two_streams() -> None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())

            def other() -> None:
                with torch.cuda.stream(side):
                    torch.linalg.eigh(G2)
                side.synchronize()

            th = threading.Thread(target=other)
            th.start()
            torch.linalg.eigh(G)
            th.join()

        out["eigh_f64_two_sequential"] = timed(lambda: (torch.linalg.eigh(G), torch.linalg.eigh(G2)))
        out["eigh_f64_two_streams"] = timed(two_streams)
        out["linalg_library"] = str(torch.backends.cuda.preferred_linalg_library())
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            out["eigh_f64_magma"] = timed(lambda: torch.linalg.eigh(G))
        except Exception as exc:  # not built with MAGMA, or its eigh path removed
            out["eigh_f64_magma"] = f"unavailable: {exc}"[:200]
        finally:
            torch.backends.cuda.preferred_linalg_library("default")
    x = torch.randn(3 * n * n, generator=g, dtype=torch.float64).abs().to(device)
    pos = x.numel() // 2
    out["order_stat_numel"] = x.numel()
    out["kthvalue"] = timed(lambda: torch.kthvalue(x, pos), repeat=1)
    out["radix_select"] = timed(lambda: spectral.radix_kth_smallest(x, pos))
    out["radix_equals_kthvalue"] = spectral.radix_kth_smallest(x, pos) == float(torch.kthvalue(x, pos).values)
    a = W.to(torch.bfloat16)
    b = (W * (1 + (torch.rand(W.shape, generator=g).to(device) < 0.5) * 0.01)).to(torch.bfloat16)
    out["spectral_metrics_3n_x_n_bf16"] = timed(lambda: spectral_metrics(a, b, SpectralOptions()), repeat=1)
    emit(step="kernels", **out)


class Deadline(Exception):
    pass


def agreement_full(device: str) -> None:
    """One bf16 pair wide enough for every device-specific path (Lanczos, radix select), all metrics on the
    device against the same function on the CPU."""
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(1500, 700, generator=g) * 0.02
    W1 = W0 * (1 + (torch.rand(W0.shape, generator=g) < 0.5) * 0.01)
    a, b = W0.to(torch.bfloat16), W1.to(torch.bfloat16)
    opts = SpectralOptions(solver="gram")
    cpu = spectral_metrics(a, b, opts).columns
    dev = spectral_metrics(a.to(device), b.to(device), opts).columns
    diffs = {
        c: abs(cpu[c] - dev[c]) / max(abs(cpu[c]), 1e-300)
        for c in cpu
        if isinstance(cpu[c], float) and isinstance(dev[c], float)
    }
    emit(check="all_metrics_gram_cpu_vs_device", max_rel_diff=max(diffs.values()), per_column=diffs)


def timed_compare(
    base: Path, tuned: Path, device: str, spectral_on: bool, deadline: float | None = None
) -> dict:
    sync()
    t = time.perf_counter()
    stamps: list[tuple[str, float]] = []

    def progress(pair) -> None:
        stamps.append((pair.name, time.perf_counter()))
        if deadline is not None and time.perf_counter() - t > deadline:
            raise Deadline

    stopped = False
    try:
        report = compare(str(base), str(tuned), device=device, spectral=spectral_on, on_progress=progress)
    except Deadline:
        stopped, report = True, None
    sync()
    wall = time.perf_counter() - t
    # Seconds spent per tensor (between consecutive completions): separates the repeated layers from the
    # embedding and LM head.
    prev = t
    in_layers = outside = 0.0
    layers_done: set[str] = set()
    for name, stamp in stamps:
        if ".layers." in name:
            in_layers += stamp - prev
            layers_done.add(name.split(".layers.")[1].split(".")[0])
        else:
            outside += stamp - prev
        prev = stamp
    out: dict = {
        "wall_s": wall,
        "tensors_done": len(stamps),
        "stopped_at_deadline": stopped,
        "layer_tensors_s": in_layers,
        "other_tensors_s": outside,
        "layers_touched": len(layers_done),
    }
    if report is not None:
        tm = report.timings
        out.update(
            read_wait_s=tm.read_wait,
            reader_busy_s=tm.reader_busy,
            transfer_s=tm.transfer,
            compute_s=tm.compute,
            rows=report.table.num_rows,
            per_tensor=report.rows,
        )
    return out


def read_files(base: Path, tuned: Path) -> float:
    """Read every byte of both files into one reused buffer (what reading the checkpoints costs)."""
    buf = bytearray(256 << 20)
    view = memoryview(buf)
    t = time.perf_counter()
    for p in (base, tuned):
        with open(p / "model.safetensors", "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t


def read_to_device(base: Path, tuned: Path, device: str) -> float:
    """Every tensor of both files, from the memory map, copied to ``device`` one after the other."""
    from safetensors import safe_open

    t = time.perf_counter()
    for p in (base, tuned):
        with safe_open(str(p / "model.safetensors"), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open handles are not dicts
                x = f.get_tensor(k)
                x.to(device) if device != "cpu" else x.clone()
    sync()
    return time.perf_counter() - t


def pick_dir(requested: Path | None, need: int) -> Path:
    if requested is not None:
        return requested
    for root in ("/dev/shm", "/tmp"):
        if os.path.isdir(root) and shutil.disk_usage(root).free > need * 1.15:
            return Path(root) / "wdbench"
    raise SystemExit(f"no filesystem with {need / 1e9:.1f} GB free for the pair")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument(
        "--dir", type=Path, default=None, help="where to write the pair (default: /dev/shm or /tmp)"
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only-elementwise", action="store_true", help="skip the checks and the all-metrics run")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds the all-metrics compare may take")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emit(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__)
    t0 = time.perf_counter()
    if not args.only_elementwise:
        agreement(device)
        agreement_full(device)
        kernels(device, args.smoke)
        emit(step="checks_done", seconds=time.perf_counter() - t0)
    preset = "small" if args.smoke else "qwen3-8b"
    hidden, inter, qh, kvh, hd, vocab = SHAPES[preset]
    per_layer = sum(torch.Size(s).numel() for s in layer_shapes(hidden, inter, qh, kvh, hd).values())
    need = 2 * 2 * (args.layers * per_layer + 2 * vocab * hidden + hidden)
    where = pick_dir(args.dir, need)
    t = time.perf_counter()
    base, tuned = write_pair(where, preset=preset, layers=args.layers, device=device)
    size = (base / "model.safetensors").stat().st_size
    emit(
        step="generate",
        preset=preset,
        layers=args.layers,
        dir=str(where),
        bytes_per_checkpoint=size,
        seconds=time.perf_counter() - t,
    )
    read_files(base, tuned)  # the pages are resident either way (tmpfs or a warm page cache)
    emit(step="read_files", seconds=read_files(base, tuned), bytes=2 * size)
    emit(step="read_and_copy_to_device", seconds=read_to_device(base, tuned, device))
    ew = timed_compare(base, tuned, device, spectral_on=False)
    ew.pop("per_tensor", None)
    emit(step="compare_elementwise", **ew)
    emit(step="read_and_copy_to_device_again", seconds=read_to_device(base, tuned, device))
    if args.only_elementwise:
        ew = timed_compare(base, tuned, device, spectral_on=False)
        ew.pop("per_tensor", None)
        emit(step="compare_elementwise_again", **ew)
        return
    full = timed_compare(base, tuned, device, spectral_on=True, deadline=args.deadline)
    per = full.pop("per_tensor", None)
    emit(step="compare_all_metrics", **full)
    if per is not None:
        emit(
            step="solvers_used",
            solvers=sorted({str(r["svd_solver"]) for r in per}),
            layer_tensors=sum(1 for r in per if r["layer"] is not None),
        )


if __name__ == "__main__":
    main()
