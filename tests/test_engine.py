"""The streaming engine: row order, read-ahead bounded by bytes, --max-memory planning, device choice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import engine
from weightdiff.engine import EngineOptions, Reader, ReadJob, compare_pairs, memory_plan, resolve_device
from weightdiff.errors import InputError
from weightdiff.pairing import make_plan
from weightdiff.sources.base import bytes_to_tensor
from weightdiff.sources.local import LocalSource


@pytest.fixture
def sources(tmp_path):
    base = llama_like(layers=3)
    write_checkpoint(tmp_path / "b.safetensors", base)
    write_checkpoint(tmp_path / "t.safetensors", perturb(base))
    return LocalSource(tmp_path / "b.safetensors"), LocalSource(tmp_path / "t.safetensors")


def test_rows_come_in_plan_order(sources):
    b, t = sources
    plan = make_plan(b.tensors(), t.tensors())
    rows = list(compare_pairs(b, t, plan, EngineOptions(spectral=False, prefetch_bytes=1)))
    assert [r["name"] for r in rows] == [p.name for p in plan.pairs]


def test_reader_keeps_bytes_in_flight_under_budget(sources):
    b, _ = sources
    infos = list(b.tensors().values())
    budget = max(i.nbytes for i in infos) * 2
    jobs = [ReadJob(i.name, ((b, i),)) for i in infos]
    reader = Reader(jobs, budget)
    seen = []
    lock = threading.Lock()
    try:
        for job, _tensors in reader:
            with lock:
                seen.append(reader.in_flight)
            reader.done(job)
    finally:
        reader.close()
    assert len(seen) == len(jobs)
    assert max(seen) <= budget


def test_memory_plan_bounds_read_ahead_and_chunks(sources):
    b, t = sources
    plan = make_plan(b.tensors(), t.tensors())
    mp = memory_plan(plan, EngineOptions(spectral=False, max_memory=64 << 20))
    assert mp.prefetch_bytes == 16 << 20 and mp.chunk == (16 << 20) // 48
    assert memory_plan(plan, EngineOptions()).chunk is None


def test_read_ahead_defaults_per_device_and_respects_what_is_asked(sources):
    # 256 MiB of host memory by default; on CUDA (device memory) 1 GiB, unless --max-memory bounds it or the
    # caller asked for a size, 0 included.
    b, t = sources
    plan = make_plan(b.tensors(), t.tensors())
    assert memory_plan(plan, EngineOptions()).prefetch_bytes == 256 << 20
    assert memory_plan(plan, EngineOptions(), "cuda").prefetch_bytes == 1 << 30
    assert memory_plan(plan, EngineOptions(), "cuda:1").prefetch_bytes == 1 << 30
    for asked in (0, 64 << 20):
        assert memory_plan(plan, EngineOptions(prefetch_bytes=asked), "cuda").prefetch_bytes == asked
    bounded = memory_plan(plan, EngineOptions(spectral=False, max_memory=64 << 20), "cuda")
    assert bounded.prefetch_bytes == 16 << 20


def test_memory_plan_refuses_a_pair_that_cannot_fit(sources):
    b, t = sources
    plan = make_plan(b.tensors(), t.tensors())
    with pytest.raises(InputError, match=r"--max-memory 20.0 KiB is too small: .* \(use --no-spectral"):
        memory_plan(plan, EngineOptions(spectral=True, max_memory=20 << 10))


def test_small_max_memory_gives_the_same_numbers(sources):
    b, t = sources
    plan = make_plan(b.tensors(), t.tensors())
    free = list(compare_pairs(b, t, plan, EngineOptions(spectral=False)))
    bounded = list(compare_pairs(b, t, plan, EngineOptions(spectral=False, max_memory=1 << 20)))
    assert free == bounded


def test_resolve_device():
    assert resolve_device("cpu")[0] == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto")[0] == torch.device("cpu")
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="is not a device"):
        resolve_device("gpu0")


class _Recording(LocalSource):
    """A local source that logs reads and releases, and can refuse stored bytes (as computed sources do)."""

    def __init__(self, path, log, name, buffers=True):
        super().__init__(path)
        self.log, self.name, self.buffers = log, name, buffers

    def read_buffer(self, info):
        if not self.buffers:
            return None
        self.log.append(("read", self.name, info.name, info.nbytes))
        return super().read_buffer(info)

    def read(self, info):
        self.log.append(("read", self.name, info.name, info.nbytes))
        return bytes_to_tensor(LocalSource.read_buffer(self, info), info)

    def release(self, info):
        self.log.append(("release", self.name, info.name, info.nbytes))
        super().release(info)


def _mixed_pair(tmp_path):
    # bf16 matrices, an fp32-vs-bf16 pair, an fp16 pair, and fp8 tensors (no scales: the kernel does not take
    # fp8, so those pairs go through torch on the fused path).
    base = llama_like(layers=2)
    tuned = perturb(base)
    base["extra.fp32_vs_bf16.weight"] = torch.randn(40, 24)
    tuned["extra.fp32_vs_bf16.weight"] = (base["extra.fp32_vs_bf16.weight"] * 1.001).to(torch.bfloat16)
    base["extra.half.weight"] = torch.randn(8, 300).half()
    tuned["extra.half.weight"] = (base["extra.half.weight"].float() + 1e-3).half()
    base["extra.fp8.weight"] = torch.randn(16, 16).to(torch.float8_e4m3fn)
    tuned["extra.fp8.weight"] = (base["extra.fp8.weight"].float() * 1.1).to(torch.float8_e4m3fn)
    write_checkpoint(tmp_path / "b.safetensors", base)
    write_checkpoint(tmp_path / "t.safetensors", tuned)
    return tmp_path / "b.safetensors", tmp_path / "t.safetensors"


@pytest.mark.skipif(not engine.fused.available(), reason="the C kernel is not built in this install")
@pytest.mark.parametrize("buffers", [True, False])
def test_fused_path_matches_the_tensor_path(tmp_path, monkeypatch, buffers):
    bp, tp = _mixed_pair(tmp_path)
    log: list = []
    b, t = _Recording(bp, log, "b", buffers), _Recording(tp, log, "t", buffers)
    plan = make_plan(b.tensors(), t.tensors())
    budget = 3000
    got = list(compare_pairs(b, t, plan, EngineOptions(spectral=False, device="cpu", prefetch_bytes=budget)))
    monkeypatch.setattr(engine.fused, "available", lambda: False)  # forces the tensor path
    want = list(
        compare_pairs(LocalSource(bp), LocalSource(tp), plan, EngineOptions(spectral=False, device="cpu"))
    )
    assert [r["name"] for r in got] == [p.name for p in plan.pairs]
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-12, abs=1e-300), (g["name"], key)
            else:
                assert g[key] == value, (g["name"], key)
    # Every read is released, in plan order, and the bytes held at once stay within the budget (or one pair).
    held, peak = 0, 0
    for op, _side, _name, nbytes in log:
        held += nbytes if op == "read" else -nbytes
        peak = max(peak, held)
    assert held == 0
    assert peak <= max(budget, max(p.nbytes for p in plan.pairs)) + max(p.nbytes for p in plan.pairs)
    released = [name for op, side, name, _ in log if op == "release" and side == "b"]
    assert released == [p.name for p in plan.pairs]


def test_device_name_never_imports_torch_for_the_cpu(tmp_path):
    bp, tp = _mixed_pair(tmp_path)
    code = (
        "import sys\n"
        "from weightdiff.cli import app\n"
        "try:\n"
        f"    app(['compare', {str(bp)!r}, {str(tp)!r}, '--no-spectral', '-q', '--device', sys.argv[1],"
        f" '-o', {str(tmp_path / 'r.parquet')!r}, '--exclude', '*fp8*'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, "cpu"], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"
    # auto looks for a GPU driver's device nodes first, and asks torch only where one exists.
    out = subprocess.run(
        [sys.executable, "-c", code, "auto"], capture_output=True, text=True, env=env, check=True
    )
    nodes = any(os.path.exists(n) for n in engine._GPU_DEVICE_NODES)
    assert out.stdout.strip().splitlines()[-1] == str(nodes or not sys.platform.startswith("linux"))


def test_device_name():
    assert engine.device_name("cpu") == ("cpu", "as requested")
    with pytest.raises(InputError, match="is not a device"):
        engine.device_name("gpu0")
    if not torch.cuda.is_available():
        assert engine.device_name("auto")[0] == "cpu"


def test_fused_path_error_mid_stream_propagates_and_releases(tmp_path):
    # A source that fails on its third tensor, read on the reader thread: the error reaches the caller, rows
    # before it were made, and nothing is left running (the test would hang otherwise).
    from weightdiff.errors import CheckpointFormatError

    bp, tp = _mixed_pair(tmp_path)
    log: list = []

    class Failing(_Recording):
        def read_buffer(self, info):
            if sum(1 for op, *_ in self.log if op == "read") >= 2:
                raise CheckpointFormatError(f"{info.file}: simulated failure on {info.name}")
            return super().read_buffer(info)

    b, t = Failing(bp, log, "b"), _Recording(tp, [], "t")
    plan = make_plan(b.tensors(), t.tensors())
    rows = []
    with pytest.raises(CheckpointFormatError, match="simulated failure"):
        for row in compare_pairs(b, t, plan, EngineOptions(spectral=False, device="cpu", prefetch_bytes=1)):
            rows.append(row)
    assert [r["name"] for r in rows] == [p.name for p in plan.pairs[: len(rows)]]
    assert len(rows) <= 2
    assert not [th for th in threading.enumerate() if th.name == "weightdiff-reader"]


@pytest.mark.skipif(not engine.fused.available(), reason="the C kernel is not built in this install")
def test_interrupt_while_waiting_leaves_no_kernel_chunk_running(tmp_path, monkeypatch):
    # Ctrl-C arrives while the compute side waits for a pair: by the time it propagates, no chunk may still
    # read the pair's memory (the caller closes the sources, unmapping it, right after).
    g = torch.Generator().manual_seed(0)
    big = {"w": torch.randn(2048, 4096, generator=g).to(torch.bfloat16)}
    write_checkpoint(tmp_path / "b.safetensors", big)
    write_checkpoint(tmp_path / "t.safetensors", perturb(big))
    b, t = LocalSource(tmp_path / "b.safetensors"), LocalSource(tmp_path / "t.safetensors")
    submitted: list = []
    real_submit = engine.fused.submit

    def recording_submit(*a, **k):
        futures = real_submit(*a, **k)
        submitted.extend(futures)
        return futures

    def interrupted(futures, n):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.fused, "CHUNK", 1 << 16)  # 128 chunks, most still queued when Ctrl-C comes
    monkeypatch.setattr(engine.fused, "submit", recording_submit)
    monkeypatch.setattr(engine.fused, "collect", interrupted)
    plan = make_plan(b.tensors(), t.tensors())
    with pytest.raises(KeyboardInterrupt):
        list(compare_pairs(b, t, plan, EngineOptions(spectral=False, device="cpu")))
    assert len(submitted) == 128
    assert all(f.done() for f in submitted)


def test_reader_loads_both_sides_of_a_job_at_once_and_passes_on_a_sides_error():
    both_in = threading.Barrier(2, timeout=5)  # passes only if the two sides' loads run at the same time

    def part(name: str) -> tuple[None, SimpleNamespace]:
        return (None, SimpleNamespace(name=name, nbytes=1))

    def load(src, info):
        both_in.wait()
        if info.name == "bad":
            raise InputError("tuned side failed")
        return info.name

    reader = Reader([ReadJob("pair", (part("base"), part("tuned")))], 1 << 20, load=load)  # type: ignore[arg-type]
    assert [loaded for _job, loaded in reader] == [["base", "tuned"]]
    reader.close()
    reader = Reader([ReadJob("pair", (part("ok"), part("bad")))], 1 << 20, load=load)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="tuned side failed"):
        list(reader)
    reader.close()
