"""The fused C element-wise kernel (``weightdiff/_kernels.c``) driven on raw host memory, without torch.

The kernel computes every section-1 total of metrics.md in one pass over two contiguous buffers of stored
floats (F64, F32, F16 or BF16, mixed pairs included) and releases the GIL, so worker threads run it on chunks
in parallel. This module splits a pair into chunks, runs them on a shared thread pool and turns the totals into
report columns (``finish``). It does no I/O and knows nothing of files or tensors: callers pass addresses of
memory they keep alive until the futures are done. Importing it never imports torch, which is what lets a
CPU-only element-wise compare start in a fraction of a second.

The torch path in ``elementwise.py`` computes the same numbers on any device; the kernel is an optional build.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

try:
    from weightdiff import _kernels  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: elementwise.py's torch path computes the same numbers
    _kernels = None

ULP_BUCKETS = ("1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65-128", ">=129")
DEFAULT_ATOL = 1e-5

#: safetensors dtype name -> the kernel's dtype code.
DTYPE_CODES = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}
ITEMSIZE = {0: 8, 1: 4, 2: 2, 3: 2}

# Elements per kernel call: large enough that call overhead vanishes (about 2 ms of work), small enough to
# split one tensor across the worker threads.
CHUNK = 1 << 22

_pool: ThreadPoolExecutor | None = None


def available() -> bool:
    """Whether the C kernel was built."""
    return _kernels is not None


def threads() -> int:
    """Worker threads: ``OMP_NUM_THREADS`` when set (as torch reads it), else the CPUs this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="weightdiff")
    return _pool


def submit(addr_a: int, code_a: int, addr_b: int, code_b: int, n: int, atol: float) -> list[Future[Any]]:
    """Start the kernel on ``n`` elements at the two addresses, chunk by chunk; ``collect`` the futures."""
    assert _kernels is not None, "the C kernel is not built"
    size_a, size_b = ITEMSIZE[code_a], ITEMSIZE[code_b]
    run = _kernels.elementwise
    ex = pool()
    if n == 0:
        return [ex.submit(run, addr_a, code_a, addr_b, code_b, 0, atol)]
    return [
        ex.submit(run, addr_a + s * size_a, code_a, addr_b + s * size_b, code_b, min(CHUNK, n - s), atol)
        for s in range(0, n, CHUNK)
    ]


def drain(futures: Sequence[Future[Any]]) -> None:
    """Cancel what has not started and wait for what has: afterwards no chunk reads the pair's memory."""
    for fut in futures:
        fut.cancel()
    wait(futures)


def collect(futures: Sequence[Future[Any]], n: int) -> dict[str, object]:
    """Wait for one pair's chunks and return its report columns.

    On any exception while waiting (Ctrl-C included) the pair's chunks are drained before it propagates, so
    the caller may free the memory they read as soon as this returns or raises."""
    try:
        results = [fut.result() for fut in futures]
    except BaseException:
        drain(futures)
        raise
    counts = [0] * 5
    hist = [0] * len(ULP_BUCKETS)
    sums = [0.0] * 5
    delta_max = -1.0
    for ce, cb, ca, nfa, nfb, h, *rest in results:
        # The kernel returns (exact, bf16, atol, nonfinite_a, nonfinite_b); finish() wants atol last.
        for i, v in enumerate((ce, cb, nfa, nfb, ca)):
            counts[i] += v
        for i, v in enumerate(h):
            hist[i] += v
        for i in range(5):
            sums[i] += rest[i]
        delta_max = max(delta_max, rest[5])
    return finish(n, counts, hist, sums, delta_max)


def finish(
    n: int, counts: list[int], ulp_hist: list[int], sums: list[float], delta_max: float
) -> dict[str, object]:
    """Turn raw totals into report columns.

    ``counts`` = [changed_exact, changed_bf16, nonfinite_base, nonfinite_tuned, changed_atol];
    ``sums`` = float64 [sum W0^2 (finite W0), sum dW^2, <W0, W+>, sum W0^2, sum W+^2 (the last three over
    entries finite in both)]; ``delta_max`` is negative or NaN when no entry is finite in both.
    """
    changed_exact, changed_bf16, nonfinite_base, nonfinite_tuned, changed_atol = counts
    base2, delta2, dot, nx2, ny2 = sums
    base_fro, delta_fro = math.sqrt(base2), math.sqrt(delta2)
    cos_den = math.sqrt(nx2) * math.sqrt(ny2)
    return {
        "numel": n,
        "changed_exact": changed_exact,
        "changed_bf16": changed_bf16,
        "changed_atol": changed_atol,
        "sparsity_exact": 1 - changed_exact / n if n else None,
        "sparsity_bf16": 1 - changed_bf16 / n if n else None,
        "sparsity_atol": 1 - changed_atol / n if n else None,
        "hidden_by_bf16": changed_exact - changed_bf16,
        "ulp_hist": [int(v) for v in ulp_hist],
        "delta_fro": delta_fro,
        "base_fro": base_fro,
        "rel_delta": delta_fro / base_fro if base_fro > 0 else None,
        "delta_max": delta_max if delta_max >= 0 else None,
        "cosine": dot / cos_den if cos_den > 0 else None,
        "nonfinite_base": nonfinite_base,
        "nonfinite_tuned": nonfinite_tuned,
    }
