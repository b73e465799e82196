"""The streaming engine: row order, read-ahead bounded by bytes, --max-memory planning, device choice."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff.engine import EngineOptions, Reader, ReadJob, compare_pairs, memory_plan, resolve_device
from weightdiff.errors import InputError
from weightdiff.pairing import make_plan
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
    reader = Reader(jobs, budget, pin=False)
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
