"""Tests of the Hugging Face Hub source against a fake Hub on 127.0.0.1 (tests/hub_server.py).

The real huggingface_hub client talks to the fake server (model info, hf_hub_download), so these tests cover
the same requests a run against huggingface.co makes, and every fault the source must turn into a one-line
RemoteError. No test touches the network beyond the loopback interface.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import close_session, constants
from safetensors.torch import save_file

from weightdiff.errors import CheckpointFormatError, InputError, RemoteError, UnsupportedCheckpointError
from weightdiff.sources import open_source
from weightdiff.sources.hub import HubSource, looks_like_repo_id, parse_spec
from weightdiff.sources.local import LocalSource

try:
    from tests.hub_server import FakeHub, Faults, files_from_dir
except ImportError:  # pytest put tests/ itself on sys.path
    from hub_server import FakeHub, Faults, files_from_dir  # type: ignore[no-redef]

TOKEN = "hf_TESTsecretTOKEN0123456789abcdef"
WRONG_TOKEN = "hf_WRONGsecret9876543210zyxwvu"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate every test from the user's HF cache, token, endpoint and offline settings."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"), raising=False)
    return cache


def _shard_tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shard1 = {
        "embed.weight": torch.randn(64, 512, generator=g),  # 128 KiB: split into parts in the parts test
        "layer.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(7, generator=g).to(torch.float16),
        "steps": torch.tensor(3, dtype=torch.int64),
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }
    shard2 = {
        "head.weight": torch.randn(32, 64, generator=g),
        "head.scale": torch.tensor(1.25),
        "ids": torch.arange(100, dtype=torch.int32),
    }
    return shard1, shard2


def _write_sharded(directory: Path, scale: float = 1.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shard1, shard2 = _shard_tensors()
    if scale != 1.0:
        shard2 = {k: (v * scale if v.is_floating_point() else v) for k, v in shard2.items()}
    save_file(shard1, str(directory / SHARD1), metadata={"format": "pt"})
    save_file(shard2, str(directory / SHARD2), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(shard1, SHARD1), **dict.fromkeys(shard2, SHARD2)}
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 512}))
    (directory / "README.md").write_text("# toy\n")
    return directory


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    return _write_sharded(tmp_path / "sharded")


@pytest.fixture
def hub(sharded_dir: Path):
    with FakeHub(token=TOKEN) as server:
        files = files_from_dir(sharded_dir)
        server.add_commit("org/sharded", files)
        server.add_commit("org/private", files, private=True)
        server.add_commit("org/gated", files, gated=True)
        yield server


@pytest.fixture(params=[True, False], ids=["direct", "httpx"])
def direct(request: pytest.FixtureRequest) -> bool:
    """Tensor ranges through the direct client (the default) or through httpx (used behind a proxy)."""
    return bool(request.param)


def open_hub(server: FakeHub, spec: str = "org/sharded", **options) -> HubSource:
    options = {"endpoint": server.endpoint, "retries": 3, "backoff": 0.001, "timeout": 5.0, **options}
    return HubSource.open(spec, **options)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _layout(infos) -> dict[str, tuple]:
    return {n: (i.dtype, i.shape, i.start, i.end, Path(i.file).name) for n, i in infos.items()}


# ----------------------------------------------------------------------------------------------- repo ids


@pytest.mark.parametrize(
    "spec",
    [
        "org/name",
        "org/name@main",
        "org/name@refs/pr/1",
        "hf://org/name",
        "hf://org/name@v1.0",
        "Org_1/my.model-v2",
    ],
)
def test_repo_ids(spec: str) -> None:
    assert looks_like_repo_id(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "name",
        "./org/name",
        "/abs/path",
        "org/name/extra",
        "org/model.safetensors",
        "org//name",
        "a/b c",
        "org/na--me",
        "-org/name",
        "C:\\x\\y",
        "",
        "org/name@",
    ],
)
def test_not_repo_ids(spec: str) -> None:
    assert not looks_like_repo_id(spec)


def test_parse_spec() -> None:
    assert parse_spec("org/name") == ("org/name", None)
    assert parse_spec("org/name@v2") == ("org/name", "v2")
    assert parse_spec("hf://org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    with pytest.raises(InputError, match="only model repositories"):
        parse_spec("hf://datasets/org/name")
    with pytest.raises(InputError, match="not a Hub model id"):
        parse_spec("hf://org/name/extra")


# ------------------------------------------------------------------------------------------ happy path


def test_listing_and_reads_match_local(hub: FakeHub, sharded_dir: Path, direct: bool) -> None:
    local = LocalSource(sharded_dir)
    with open_hub(hub, direct_ranges=direct) as source:
        assert _layout(source.tensors()) == _layout(local.tensors())
        assert {i.file for i in source.tensors().values()} == {SHARD1, SHARD2}
        assert source.describe() == {
            "kind": "hub",
            "given": "org/sharded",
            "resolved": f"org/sharded@{hub.repos['org/sharded'].refs['main']}",
        }
        assert source.metadata == {"format": "pt"}
        for name, info in source.tensors().items():
            got, want = source.read(info), local.read(local.tensors()[name])
            assert got.dtype == want.dtype and got.shape == want.shape
            assert _bits(got) == _bits(want), name
        assert source.config() == {"model_type": "toy", "hidden_size": 512}
    local.close()


def test_large_tensor_is_fetched_in_concurrent_bounded_parts(
    hub: FakeHub, sharded_dir: Path, direct: bool
) -> None:
    local = LocalSource(sharded_dir)
    with open_hub(hub, part_bytes=8192, workers=3, direct_ranges=direct) as source:
        info = source.tensors()["embed.weight"]
        hub.reset_counters()
        hub.faults.stall_s = 0.02  # keep parts in flight long enough to overlap
        got = source.read(info)
        ranges = [r["range"] for r in hub.file_requests()]
    assert len(ranges) == -(-info.nbytes // 8192) == 16
    assert ranges[0] is not None and all(r.startswith("bytes=") for r in ranges)
    assert 2 <= hub.max_active <= 3
    assert _bits(got) == _bits(local.read(local.tensors()["embed.weight"]))
    local.close()


def test_bytes_transferred_is_headers_plus_tensors_read(
    hub: FakeHub, sharded_dir: Path, direct: bool
) -> None:
    with open_hub(hub, direct_ranges=direct) as source:
        wanted = ["layer.0.weight", "head.weight"]
        for name in wanted:
            source.read(source.tensors()[name])
        headers = 0
        for shard in (SHARD1, SHARD2):
            raw = (sharded_dir / shard).read_bytes()
            headers += 8 + int.from_bytes(raw[:8], "little")
        expected = (sharded_dir / INDEX).stat().st_size + headers
        expected += sum(source.tensors()[n].nbytes for n in wanted)
        assert abs(source.bytes_transferred - expected) <= 256
        assert source.bytes_transferred == hub.bytes_served
        total = sum((sharded_dir / s).stat().st_size for s in (SHARD1, SHARD2))
        assert source.bytes_transferred < total / 4


def test_read_buffer_recycles_released_buffers_but_never_a_tensors(hub: FakeHub, sharded_dir: Path) -> None:
    local = LocalSource(sharded_dir)
    want = bytes(local.read_buffer(local.tensors()["layer.0.weight"]))
    with open_hub(hub) as source:
        info = source.tensors()["layer.0.weight"]
        first = source.read_buffer(info)
        assert bytes(first) == want
        source.release(info)
        first[:] = bytes(len(first))  # scribble on the returned buffer
        # The next read of that size streams into the buffer just returned, and fills it afresh.
        second = source.read_buffer(info)
        assert second.obj is first.obj and bytes(second) == want
        source.release(info)
        # A tensor made by read() may outlive release(): it never gets a lent buffer.
        tensor = source.read(info)
        source.release(info)
        third = source.read_buffer(info)
        assert third.obj is first.obj
        third[:] = bytes(len(third))
        assert _bits(tensor) == _bits(local.read(local.tensors()["layer.0.weight"]))
    local.close()


def test_returned_buffers_serve_smaller_ranges_up_to_half_their_size(hub: FakeHub, sharded_dir: Path) -> None:
    local = LocalSource(sharded_dir)
    with open_hub(hub) as source:
        embed = source.tensors()["embed.weight"]  # 128 KiB
        big = source.read_buffer(embed)
        source.release(embed)
        head = source.tensors()["head.weight"]  # 8 KiB: far smaller, gets a buffer of its own
        small = source.read_buffer(head)
        assert small.obj is not big.obj and len(small) == head.nbytes
        source.release(head)
        part = dataclasses.replace(embed, name="part", end=embed.start + embed.nbytes * 3 // 4)
        view = source.read_buffer(part)  # 96 KiB: fits the returned 128 KiB buffer
        assert view.obj is big.obj and len(view) == part.nbytes
        assert bytes(view) == bytes(local.read_buffer(local.tensors()["embed.weight"]))[: part.nbytes]
        source.release(part)
    local.close()


def test_a_range_lent_twice_is_reused_only_after_both_releases(hub: FakeHub, sharded_dir: Path) -> None:
    # A tied head reads the embedding's bytes while the embedding's own pair may still be in flight.
    local = LocalSource(sharded_dir)
    want = bytes(local.read_buffer(local.tensors()["layer.0.weight"]))
    local.close()
    with open_hub(hub) as source:
        info = source.tensors()["layer.0.weight"]
        first = source.read_buffer(info)
        served = hub.bytes_served
        second = source.read_buffer(info)
        assert second.obj is first.obj and hub.bytes_served == served  # shared, not downloaded again
        source.release(info)
        # One lender left: the buffer must not go to another range of the same size.
        embed = source.tensors()["embed.weight"]
        other = dataclasses.replace(embed, name="slice", end=embed.start + info.nbytes)
        third = source.read_buffer(other)
        assert third.obj is not first.obj
        assert bytes(second) == want  # the remaining lender's bytes are untouched by the other read
        source.release(other)
        source.release(info)
        # All released: the next same-sized read reuses a returned buffer and fills it afresh.
        fourth = source.read_buffer(info)
        assert fourth.obj is first.obj or fourth.obj is third.obj
        source.release(info)


def test_a_range_asked_for_twice_at_once_is_downloaded_once(hub: FakeHub, sharded_dir: Path) -> None:
    # The two sides of a pair load at once; an adapter's untouched tensors come from the base source.
    want = LocalSource(sharded_dir)
    info_local = want.tensors()["embed.weight"]
    expected = bytes(want.read_buffer(info_local))
    want.close()
    with open_hub(hub) as source:
        info = source.tensors()["embed.weight"]
        hub.reset_counters()
        hub.faults.stall_s = 0.2  # the first download is still running when the second lender asks
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(source.read_buffer, info)
            time.sleep(0.05)
            second = pool.submit(source.read_buffer, info)
            views = [first.result(), second.result()]
        assert views[0].obj is views[1].obj and bytes(views[1]) == expected
        assert hub.bytes_served == info.nbytes
        source.release(info)
        source.release(info)
        hub.faults.stall_s = 0.0
        hub.faults.missing_files = {SHARD1}  # now both lenders of a failing download get its error
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(source.read_buffer, info) for _ in range(2)]
            for fut in futures:
                with pytest.raises(RemoteError, match="file not found"):
                    fut.result()
        assert source._lent == {}


def test_revision_is_pinned_while_branch_moves(hub: FakeHub, sharded_dir: Path, tmp_path: Path) -> None:
    first = hub.repos["org/sharded"].refs["main"]
    with open_hub(hub) as source:
        before = source.read(source.tensors()["head.weight"])
        moved = hub.add_commit("org/sharded", files_from_dir(_write_sharded(tmp_path / "v2", scale=3.0)))
        assert moved != first
        hub.reset_counters()
        after = source.read(source.tensors()["head.weight"])
        assert _bits(before) == _bits(after)
        assert all(f"/resolve/{first}/" in r["path"] for r in hub.file_requests())
        assert source.describe()["resolved"] == f"org/sharded@{first}"
    # The new commit is what a fresh open sees; the old one stays reachable by sha, tag or revision=.
    hub.repos["org/sharded"].refs["v1"] = first
    for spec, revision in [
        ("org/sharded@v1", None),
        ("hf://org/sharded@main", "v1"),
        (f"org/sharded@{first}", None),
    ]:
        with open_hub(hub, spec, revision=revision) as old:
            assert old.describe()["resolved"] == f"org/sharded@{first}"
    with open_hub(hub, "hf://org/sharded") as new:
        assert new.describe()["resolved"] == f"org/sharded@{moved}"
        scaled = new.read(new.tensors()["head.weight"])
        assert torch.equal(scaled, before * 3.0)


def test_commit_from_header_when_api_omits_sha_and_siblings(hub: FakeHub) -> None:
    hub.faults.omit_sha = True
    hub.faults.omit_siblings = True
    with open_hub(hub) as source:
        assert source.describe()["resolved"] == f"org/sharded@{hub.repos['org/sharded'].refs['main']}"
        assert source.files == [SHARD1, SHARD2]


def test_open_source_dispatches_to_hub_with_hf_endpoint(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    with open_source("org/sharded@main") as source:
        assert isinstance(source, HubSource)
        assert source.describe()["kind"] == "hub"


def test_server_ignoring_range_on_a_small_file_is_sliced_correctly(hub: FakeHub, sharded_dir: Path) -> None:
    hub.faults.ignore_range = True
    local = LocalSource(sharded_dir)
    with open_hub(hub) as source:
        for name, info in source.tensors().items():
            assert _bits(source.read(info)) == _bits(local.read(local.tensors()[name])), name
    local.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "httpx"])
def test_unusual_but_honest_servers_give_the_same_tensors(
    hub: FakeHub, sharded_dir: Path, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers a strict reading would refuse, although their bytes are right and say where they are: ranges
    # widened to 1 KiB boundaries, JSON gzipped, bodies chunked, and a chunked 200 without a length from a
    # server that ignores Range (small files only).
    local = LocalSource(sharded_dir)
    expected = {name: _bits(local.read(info)) for name, info in local.tensors().items()}
    local.close()
    cases = [
        {"align_ranges": 1024},
        {"gzip_json": True},
        {"chunked": True},
        {"chunked": True, "ignore_range": True},
    ]
    for switches in cases:
        hub.faults = Faults(**switches)
        with open_hub(hub, direct_ranges=direct) as source:
            got = {name: _bits(source.read(info)) for name, info in source.tensors().items()}
        assert got == expected, switches
    # Widened ranges cost the bytes around each asked range, never more than one alignment step a side.
    hub.faults = Faults(align_ranges=1024)
    with open_hub(hub, direct_ranges=direct) as source:
        infos = source.tensors()
        before = source.bytes_transferred
        for info in infos.values():
            source.read(info)
        assert source.bytes_transferred - before <= sum(i.end - i.start + 2048 for i in infos.values())
    # Beyond MAX_UNRANGED_BODY a body of unknown length is still refused, whole files are never fetched.
    monkeypatch.setattr(HubSource, "MAX_UNRANGED_BODY", 64)
    hub.faults = Faults(chunked=True, ignore_range=True, only_files={SHARD2})
    pattern = r"00002\.safetensors: the server ignored the byte-range request \(HTTP 200 with the whole unknown-size"
    with pytest.raises(RemoteError, match=pattern), open_hub(hub, direct_ranges=direct) as source:
        source.tensors()  # reading the shard's header is refused already


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "httpx"])
def test_whole_file_answer_cut_short_is_retried(hub: FakeHub, sharded_dir: Path, direct: bool) -> None:
    # A 200 without a length ends when the connection closes, so a dropped connection looks like the end of
    # the file: the known file size tells it apart, and the read is tried again (then given up).
    local = LocalSource(sharded_dir)
    expected = {name: _bits(local.read(info)) for name, info in local.tensors().items()}
    local.close()
    with open_hub(hub, direct_ranges=direct) as source:
        infos = source.tensors()
        name, info = next((n, i) for n, i in infos.items() if Path(i.file).name == SHARD2)
        hub.faults = Faults(ignore_range=True, short_unranged=1, only_files={SHARD2})
        assert _bits(source.read(info)) == expected[name]
        hub.faults = Faults(ignore_range=True, short_unranged=-1, only_files={SHARD2})
        with pytest.raises(
            RemoteError, match=r"short body: the server sent \d+ of the \d+-byte file \(gave up"
        ):
            source.read(info)


def test_undecodable_gzip_json_is_a_clear_error(hub: FakeHub) -> None:
    # A JSON answer labelled gzip whose body is not gzip is refused, not parsed.
    hub.faults = Faults(content_encoding="gzip", only_files={"model.safetensors.index.json"})
    with pytest.raises(
        RemoteError, match=r"index\.json: the server labelled the body gzip but it does not decode"
    ):
        open_hub(hub).tensors()


# --------------------------------------------------------------------------------------------- planning


def test_single_file_and_unindexed_repos(hub: FakeHub, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(3)}, str(a))
    save_file({"y": torch.zeros(2, 2)}, str(b))
    hub.add_commit("org/single", {"model.safetensors": a.read_bytes(), "config.json": b"{}"})
    hub.add_commit(
        "org/multi", {"a.safetensors": a.read_bytes(), "b.safetensors": b.read_bytes(), "x.bin": b"p"}
    )
    with open_hub(hub, "org/single") as single:
        assert single.files == ["model.safetensors"]
        assert torch.equal(single.read(single.tensors()["x"]), torch.ones(3))
    with open_hub(hub, "org/multi") as multi:
        assert multi.files == ["a.safetensors", "b.safetensors"]
        assert set(multi.tensors()) == {"x", "y"}
        assert multi.config() is None
    hub.faults.omit_siblings = True  # no file list: a missing index is probed, then model.safetensors used
    with open_hub(hub, "org/single") as single:
        assert single.files == ["model.safetensors"]


def test_pickle_only_and_empty_repos_are_refused(hub: FakeHub) -> None:
    hub.add_commit("org/pickled", {"pytorch_model.bin": b"\x80\x04pickle", "config.json": b"{}"})
    hub.add_commit("org/empty", {"README.md": b"nothing"})
    with pytest.raises(
        UnsupportedCheckpointError, match=r"holds only pickle files \(pytorch_model.bin\).*never unpickles"
    ):
        open_hub(hub, "org/pickled")
    with pytest.raises(InputError, match="no safetensors files in this repository"):
        open_hub(hub, "org/empty")


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/evil.safetensors", "sub/../../x.safetensors"])
def test_index_shards_outside_the_repo_are_refused(hub: FakeHub, shard: str) -> None:
    index = json.dumps({"weight_map": {"w": shard}}).encode()
    hub.add_commit("org/evil", {INDEX: index, "x.safetensors": b""})
    with pytest.raises(CheckpointFormatError, match="lies outside the checkpoint repository"):
        open_hub(hub, "org/evil")
    assert not [r for r in hub.file_requests() if "evil.safetensors" in r["path"]]


def test_index_inconsistencies(hub: FakeHub, sharded_dir: Path) -> None:
    files = files_from_dir(sharded_dir)
    index = json.loads(files[INDEX])
    missing = {
        **files,
        INDEX: json.dumps({"weight_map": {**index["weight_map"], "extra": "gone.safetensors"}}).encode(),
    }
    hub.add_commit("org/missing-shard", missing)
    with pytest.raises(InputError, match=r"names shard 'gone\.safetensors', which does not exist"):
        open_hub(hub, "org/missing-shard")
    moved = {**files, INDEX: json.dumps({"weight_map": {**index["weight_map"], "ids": SHARD1}}).encode()}
    hub.add_commit("org/wrong-shard", moved)
    with pytest.raises(CheckpointFormatError, match=f"maps tensor 'ids' to {SHARD1}, which does not hold it"):
        open_hub(hub, "org/wrong-shard")


@pytest.mark.parametrize(
    ("body", "problem"), [(b"", "only 0 bytes"), (b"abc", "only 3 bytes"), (b"\xff" * 64, "large")]
)
def test_files_that_are_not_safetensors(hub: FakeHub, body: bytes, problem: str) -> None:
    hub.add_commit("org/garbage", {"model.safetensors": body})
    with pytest.raises(CheckpointFormatError, match=problem):
        open_hub(hub, "org/garbage")


# ---------------------------------------------------------------------------------------------- tokens


def test_token_sources_and_where_the_token_goes(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_hub(hub, "org/private", token=TOKEN) as source:
        assert TOKEN not in repr(source) and TOKEN not in json.dumps(source.describe())
        assert TOKEN not in repr(vars(source))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with open_hub(hub, "org/private") as source:
        source.read(source.tensors()["ids"])
    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)  # a stored `hf auth login`
    hub.faults.redirect = True
    hub.reset_counters()
    with open_hub(hub, "org/gated") as source:
        source.read(source.tensors()["ids"])
    resolve = [r for r in hub.file_requests() if r["kind"] == "resolve"]
    cdn = [r for r in hub.file_requests() if r["kind"] == "cdn"]
    assert resolve and cdn
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in resolve)
    assert all(r["authorization"] is None for r in cdn)  # never sent to another origin


# ----------------------------------------------------------------------------------------------- faults


def _assert_clean(exc: BaseException, *secrets: str) -> str:
    text = str(exc)
    assert isinstance(exc, RemoteError) and exc.exit_code == 2
    assert "\n" not in text
    for secret in (TOKEN, WRONG_TOKEN, *secrets):
        assert secret not in text
        assert secret not in repr(exc.args)
    return text


@pytest.mark.parametrize(
    ("spec", "token", "pattern"),
    [
        (
            "org/nope",
            TOKEN,
            r"^org/nope: repository not found on http://127\.0\.0\.1:\d+ \(HTTP 404; or the token",
        ),
        ("org/private@nope", TOKEN, r"^org/private: revision 'nope' not found \(HTTP 404\)"),
        (
            "org/private",
            None,
            r"authentication required \(HTTP 401\): this repository needs a token: pass --token, set HF_TOKEN",
        ),
        ("org/private", WRONG_TOKEN, r"authentication required \(HTTP 401\): the token was rejected"),
        (
            "org/gated",
            None,
            r"access denied \(HTTP 403\): the model is gated .* request access on "
            r"http://127\.0\.0\.1:\d+/org/gated and use a token \(pass --token, set HF_TOKEN",
        ),
        ("org/gated", WRONG_TOKEN, r"org/gated@[0-9a-f]{12}/\S+: access denied \(HTTP 403\).*granted access"),
    ],
)
def test_hub_answers_at_open(hub: FakeHub, spec: str, token: str | None, pattern: str) -> None:
    with pytest.raises(RemoteError) as info:
        open_hub(hub, spec, token=token)
    assert re.search(pattern, _assert_clean(info.value)), str(info.value)


READ_FAULTS = {
    "file 404": ({"missing_files": {SHARD2}}, rf"/{SHARD2}: file not found in the repository at this commit"),
    "always 500": ({"file_status_always": 500}, r"server error \(HTTP 500\) \(gave up after 3 tries\)$"),
    "connection drop": (
        {"drop_connections": -1},
        r"connection failed or dropped .*\(gave up after 3 tries\)$",
    ),
    # httpx notices the early close; the direct client counts the bytes it got. Both retry, then give up.
    "truncated body": (
        {"truncate_body": True},
        r"(connection failed or dropped .*|short body: the server sent 4096 of the 8192 bytes asked for) "
        r"\(gave up after 3 tries\)$",
    ),
    "short body": (
        {"short_body": True},
        r"short body: the server sent 4096 of the 8192 bytes asked for \(gave up",
    ),
    "long body": (
        {"long_body": True},
        r"over-long body: the server sent more than the 8192 bytes asked for$",
    ),
    "wrong content-length": (
        {"wrong_content_length": True},
        r"Content-Length 8191 disagrees with the 8192-byte",
    ),
    "wrong content-range": (
        {"wrong_content_range": True},
        r"asked for bytes \d+-\d+ but the server sent \d+-\d+",
    ),
    "redirect loop": ({"redirect_loop": True}, r"redirect loop \(more than 8 redirects\)$"),
    "gzip body": (
        {"content_encoding": "gzip"},
        r"the server sent a gzip-encoded body despite Accept-Encoding",
    ),
    "other commit": ({"wrong_commit": True}, r"the server answered for commit 000000000000, not the pinned"),
    "ignored range": (
        {"ignore_range": True},
        r"ignored the byte-range request \(HTTP 200 with the whole \d+-byte",
    ),
}


@pytest.mark.parametrize("fault", list(READ_FAULTS))
def test_faults_while_reading(
    hub: FakeHub, fault: str, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    switches, pattern = READ_FAULTS[fault]
    monkeypatch.setattr(HubSource, "MAX_UNRANGED_BODY", 1024)
    with open_hub(hub, "org/private", token=TOKEN, direct_ranges=direct) as source:
        assert (source._direct is not None) is direct
        info = source.tensors()["head.weight"]
        for key, value in switches.items():
            setattr(hub.faults, key, value)
        hub.reset_counters()
        with pytest.raises(RemoteError) as caught:
            source.read(info)
    text = _assert_clean(caught.value)
    assert re.search(pattern, text), text
    assert text.startswith(f"org/private@{hub.repos['org/private'].refs['main'][:12]}/{SHARD2}")
    if "gave up after 3" in pattern:
        assert len(hub.file_requests()) == 3  # bounded retries, no more


def test_faults_while_opening(hub: FakeHub) -> None:
    hub.faults.api_status_always = 503
    with pytest.raises(RemoteError) as caught:
        open_hub(hub, "org/private", token=TOKEN)
    assert re.fullmatch(
        r"org/private@main: server error \(HTTP 503\) \(gave up after 3 tries\)", _assert_clean(caught.value)
    )
    hub.faults.api_status_always = None
    hub.faults.missing_files = {SHARD1}
    with pytest.raises(RemoteError, match=f"/{SHARD1}: file not found"):
        open_hub(hub, "org/private", token=TOKEN)


def test_timeout_is_retried_then_reported(hub: FakeHub, direct: bool) -> None:
    with open_hub(hub, "org/private", token=TOKEN, timeout=0.2, retries=2, direct_ranges=direct) as source:
        hub.faults.stall_s = 1.0
        with pytest.raises(RemoteError) as caught:
            source.read(source.tensors()["ids"])
    assert re.search(r"timed out after 0\.2s .*\(gave up after 2 tries\)$", _assert_clean(caught.value))


def test_unreachable_endpoint() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError) as caught:
        HubSource.open("org/x", endpoint=f"http://127.0.0.1:{port}", token=TOKEN, retries=2, backoff=0.001)
    assert re.search(
        rf"cannot reach http://127\.0\.0\.1:{port} .*\(gave up after 2 tries\)$", _assert_clean(caught.value)
    )


def test_transient_failures_are_retried(hub: FakeHub, sharded_dir: Path, direct: bool) -> None:
    local = LocalSource(sharded_dir)
    hub.faults.api_statuses = [500, 502]
    hub.faults.file_statuses = [500]
    with open_hub(hub, "org/private", token=TOKEN, retries=4, direct_ranges=direct) as source:
        hub.faults.file_statuses = [503, 500]
        hub.faults.drop_connections = 1
        got = source.read(source.tensors()["head.weight"])
    assert _bits(got) == _bits(local.read(local.tensors()["head.weight"]))
    assert (
        hub.faults.api_statuses == [] and hub.faults.file_statuses == [] and hub.faults.drop_connections == 0
    )
    local.close()


# ------------------------------------------------------------------------------------ download / offline


def test_download_mode_then_offline(
    hub: FakeHub, sharded_dir: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalSource(sharded_dir)
    sha = hub.repos["org/private"].refs["main"]
    with open_hub(hub, "org/private", token=TOKEN, download=True) as source:
        assert _layout(source.tensors()) == _layout(local.tensors())
        assert {i.file for i in source.tensors().values()} == {SHARD1, SHARD2}
        for name, info in source.tensors().items():
            assert _bits(source.read(info)) == _bits(local.read(local.tensors()[name])), name
            source.release(info)
        assert source.config() == {"model_type": "toy", "hidden_size": 512}
        assert source.describe()["resolved"] == f"org/private@{sha}"
    snapshot = hf_env / "models--org--private" / "snapshots" / sha
    assert (snapshot / SHARD1).is_file() and (snapshot / SHARD2).is_file()

    # Offline: the cache alone answers, and the server is never asked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.faults.api_status_always = hub.faults.file_status_always = 500
    hub.reset_counters()
    for spec in ("org/private", f"org/private@{sha}"):
        with open_hub(hub, spec) as offline:
            assert offline.describe()["resolved"] == f"org/private@{sha}"
            assert _layout(offline.tensors()) == _layout(local.tensors())
            info = offline.tensors()["head.weight"]
            assert _bits(offline.read(info)) == _bits(local.read(local.tensors()["head.weight"]))
            assert offline.config() == {"model_type": "toy", "hidden_size": 512}
    assert hub.requests == []

    (snapshot / SHARD2).unlink()
    with pytest.raises(RemoteError) as caught:
        open_hub(hub, "org/private")
    text = _assert_clean(caught.value)
    assert (
        f"org/private@{sha[:12]}/{SHARD2}: offline mode (HF_HUB_OFFLINE=1) and this file is not in the local cache"
        in text
    )
    with pytest.raises(
        RemoteError, match=r"org/sharded@main: offline mode \(HF_HUB_OFFLINE=1\) and this revision is not in"
    ):
        open_hub(hub, "org/sharded")
    local.close()


def test_download_mode_faults(hub: FakeHub) -> None:
    hub.faults.missing_files = {SHARD2}
    with pytest.raises(RemoteError) as caught:
        open_hub(hub, "org/private", token=TOKEN, download=True)
    assert re.search(rf"/{SHARD2}: file not found in the repository", _assert_clean(caught.value))
    hub.faults.missing_files = set()
    with pytest.raises(RemoteError) as caught:
        open_hub(hub, "org/gated", token=WRONG_TOKEN, download=True)
    assert re.search(r"access denied \(HTTP 403\)", _assert_clean(caught.value))
    # huggingface_hub retries a transient 5xx itself (with waits of seconds, too slow to test exhausting).
    hub.faults.file_statuses = [500]
    with open_hub(hub, "org/private", token=TOKEN, download=True) as source:
        assert len(source.tensors()) == 9


# ------------------------------------------------------------------------------------------------- https


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_hub(sharded_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cert, key = _certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    close_session()  # huggingface_hub builds its client (and trust store) once per process
    try:
        with FakeHub(token=TOKEN, tls=context) as server:
            server.add_commit("org/sharded", files_from_dir(sharded_dir))
            yield server
    finally:
        close_session()


def test_https_hub_with_redirects_to_another_origin(
    tls_hub: FakeHub, sharded_dir: Path, direct: bool
) -> None:
    assert tls_hub.endpoint.startswith("https://")
    local = LocalSource(sharded_dir)
    tls_hub.faults.redirect = True
    with open_hub(tls_hub, token=TOKEN, direct_ranges=direct, part_bytes=8192) as source:
        for name, info in source.tensors().items():
            assert _bits(source.read(info)) == _bits(local.read(local.tensors()[name])), name
    cdn = [r for r in tls_hub.file_requests() if r["kind"] == "cdn"]
    assert len(cdn) > 16 and all(r["authorization"] is None for r in cdn)
    local.close()


def test_https_hub_with_an_untrusted_certificate(tls_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    close_session()
    with pytest.raises(RemoteError) as caught:
        open_hub(tls_hub, token=TOKEN, retries=1)
    assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", _assert_clean(caught.value))


def test_a_configured_proxy_routes_ranges_through_httpx(
    monkeypatch: pytest.MonkeyPatch, hub: FakeHub
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with open_hub(hub) as source:
        assert source._direct is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    with open_hub(hub) as source:
        assert source._direct is None  # httpx honours the proxy settings; the direct client does not
        source.read(source.tensors()["ids"])


def test_config_is_fetched_only_when_ties_can_matter(tmp_path: Path) -> None:
    # tie_word_embeddings only decides how an output head and the embedding pair up: with filters that leave
    # both out, no config.json request is made, and the bytes are the headers plus the selected tensors.
    from weightdiff.realworld import plan_for

    d = tmp_path / "tied"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.w": torch.randn(4, 4, generator=g),
        "lm_head.weight": torch.randn(10, 4, generator=g),
    }
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    with FakeHub() as hub:
        hub.add_commit("org/tied", files_from_dir(d))
        cases = [
            (["model.layers.0.*"], False),
            ([], True),
            (["lm_head.weight"], True),
            (["*embed_tokens*"], True),
        ]
        for include, fetched in cases:
            hub.reset_counters()
            with open_hub(hub, "org/tied") as base, open_hub(hub, "org/tied") as tuned:
                plan = plan_for(base, tuned, include=include)
            asked = any(r["path"].endswith("/config.json") for r in hub.file_requests())
            assert asked == fetched, include
            local = LocalSource(d)
            expected = plan_for(local, local, include=include)
            local.close()
            assert [p.name for p in plan.pairs] == [p.name for p in expected.pairs], include
