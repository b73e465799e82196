"""Scenario 2 (spectral pass): weightdiff's default solver against the naive way, with its accuracy.

For matrices of real LLM shapes (4096x4096, 1536x8960, 4096x12288) this builds a base matrix with a trained-
weight-like spectrum (a decaying low-rank part over a noise bulk) and a near-identical tuned matrix (a small
update, as RL fine-tuning makes), then measures in the same run:
- naive: full float32 ``torch.linalg.svd`` of base and tuned (what a simple script does);
- weightdiff: ``spectral_metrics`` with ``--svd auto`` (the default) and with ``exact``;
- the accuracy of each against a float64 numpy SVD + ``scipy.linalg.subspace_angles`` reference.
Prints JSON lines. Usage: python benchmarks/bench_spectral.py [--shapes 4096x4096,1536x8960] [--skip-exact]
[--reference-cache DIR] (the float64 reference takes minutes on the larger shapes; a cache keeps it between
runs, keyed by shape: the matrices come from a fixed seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import reference
from weightdiff.metrics.spectral import SpectralOptions, spectral_metrics

ANGLES = ("angle_u_max_deg", "angle_u_mean_deg", "angle_v_max_deg", "angle_v_mean_deg")


def make_pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = 256
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = 3.0 * torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    W0 = (U * s) @ V.T + 0.02 * torch.randn(m, n, generator=g) / math.sqrt(max(m, n)) * 10
    W1 = W0 + 2e-4 * torch.randn(m, n, generator=g) * W0.abs().mean()
    # bf16, as checkpoints store them (weightdiff receives the stored tensors; the naive SVD and the reference
    # take float32 copies, the same values).
    return W0.to(torch.bfloat16), W1.to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,1536x8960,4096x12288")
    ap.add_argument("--skip-exact", action="store_true", help="skip weightdiff's exact mode (slow on CPU)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="best of N runs, for the naive SVD and weightdiff alike"
    )
    ap.add_argument(
        "--reference-cache", type=Path, help="directory keeping the float64 references between runs"
    )
    args = ap.parse_args()
    print(
        json.dumps(
            {
                "machine": f"{platform.node()} {os.cpu_count()} cpus",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        B0, B1 = make_pair(m, n)
        W0, W1 = B0.float(), B1.float()
        naive = math.inf
        for _ in range(args.repeat):
            t = time.perf_counter()
            torch.linalg.svd(W0, full_matrices=False)
            torch.linalg.svd(W1, full_matrices=False)
            naive = min(naive, time.perf_counter() - t)
        t = time.perf_counter()
        cached = args.reference_cache / f"ref_{shape}.pkl" if args.reference_cache else None
        if cached is not None and cached.exists():
            with cached.open("rb") as fh:
                ref = pickle.load(fh)
        else:
            ref = reference.spectral(W0.double().numpy(), W1.double().numpy())
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                with cached.open("wb") as fh:
                    pickle.dump(ref, fh)
        ref_s = time.perf_counter() - t
        s_ref = torch.tensor(ref["sv_base"][:64], dtype=torch.float64)
        modes = ["auto"] + ([] if args.skip_exact else ["exact"])
        for mode in modes:
            secs = math.inf
            for _ in range(args.repeat):
                t = time.perf_counter()
                result = spectral_metrics(B0, B1, SpectralOptions(solver=mode, rank=64))
                secs = min(secs, time.perf_counter() - t)
            got = result.columns
            sv_got = torch.tensor(result.vectors["sv_base"][:64], dtype=torch.float64)
            sv_err = float(((sv_got - s_ref).abs() / s_ref).max())
            ang_err = {c: abs(got[c] - ref[c]) for c in ANGLES}
            ang_ok = all(abs(got[c] - ref[c]) <= 0.01 + 0.02 * abs(ref[c]) for c in ANGLES)
            ov_err = max(abs(got[c] - ref[c]) for c in ("principal_overlap", "lowmag_overlap"))
            print(
                json.dumps(
                    {
                        "shape": shape,
                        "mode": mode,
                        "solver": got["svd_solver"],
                        "seconds": round(secs, 3),
                        "naive_f32_svd_pair_seconds": round(naive, 3),
                        "speedup_vs_naive": round(naive / secs, 2),
                        "repeat": args.repeat,
                        "reference_f64_seconds": round(ref_s, 1),
                        "angle_abs_err_deg": ang_err,
                        "angles_within_tolerance": ang_ok,
                        "ref_angle_u_max_deg": ref["angle_u_max_deg"],
                        "sv_drift_topk_rel_err": abs(got["sv_drift_topk"] - ref["sv_drift_topk"])
                        / ref["sv_drift_topk"],
                        "sigma1_rel_err": abs(got["sigma1_rel_change"] - ref["sigma1_rel_change"])
                        / max(abs(ref["sigma1_rel_change"]), 1e-30),
                        "overlap_abs_err": ov_err,
                        "topk_singular_values_max_rel_err": sv_err,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
