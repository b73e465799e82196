"""torchrun support (weightdiff/distributed.py): several CPU processes over gloo write the report one process
writes, rank 0 alone prints, and a failure on any rank fails every rank without leaving a file behind.

The multi-process tests start the ranks themselves with the environment torchrun would give them (one test goes
through ``python -m torch.distributed.run`` itself), so that each rank's exit code and stderr can be checked.
Every process runs one intra-op thread, and so does the single-process reference: BLAS results (and with them
ties in the principal-weight masks) may depend on the thread count, not on the number of ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from pandas.testing import assert_frame_equal

import weightdiff
from tests.conftest import llama_like, perturb, write_checkpoint
from weightdiff import distributed
from weightdiff.consistency import consistency
from weightdiff.pairing import make_plan
from weightdiff.sources import open_source
from weightdiff.spectrum import spectrum

TIMEOUT = 120


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    base = llama_like(layers=3, hidden=48, inter=64)
    write_checkpoint(root / "base" / "model.safetensors", base)
    write_checkpoint(root / "run1" / "model.safetensors", perturb(base, seed=1))
    write_checkpoint(root / "run2" / "model.safetensors", perturb(base, frac=0.1, seed=2))
    return root


@pytest.fixture
def one_thread():
    """The single-process reference computed with one thread, as every rank is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    # Nothing from the user's torchrun or Hugging Face settings (tokens, endpoint, offline mode) leaks in.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith(("HF_", "HUGGING_FACE"))
    }
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="160", **extra)
    return env


def _ranks(n: int, args: list[str], cwd: Path, **extra: str) -> list[subprocess.CompletedProcess[str]]:
    """Run ``python -m weightdiff ARGS`` as ``n`` ranks, as torchrun would start them on one node."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "weightdiff", *args],
            cwd=cwd,
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def _same_report(single: str | Path, sharded: str | Path) -> None:
    """Equal frames (row order included) and equal metadata apart from the creation time."""
    assert_frame_equal(pd.read_parquet(single), pd.read_parquet(sharded))
    meta = [dict(pq.read_schema(p).metadata or {}) for p in (single, sharded)]
    for m in meta:
        m.pop(b"weightdiff.created", None)
    assert meta[0] == meta[1]


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------- pure parts


def test_assign_is_greedy_largest_first_and_deterministic():
    costs = [5, 1, 9, 3, 3, 7, 2]
    owner = distributed.assign(costs, 3)
    assert owner == distributed.assign(costs, 3)
    # 9 -> r0, 7 -> r1, 5 -> r2, 3 -> r2 (5 < 7 < 9), 3 -> r1, 2 -> r2, 1 -> r0
    assert owner == [2, 0, 0, 2, 1, 1, 2]
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs)
    assert distributed.assign([], 4) == []
    assert distributed.assign([4, 4], 5) == [0, 1]  # more ranks than items: the rest get nothing


def test_pair_cost_weights_matrices_by_svd_cost_only_when_spectral():
    assert distributed.pair_cost((64, 32), 8192, spectral=False) == 8192
    assert distributed.pair_cost((64, 32), 8192, spectral=True) == 64 * 32 * 32 + 8192
    assert distributed.pair_cost((64,), 256, spectral=True) == 256
    assert distributed.pair_cost((1, 64), 256, spectral=True) == 256


def test_single_process_takes_the_plain_path(ckpts, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.current() is None and distributed.is_leader()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current() is None
    report = weightdiff.compare(str(ckpts / "base"), str(ckpts / "run1"), spectral=False)
    assert len(report.rows) == len(report.plan.pairs)
    assert not torch.distributed.is_initialized()


def test_verdict_names_the_failing_rank_and_tensor_once():
    f = distributed.Failure
    # Rank 0 stopped early because rank 1 failed: rank 1's failure decides the message and the exit code.
    failures = [f(0, "v", "", 2, aborted=True), f(1, "w", "w: broken", 3), f(2, "x", "", 2, aborted=True)]
    for rank in range(3):
        err = distributed.verdict(failures, 3, rank)
        assert str(err) == "rank 1 of 3 failed on tensor w: broken"
        assert err.exit_code == 3 and err.quiet == (rank != 0)
    same = [f(r, None, "nothing to compare", 3) for r in range(2)]
    assert str(distributed.verdict(same, 2, 0)) == "nothing to compare"
    # A gate's exit (no message): its rank showed the verdict; every rank exits 1 without a word.
    gate = distributed.verdict([f(0, None, "", 1)], 2, 0)
    assert gate.exit_code == 1 and gate.quiet


# ---------------------------------------------------------------------------------------------- processes


def test_compare_two_ranks_writes_the_single_process_report(ckpts, tmp_path, one_thread):
    base, tuned = str(ckpts / "base"), str(ckpts / "run1")
    one = weightdiff.compare(
        base,
        tuned,
        output=str(tmp_path / "one.parquet"),
        spectra_output=str(tmp_path / "s1.pq"),
        device="cpu",
    )
    # A gate that fails (every tensor changed) as well: the report is written, as in one process, then every
    # rank exits 1.
    args = ["compare", base, tuned, "-o", "two.parquet", "--spectra", "s2.pq", "--json", "two.json"]
    ranks = _ranks(2, [*args, "--fail-if", "sparsity_bf16 < 1"], tmp_path)
    assert [r.returncode for r in ranks] == [1, 1], ranks[0].stderr + ranks[1].stderr
    _same_report(tmp_path / "one.parquet", tmp_path / "two.parquet")
    _same_report(tmp_path / "s1.pq", tmp_path / "s2.pq")
    summary = json.loads((tmp_path / "two.json").read_text())
    assert summary["overall"]["tensors"] == len(one.plan.pairs) and summary["verdict"]["verdict"] == "fail"
    # Rank 0 prints the plan, its share, the summary and the verdict; rank 1 prints nothing at all.
    assert "rank 0 computes" in ranks[0].stderr and "bf16-aware sparsity" in ranks[0].stdout
    assert "error" not in ranks[0].stderr
    assert ranks[1].stdout == "" and ranks[1].stderr == ""


def test_compare_under_torchrun_with_three_ranks(ckpts, tmp_path, one_thread):
    base, tuned = str(ckpts / "base"), str(ckpts / "run2")
    weightdiff.compare(base, tuned, output=str(tmp_path / "one.parquet"), spectral=False, device="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
    cmd += ["--master-port", str(_free_port()), "-m", "weightdiff", "compare", base, tuned]
    cmd += ["-o", "three.parquet", "--no-spectral", "-q"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    _same_report(tmp_path / "one.parquet", tmp_path / "three.parquet")
    assert res.stdout.count("bf16-aware sparsity") == 1  # one summary, from rank 0


def test_consistency_and_stripes_two_ranks(ckpts, tmp_path, one_thread):
    args = [str(ckpts / n) for n in ("base", "run1", "run2")]
    consistency(args[0], args[1:], output=str(tmp_path / "c1.pq"), stripes_output=str(tmp_path / "st1.pq"))
    ranks = _ranks(2, ["consistency", *args, "-o", "c2.pq", "--stripes", "st2.pq", "-q"], tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    _same_report(tmp_path / "c1.pq", tmp_path / "c2.pq")
    _same_report(tmp_path / "st1.pq", tmp_path / "st2.pq")
    assert ranks[1].stdout == ""


def test_spectrum_two_ranks(ckpts, tmp_path, one_thread):
    base, tuned = str(ckpts / "base"), str(ckpts / "run1")
    spectrum(base, tuned, output=str(tmp_path / "one.pq"), rank=8)
    ranks = _ranks(2, ["spectrum", base, tuned, "-o", "two.pq", "--rank", "8"], tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], "".join(r.stderr for r in ranks)
    _same_report(tmp_path / "one.pq", tmp_path / "two.pq")
    assert ranks[1].stdout == "" and ranks[1].stderr == ""


def test_hub_sources_stream_each_tensor_to_one_rank(ckpts, tmp_path, one_thread):
    from tests.hub_server import FakeHub, files_from_dir

    local = [str(ckpts / n) for n in ("base", "run1")]
    weightdiff.compare(*local, output=str(tmp_path / "local.parquet"), spectral=False, device="cpu")
    with FakeHub() as hub:
        hub.add_commit("org/base", files_from_dir(ckpts / "base"))
        hub.add_commit("org/tuned", files_from_dir(ckpts / "run1"))
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        args = ["compare", "org/base", "org/tuned", "--no-spectral", "-q", "-o", "hub.parquet"]
        ranks = _ranks(2, args, tmp_path, **env)
        reads = [(r["path"], r["range"]) for r in hub.file_requests()]
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert_frame_equal(pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(tmp_path / "hub.parquet"))
    # Each rank reads both headers (the first two ranges of each file); every tensor's bytes go to one rank.
    data = [
        (path, rng) for path, rng in reads if rng not in ("bytes=0-7",) and not rng.startswith("bytes=8-")
    ]
    assert len(data) == len(set(data)) > 0


def _owned_by(ckpts: Path, rank: int, world: int) -> str:
    """A tensor that rank ``rank`` computes in a --no-spectral compare of base and run1."""
    srcs = [open_source(str(ckpts / n)) for n in ("base", "run1")]
    pairs = make_plan(srcs[0].tensors(), srcs[1].tensors()).pairs
    for s in srcs:
        s.close()
    owner = distributed.assign([distributed.pair_cost(p.base.shape, p.nbytes, False) for p in pairs], world)
    return [p.name for p, o in zip(pairs, owner, strict=True) if o == rank][-1]


def test_failure_on_one_rank_fails_all_and_leaves_no_file(ckpts, tmp_path):
    victim = _owned_by(ckpts, 2, 3)
    args = ["compare", str(ckpts / "base"), str(ckpts / "run1"), "--no-spectral"]
    args += ["-o", "r.parquet", "--json", "r.json"]
    ranks = _ranks(3, args, tmp_path, **{distributed.FAIL_ENV: victim})
    assert [r.returncode for r in ranks] == [2, 2, 2]
    errors = [line for line in ranks[0].stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rank 2 of 3 failed on tensor {victim}: failure injected by {distributed.FAIL_ENV} (a test hook)"
    ]
    assert "error" not in ranks[1].stderr + ranks[2].stderr
    assert _files(tmp_path) == set()  # no report, no JSON, no temporary file


def test_bad_output_path_stops_every_rank(ckpts, tmp_path):
    args = ["compare", str(ckpts / "base"), str(ckpts / "run1"), "-o", "missing/r.parquet", "-q"]
    ranks = _ranks(2, args, tmp_path)
    assert [r.returncode for r in ranks] == [2, 2]
    assert "rank 0 of 2 failed: missing/r.parquet: cannot write --output" in ranks[0].stderr
    assert ranks[1].stderr == ""
