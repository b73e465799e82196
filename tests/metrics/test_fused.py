"""The torch-free driver of the C kernel: chunking, thread count, empty pairs, mixed dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from tests import reference
from weightdiff.metrics import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="the C kernel is not built in this install")


def _run(a: np.ndarray, code_a: int, b: np.ndarray, code_b: int) -> dict:
    return fused.collect(fused.submit(a.ctypes.data, code_a, b.ctypes.data, code_b, a.size, 1e-5), a.size)


def test_chunks_add_up_to_the_whole(monkeypatch):
    rng = np.random.default_rng(5)
    a = rng.standard_normal(10_007).astype(np.float32)
    b = (a + (rng.random(a.size) < 0.5) * rng.standard_normal(a.size) * 1e-3).astype(np.float32)
    whole = _run(a, 1, b, 1)
    monkeypatch.setattr(fused, "CHUNK", 1000)  # 11 chunks, the last one short, spread over the pool
    assert len(fused.submit(a.ctypes.data, 1, b.ctypes.data, 1, a.size, 1e-5)) == 11
    chunked = _run(a, 1, b, 1)
    ref = reference.elementwise(a, b)
    for key in ("changed_exact", "changed_bf16", "changed_atol", "ulp_hist", "nonfinite_base", "numel"):
        assert whole[key] == chunked[key] == ref[key], key
    for key in ("delta_fro", "base_fro", "cosine", "delta_max"):
        assert whole[key] == pytest.approx(ref[key], rel=1e-12)
        assert chunked[key] == pytest.approx(ref[key], rel=1e-12)


def test_mixed_dtypes_fp64_base_against_fp16_tuned():
    rng = np.random.default_rng(6)
    a = rng.standard_normal(5000)
    b = a.astype(np.float16)
    got = _run(a, 0, b, 2)
    # float64 values are compared as numbers against the exactly widened float16 ones.
    assert got["changed_exact"] == int(np.sum(a != b.astype(np.float64)))
    assert got["delta_fro"] == pytest.approx(
        float(np.sqrt(np.sum((b.astype(np.float64) - a) ** 2))), rel=1e-12
    )


def test_empty_pair():
    e = np.zeros(0, dtype=np.uint16)
    got = _run(e, 3, e, 3)
    assert got["numel"] == 0 and got["changed_exact"] == 0 and got["sparsity_bf16"] is None
    assert got["delta_max"] is None and got["cosine"] is None


def test_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fused.threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert fused.threads() >= 1


def _build_one_target(tmp_path, flags: list[str], tag: str):
    """Compile the kernel for one instruction set (no load-time dispatch) and import it under another name."""
    import importlib.util
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    import weightdiff

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the single-target kernels with")
    src = Path(weightdiff.__file__).with_name("_kernels.c").read_text()
    # A distinct module name, so the copy loads beside the installed kernel.
    (tmp_path / f"k_{tag}.c").write_text(
        src.replace("PyInit__kernels", f"PyInit_k_{tag}").replace('"_kernels"', f'"k_{tag}"')
    )
    out = tmp_path / f"k_{tag}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O3",
            "-fno-math-errno",
            "-fassociative-math",
            "-fno-signed-zeros",
            "-fno-trapping-math",
            "-DWEIGHTDIFF_ONE_TARGET",
            *flags,
            f"-I{sysconfig.get_paths()['include']}",
            str(tmp_path / f"k_{tag}.c"),
            "-o",
            str(out),
        ],
        check=True,
    )
    spec = importlib.util.spec_from_file_location(f"k_{tag}", out)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma"], ["-mno-avx", "-mno-avx2"]], ids=["avx2", "baseline"])
def test_every_instruction_set_gives_the_same_counts(tmp_path, flags):
    # The installed kernel runs the clone this CPU picks (AVX-512 on the project's machines); users' CPUs may
    # run the AVX2 or the baseline loops, which must count exactly the same.
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 instruction sets only")
    other = _build_one_target(tmp_path, flags, flags[0].strip("-").replace("-", "_"))
    rng = np.random.default_rng(8)
    n = 4096 * 9 + 77
    a = rng.integers(0, 1 << 16, n).astype(np.uint16)
    steps = rng.integers(-200, 201, n).astype(np.int64)
    b = np.where(rng.random(n) < 0.5, a, (a.astype(np.int64) + steps) & 0xFFFF).astype(np.uint16)
    # Finite copies too: blocks without NaN or Inf take the bf16 loop's fast path, the others its general one.
    fa, fb = (np.where((v & 0x7F80) == 0x7F80, v & 0xBFFF, v).astype(np.uint16) for v in (a, b))
    for x, y, code in ((a, b, 3), (fa, fb, 3), (a.view(np.float16), b.view(np.float16), 2)):
        mine = fused._kernels.elementwise(x.ctypes.data, code, y.ctypes.data, code, n, 1e-5)
        theirs = other.elementwise(x.ctypes.data, code, y.ctypes.data, code, n, 1e-5)
        assert mine[:6] == theirs[:6]  # every count and the ULP histogram
        for m, t in zip(mine[6:], theirs[6:], strict=True):
            assert m == pytest.approx(t, rel=1e-12, nan_ok=True)
