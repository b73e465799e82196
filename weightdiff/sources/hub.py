"""Checkpoints on the Hugging Face Hub, read without downloading them.

``HubSource`` opens a model repository named ``org/name``, ``org/name@revision`` or
``hf://org/name@revision``. It resolves the revision to a commit SHA once and uses that SHA for every later
request, so a branch that moves during a run cannot mix two versions of a checkpoint. It then plans the
checkpoint exactly like the local source (``model.safetensors.index.json``, else ``model.safetensors``, else
the repository's top-level ``*.safetensors`` files; pickle-only repositories are refused) and reads each
shard's 8-byte header length and JSON header with HTTP Range requests. ``read`` fetches exactly one tensor's
byte range, in parts fetched concurrently by a small thread pool, straight into memory: nothing is written
to disk, and only the headers plus the tensors actually compared cross the network.

With ``download=True`` the needed files are fetched into the normal Hugging Face cache with
``hf_hub_download`` and read like local files. In offline mode (``HF_HUB_OFFLINE=1``) the source reads that
cache only and names the first file it is missing.

Every network or Hub problem becomes a one-line ``RemoteError`` that names the repository, the file and the
problem. Transient failures (connection errors, timeouts, HTTP 429/5xx, a body cut short) are retried with a
bounded exponential backoff; answers that are wrong rather than late (a server that ignores the range, a
body longer than asked, a Content-Length or Content-Range that disagrees with the request) fail at once,
because no tensor is ever built from bytes whose length or position is not exactly what was asked for. The
token is sent only to the Hub endpoint (never to the storage host a download is redirected to) and never
appears in a message, an exception or ``describe()``.

This module does not compare tensors, keep tensor data once it has been returned, write anything outside
the Hugging Face cache (nothing at all when streaming), or open dataset and space repositories.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import mmap
import os
import re
import ssl
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import huggingface_hub
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from weightdiff.errors import (
    CheckpointFormatError,
    InputError,
    RemoteError,
    UnsupportedCheckpointError,
    WeightdiffError,
)
from weightdiff.sources import direct
from weightdiff.sources.base import Source, bytes_to_tensor, load_json_config
from weightdiff.sources.format import TensorInfo, header_length, parse_header
from weightdiff.sources.local import CONVERT_HINT, INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, LocalSource

if TYPE_CHECKING:
    import torch

try:  # recent huggingface_hub releases depend on ``httpx2``, 1.x on ``httpx``; the two APIs are the same.
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    try:
        import httpx  # type: ignore[no-redef]
    except ImportError:
        httpx = None  # type: ignore[assignment]


log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
DEFAULT_TIMEOUT_S = 30.0
#: Tensors larger than this are fetched as several range requests in parallel.
DEFAULT_PART_BYTES = 16 * 1024 * 1024
DEFAULT_WORKERS = 4
#: Bytes of returned download buffers kept for reuse (see HubSource.read_buffer).
SPARE_BYTES = 512 * 1024 * 1024
#: The Hub answers with one redirect (to its storage CDN); a handful more allows for mirrors, not loops.
DEFAULT_MAX_REDIRECTS = 8
#: Largest JSON file (index, config) we fetch whole; real ones are well under a megabyte.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Files whose name marks a path, not a repository, when they end a would-be ``org/name``.
_FILE_SUFFIXES = (".safetensors", ".json", ".gguf", *PICKLE_SUFFIXES)

# A Hub repository name part: word characters, '-' and '.', starting and ending with a word character
# (the rule huggingface_hub's validate_repo_id applies), at most 96 characters.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_SPEC_RE = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?", re.ASCII)
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: Content-Encodings a whole JSON file may arrive in, with zlib's window bits for each (gzip and zlib
#: streams, as the HTTP "deflate" coding is).
_ZLIB_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


# --------------------------------------------------------------------------------------------------- specs


def looks_like_repo_id(spec: str) -> bool:
    """Whether ``spec`` names a Hub model (``hf://...``, ``org/name`` or ``org/name@revision``).

    ``org/model.safetensors``-like strings are not taken for repo ids: they are far more likely a mistyped
    local path, and the "no such file" error is the useful answer for those.
    """
    if spec.startswith("hf://"):
        return True
    m = _SPEC_RE.fullmatch(spec)
    if m is None:
        return False
    repo = m["repo"]
    if "--" in repo or ".." in repo:
        return False
    return not repo.lower().endswith(_FILE_SUFFIXES)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``org/name[@revision]`` or ``hf://org/name[@revision]`` into (repo id, revision or None)."""
    body = spec[len("hf://") :].rstrip("/") if spec.startswith("hf://") else spec
    if body.split("/", 1)[0] in ("datasets", "spaces") and body.count("/") >= 2:
        raise InputError(f"{spec}: only model repositories can be compared, not datasets or spaces")
    m = _SPEC_RE.fullmatch(body)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or (m["rev"] is not None and ".." in m["rev"]):
        raise InputError(
            f"{spec}: not a Hub model id; expected org/name, org/name@revision or hf://org/name@revision"
        )
    return m["repo"], m["rev"]


# ------------------------------------------------------------------------------------------------- helpers


class _Transient(Exception):
    """A failure worth retrying (network trouble, HTTP 429/5xx, a body cut short)."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.retry_after = retry_after


class _Secret:
    """A token that shows as ``<hidden token>`` in any repr, so a debug dump of a source cannot leak it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    @classmethod
    def wrap(cls, value: str | None) -> _Secret | None:
        return cls(value) if value else None

    def __repr__(self) -> str:
        return "<hidden token>"

    __str__ = __repr__


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _describe_exc(exc: BaseException) -> str:
    text = _one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_offline() -> bool:
    # constants.HF_HUB_OFFLINE is read when huggingface_hub is imported; the environment is read again here so
    # that a caller (or a test) setting HF_HUB_OFFLINE later is still obeyed.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclasses.dataclass(eq=False)
class _Lent:
    """A byte range lent by ``read_buffer``: how many lenders hold it, and its buffer once downloaded."""

    lenders: int = 1
    buf: memoryview | None = None
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


def _new_buffer(n: int) -> memoryview:
    # Anonymous memory that the kernel maps and zeroes in one call (MAP_POPULATE, Linux): bytearray(n) costs
    # a memset on top of one page fault per 4 KiB page, which was the largest single cost of a loopback
    # download. (numpy.empty was slower still: it asks for transparent huge pages, which stall on compaction.)
    if os.name == "nt":  # pragma: no cover - Windows has no anonymous-map flags
        return memoryview(bytearray(n))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, max(n, 1), flags=flags))[:n]


def _proxy_configured() -> bool:
    # httpx honours the same *_PROXY variables (trust_env); NO_PROXY alone configures nothing.
    return any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies_environment())


def _default_endpoint() -> str:
    # Like huggingface_hub, HF_ENDPOINT picks the server; unlike its import-time constant, it is read now.
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _find_token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        return huggingface_hub.get_token()
    except Exception:  # a broken login store must not stop public downloads
        return None


def _unsafe_repo_path(name: str) -> bool:
    """A file name from an index that could escape the repository (absolute, '..', a drive or a backslash)."""
    path = PurePosixPath(name)
    return (
        not name
        or path.is_absolute()
        or ".." in path.parts
        or "\\" in name
        or re.match(r"[A-Za-z]:", name) is not None
    )


def _shards_from_index(raw: bytes, label: str) -> tuple[list[str], dict[str, str]]:
    """Shard file names (sorted) and the weight map of a ``model.safetensors.index.json``, validated."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{label}: invalid index file ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{label}: invalid index file (no 'weight_map' of tensor name -> shard)")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if _unsafe_repo_path(shard):
            raise CheckpointFormatError(
                f"{label}: shard {shard!r} lies outside the checkpoint repository; refusing to read it"
            )
    return shards, weight_map


def _weights_from_listing(names: list[str], label: str) -> list[str]:
    """Mirror of the local directory rule for a repository without index or model.safetensors."""
    top = sorted(n for n in names if "/" not in n)
    weights = [n for n in top if n.lower().endswith(".safetensors")]
    if weights:
        return weights
    pickles = [n for n in top if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnsupportedCheckpointError(
            f"{label}: holds only pickle files ({', '.join(pickles[:3])}); {CONVERT_HINT}"
        )
    raise InputError(f"{label}: no safetensors files in this repository")


# ------------------------------------------------------------------------------------------------- source


@dataclasses.dataclass(frozen=True)
class _Ask:
    """One range read: bytes [start, end) of ``file`` into ``out``; ``size`` is the file's size as its header
    was read (None before that); ``clamp_ok``, see ``HubSource._fetch``."""

    file: str
    start: int
    end: int
    out: memoryview
    size: int | None
    clamp_ok: bool

    @property
    def range(self) -> str:
        """The Range header's value."""
        return f"bytes={self.start}-{self.end - 1}"


class HubSource(Source):
    """A model repository on the Hugging Face Hub (see the module docstring).

    Use ``HubSource.open(spec, ...)``. ``bytes_transferred`` counts the body bytes received by this source's
    own requests (safetensors headers, index, config and tensor data; in download mode, nothing: the files are
    fetched by huggingface_hub).
    """

    #: A server that ignores a Range request sends the whole file; bodies up to this size are sliced instead
    #: of refused (small files only, so that a misconfigured proxy cannot make us download a 10 GB shard).
    MAX_UNRANGED_BODY = 1024 * 1024

    def __init__(
        self,
        spec: str,
        revision: str | None = None,
        token: str | None = None,
        download: bool = False,
        *,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        part_bytes: int = DEFAULT_PART_BYTES,
        workers: int = DEFAULT_WORKERS,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        direct_ranges: bool | None = None,
    ) -> None:
        self.given = spec
        self.repo_id, spec_revision = parse_spec(spec)
        self.revision = revision or spec_revision or "main"
        if ".." in self.revision or any(c.isspace() for c in self.revision):
            raise InputError(f"{spec}: invalid revision {self.revision!r}")
        self.endpoint = (endpoint or _default_endpoint()).rstrip("/")
        self.cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
        self.offline = _is_offline() if offline is None else offline
        self.mode = "offline" if self.offline else "download" if download else "stream"
        self.retries = max(1, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.timeout = float(timeout)
        self.part_bytes = max(1, int(part_bytes))
        self.workers = max(1, int(workers))
        self.max_redirects = int(max_redirects)
        self.bytes_transferred = 0
        self.sha: str | None = None
        self.files: list[str] = []
        self.metadata: dict[str, str] = {}
        # Kept private and out of every message; see _scrub.
        self.__token = _Secret.wrap(None if self.offline else _find_token(token))
        self._lock = threading.Lock()
        self._tensors: dict[str, TensorInfo] = {}
        self._sizes: dict[str, int | None] = {}
        self._siblings: list[str] | None = None
        self._locals: dict[str, tuple[LocalSource, str]] = {}
        self._snapshot: Path | None = None
        self._config: dict[str, Any] | None = None
        self._config_loaded = False
        self._client: Any = None
        self._direct: direct.DirectClient | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Download buffers lent by read_buffer (by byte range) and returned ones kept for reuse (by size).
        self._lent: dict[tuple[str, int, int], _Lent] = {}  # by byte range
        self._spare: list[memoryview] = []
        self._spare_bytes = 0
        try:
            if self.mode == "offline":
                self._open_offline()
            else:
                if httpx is None:  # pragma: no cover - huggingface_hub >= 1.0 always brings one
                    raise InputError(
                        "reading from the Hub needs huggingface_hub >= 1.0 (for its httpx client)"
                    )
                # Both online modes need the client (download mode for the X-Repo-Commit fallback only).
                self._client = httpx.Client(
                    verify=direct.default_ssl_context(httpx),
                    follow_redirects=True,
                    max_redirects=self.max_redirects,
                    timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                    # identity: a gzip-encoded answer has no meaningful byte ranges (CDNs may ignore them).
                    headers={"Accept-Encoding": "identity", "User-Agent": "weightdiff"},
                    limits=httpx.Limits(max_connections=self.workers + 2),
                )
                if self.mode == "stream":
                    # Range reads go straight into their buffers over plain keep-alive connections (see
                    # sources/direct.py); httpx carries them instead when a proxy is configured, which
                    # the direct client does not speak to.
                    if direct_ranges if direct_ranges is not None else not _proxy_configured():
                        self._direct = direct.DirectClient(
                            timeout=self.timeout,
                            max_redirects=self.max_redirects,
                            ssl_context=direct.default_ssl_context(httpx, for_direct=True),
                            headers={"Accept-Encoding": "identity", "User-Agent": "weightdiff"},
                        )
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.workers, thread_name_prefix="weightdiff-hub"
                    )
                self._resolve()
                self._open_online()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        spec: str,
        revision: str | None = None,
        token: str | None = None,
        download: bool = False,
        **options: Any,
    ) -> HubSource:
        """Open ``spec`` (``org/name[@rev]`` or ``hf://org/name[@rev]``); ``revision`` overrides the spec's.

        ``options``: ``endpoint`` (default ``HF_ENDPOINT`` / huggingface.co), ``cache_dir`` (default the HF
        cache), ``offline`` (default ``HF_HUB_OFFLINE``), ``retries``, ``backoff`` (first delay in seconds,
        doubled per try), ``timeout``, ``part_bytes``, ``workers``, ``max_redirects`` and ``direct_ranges``
        (read tensor ranges with the direct client; default: yes unless a proxy is configured).
        """
        return cls(spec, revision=revision, token=token, download=download, **options)

    # ------------------------------------------------------------------------------------------- interface

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def read(self, info: TensorInfo) -> torch.Tensor:
        if info.file in self._locals:
            local, path = self._locals[info.file]
            return local.read(dataclasses.replace(info, file=path))
        # A tensor may outlive release(), so it gets a buffer of its own, never a recycled one.
        return bytes_to_tensor(self._stream_into(info, _new_buffer(info.nbytes)), info)

    def read_buffer(self, info: TensorInfo) -> memoryview:
        if info.file in self._locals:
            local, path = self._locals[info.file]
            return local.read_buffer(dataclasses.replace(info, file=path))
        # Buffers lent here come back on release() and are reused for later tensors of the same or a somewhat
        # smaller size: fresh memory costs a page fault per page on first write, which at gigabytes per second
        # is a large part of the cost of a download.
        # Lenders are counted per byte range: a range lent twice at once (a tied head and embedding) shares one
        # download, and none of its buffers is reused before the last lender has released it.
        key = (info.file, info.start, info.end)
        n = info.nbytes
        with self._lock:
            entry = self._lent.get(key)
            if entry is None:
                # Registered before the download starts, so that a second lender asking meanwhile (the two
                # sides of a pair are fetched at once, and an adapter's untouched tensors come from the base)
                # waits for this download instead of starting its own.
                entry = self._lent[key] = _Lent()
                buf = self._take_spare(n)
                mine = True
            else:
                entry.lenders += 1
                mine = False
        if not mine:
            entry.ready.wait()
            if entry.error is None and entry.buf is not None:
                return entry.buf[:n]
            self.release(info)
            raise entry.error if entry.error is not None else AssertionError("lent range without a buffer")
        try:
            buf = buf if buf is not None else _new_buffer(n)
            view = self._stream_into(info, buf[:n])
        except BaseException as exc:
            entry.error = exc
            entry.ready.set()
            self.release(info)
            raise
        entry.buf = buf
        entry.ready.set()
        return view

    def _take_spare(self, n: int) -> memoryview | None:
        # Best fit among the spares of n to 2n bytes (called with the lock held).
        fits = [b for b in self._spare if n <= len(b) <= 2 * n]
        if not fits:
            return None
        buf = min(fits, key=len)
        self._spare.remove(buf)
        self._spare_bytes -= len(buf)
        return buf

    def _stream_into(self, info: TensorInfo, buf: memoryview) -> memoryview:
        if info.file not in self._sizes:
            raise InputError(
                f"{self._label()}: tensor {info.name!r} names file {info.file!r}, not part of this checkpoint"
            )
        if info.nbytes:
            self._fetch_parts(info.file, info.start, info.end, buf)
        return buf

    def release(self, info: TensorInfo) -> None:
        if info.file in self._locals:
            local, path = self._locals[info.file]
            local.release(dataclasses.replace(info, file=path))
            return
        key = (info.file, info.start, info.end)
        with self._lock:
            entry = self._lent.get(key)
            if entry is None:
                return  # a tensor from read(): it owns its buffer, freed with it
            entry.lenders -= 1
            if entry.lenders > 0:
                return
            del self._lent[key]
            buf = entry.buf
            if buf is not None and self._spare_bytes + len(buf) <= SPARE_BYTES:
                self._spare.append(buf)
                self._spare_bytes += len(buf)

    def describe(self) -> dict[str, str]:
        return {"kind": "hub", "given": self.given, "resolved": f"{self.repo_id}@{self.sha}"}

    def config(self) -> dict[str, Any] | None:
        # config.json is advisory (architecture hints): failing to get it means "no config", never an error.
        if not self._config_loaded:
            self._config_loaded = True
            try:
                self._config = self._load_config()
            except WeightdiffError as exc:
                log.debug("no config for %s: %s", self._label(), exc)
                self._config = None
        return self._config

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        for local, _path in self._locals.values():
            local.close()

    def __repr__(self) -> str:
        return f"HubSource({self.repo_id!r}, sha={self.sha!r}, mode={self.mode!r})"

    # -------------------------------------------------------------------------------------------- messages

    def _label(self, file: str | None = None) -> str:
        where = f"{self.repo_id}@{self.sha[:12] if self.sha else self.revision}"
        return f"{where}/{file}" if file else where

    def _scrub(self, text: str) -> str:
        token = self.__token
        return text.replace(token.value, "<token>") if token else text

    def _error(self, message: str) -> RemoteError:
        return RemoteError(self._scrub(_one_line(message)))

    def _token_hint(self) -> str:
        return "pass --token, set HF_TOKEN, or log in with `hf auth login`"

    def _status_problem(self, status: int, error_code: str | None, file: str | None) -> str:
        """The one-line explanation of a Hub error answer (shared by API calls and file requests)."""
        has_token = self.__token is not None
        page = f"{self.endpoint}/{self.repo_id}"
        if error_code == "RevisionNotFound":
            return f"{self.repo_id}: revision {self.revision!r} not found (HTTP {status})"
        if error_code == "GatedRepo" or status == 403:
            who = (
                "a token of an account that has been granted access"
                if has_token
                else f"a token ({self._token_hint()})"
            )
            return (
                f"{self._label(file)}: access denied (HTTP {status}): the model is gated or restricted; "
                f"request access on {page} and use {who}"
            )
        if error_code == "RepoNotFound" or (status == 404 and file is None):
            extra = (
                "or the token has no access to it"
                if has_token
                else f"if it is private or gated, provide a token: {self._token_hint()}"
            )
            return f"{self.repo_id}: repository not found on {self.endpoint} (HTTP {status}; {extra})"
        if status == 401:
            extra = (
                "the token was rejected or has no access to this repository"
                if has_token
                else f"this repository needs a token: {self._token_hint()}"
            )
            return f"{self._label(file)}: authentication required (HTTP 401): {extra}"
        if status == 404:
            return f"{self._label(file)}: file not found in the repository at this commit (HTTP 404)"
        return f"{self._label(file)}: unexpected answer HTTP {status} from {self.endpoint}"

    # ------------------------------------------------------------------------------------------- retrying

    def _with_retries(self, what: str, attempt: Callable[[], T], tries: int | None = None) -> T:
        """Run ``attempt`` until it succeeds, retrying ``_Transient`` failures with exponential backoff."""
        tries = self.retries if tries is None else tries
        for n in range(1, tries + 1):
            try:
                return attempt()
            except _Transient as exc:
                if n == tries:
                    done = "1 try" if n == 1 else f"{n} tries"
                    raise self._error(f"{what}: {exc.problem} (gave up after {done})") from None
                delay = min(self.backoff * 2 ** (n - 1), MAX_BACKOFF_S)
                if exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), MAX_BACKOFF_S)
                log.debug(
                    "%s: %s; retrying in %.2fs (try %d of %d)",
                    what,
                    self._scrub(exc.problem),
                    delay,
                    n,
                    tries,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _hub_call(self, what: str, file: str | None, call: Callable[[], T], tries: int | None = None) -> T:
        """Run a huggingface_hub call, mapping its exceptions to ``_Transient`` or ``RemoteError``."""

        def attempt() -> T:
            try:
                return call()
            except HfHubHTTPError as exc:
                raise self._hub_http_error(exc, file) from None
            except LocalEntryNotFoundError as exc:
                # hf_hub_download hides the real failure (Hub down, connection refused) behind "not in cache".
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, HfHubHTTPError):
                    raise self._hub_http_error(cause, file) from None
                if cause is not None and httpx is not None and isinstance(cause, httpx.TransportError):
                    raise _Transient(f"cannot reach {self.endpoint} ({_describe_exc(cause)})") from None
                raise self._error(f"{what}: {_describe_exc(exc)}") from None
            except Exception as exc:
                if httpx is not None and isinstance(exc, httpx.TooManyRedirects):
                    raise self._error(
                        f"{what}: redirect loop (more than {self.max_redirects} redirects)"
                    ) from None
                if httpx is not None and isinstance(exc, httpx.TransportError):
                    raise _Transient(f"cannot reach {self.endpoint} ({_describe_exc(exc)})") from None
                if isinstance(exc, HFValidationError):  # huggingface_hub's own repo id / revision checks
                    raise InputError(self._scrub(f"{what}: {_one_line(exc)}")) from None
                if isinstance(exc, OSError):
                    raise self._error(f"{what}: {_describe_exc(exc)}") from None
                if isinstance(exc, (ValueError, KeyError, TypeError)):  # JSON that is not a Hub answer
                    raise self._error(
                        f"{what}: malformed answer from {self.endpoint} ({_describe_exc(exc)})"
                    ) from None
                raise

        return self._with_retries(what, attempt, tries)

    def _hub_http_error(self, exc: Any, file: str | None) -> Exception:
        response: Any = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status is None:
            return self._error(f"{self._label(file)}: {_describe_exc(exc)}")
        if status == 429 or status >= 500:
            return _Transient(f"server error (HTTP {status})", _retry_after(response.headers))
        return self._error(self._status_problem(status, response.headers.get("X-Error-Code"), file))

    # ------------------------------------------------------------------------------------------- planning

    def _resolve(self) -> None:
        """Pin the revision to its commit SHA and learn the repository's file list."""
        api = HfApi(endpoint=self.endpoint)
        info = self._hub_call(
            f"{self.repo_id}@{self.revision}",
            None,
            lambda: api.model_info(
                self.repo_id,
                revision=self.revision,
                token=self.__token.value if self.__token else False,
                timeout=self.timeout,
            ),
        )
        siblings = getattr(info, "siblings", None)
        if siblings is not None:
            self._siblings = [s.rfilename for s in siblings]
        sha = getattr(info, "sha", None)
        if not (isinstance(sha, str) and _SHA_RE.fullmatch(sha)):
            sha = self._commit_from_header()
        self.sha = sha

    def _commit_from_header(self) -> str:
        """The commit a revision points to, from the X-Repo-Commit header (for servers whose API omits it)."""
        probes = [INDEX_NAME, SINGLE_NAME]
        if self._siblings:
            probes = [n for n in probes if n in self._siblings] or self._siblings[:1]

        def attempt() -> str:
            for probe in probes:
                url = hf_hub_url(self.repo_id, probe, revision=self.revision, endpoint=self.endpoint)
                try:
                    response = self._http().head(url, headers=self._auth(url), follow_redirects=False)
                except httpx.TransportError as exc:
                    raise _Transient(f"cannot reach {self.endpoint} ({_describe_exc(exc)})") from None
                sha = response.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT, "")
                if _SHA_RE.fullmatch(sha):
                    return sha
                if response.status_code >= 400 and response.status_code != 404:
                    self._raise_status(response, probe)
            raise self._error(
                f"{self.repo_id}@{self.revision}: the Hub did not say which commit this revision is "
                "(no sha in the model info, no X-Repo-Commit header)"
            )

        return self._with_retries(f"{self.repo_id}@{self.revision}", attempt)

    def _plan(self, load_index: Callable[[], bytes | None]) -> tuple[list[str], dict[str, str] | None]:
        """The weight files to read and the index's weight map, mirroring local.find_weight_files."""
        names = self._siblings
        if names is None or INDEX_NAME in names:
            raw = load_index()
            if raw is not None:
                shards, weight_map = _shards_from_index(raw, self._label(INDEX_NAME))
                for shard in shards:
                    if names is not None and shard not in names:
                        raise InputError(
                            f"{self._label(INDEX_NAME)}: names shard {shard!r}, which does not exist"
                        )
                return shards, weight_map
        if names is None or SINGLE_NAME in names:
            return [SINGLE_NAME], None
        return _weights_from_listing(names, self._label()), None

    def _open_online(self) -> None:
        if self.mode == "stream":
            self.files, weight_map = self._plan(self._get_index_streaming)
            headers = self._map_files(self._read_remote_header, self.files)
            for file, (infos, meta, size) in zip(self.files, headers, strict=True):
                self._sizes[file] = size
                self._add(file, infos, meta)
        else:
            self.files, weight_map = self._plan(lambda: Path(self._download(INDEX_NAME)).read_bytes())
            for file in self.files:
                self._add_local(file, Path(self._download(file)))
            self._remember_ref()
        self._check_weight_map(weight_map)

    def _open_offline(self) -> None:
        """Cache-only planning; the HF cache is models--org--name/{refs/<rev>, snapshots/<sha>/<file>}."""
        storage = self.cache_dir / f"models--{self.repo_id.replace('/', '--')}"
        sha: str | None = self.revision if _SHA_RE.fullmatch(self.revision) else None
        ref = storage / "refs" / self.revision
        if sha is None and ref.is_file():
            sha = ref.read_text(encoding="utf-8").strip()
        hint = "run once online with --download to cache it, or unset HF_HUB_OFFLINE"
        if sha is None or not (storage / "snapshots" / sha).is_dir():
            raise self._error(
                f"{self.repo_id}@{self.revision}: offline mode (HF_HUB_OFFLINE=1) and this revision is not in the "
                f"local cache {self.cache_dir}; {hint}"
            )
        self.sha = sha
        snapshot = self._snapshot = storage / "snapshots" / sha
        weight_map = None
        if (snapshot / INDEX_NAME).is_file():
            self.files, weight_map = _shards_from_index(
                (snapshot / INDEX_NAME).read_bytes(), self._label(INDEX_NAME)
            )
        elif (snapshot / SINGLE_NAME).is_file():
            self.files = [SINGLE_NAME]
        else:
            listing = [p.name for p in snapshot.iterdir() if p.is_file()]
            if not any(n.lower().endswith((".safetensors", *PICKLE_SUFFIXES)) for n in listing):
                raise self._error(
                    f"{self._label()}: offline mode (HF_HUB_OFFLINE=1) and no weight files of this revision are in "
                    f"the local cache {snapshot}; {hint}"
                )
            self.files = _weights_from_listing(listing, self._label())
        for file in self.files:
            path = snapshot / file
            if not path.is_file():
                raise self._error(
                    f"{self._label(file)}: offline mode (HF_HUB_OFFLINE=1) and this file is not in the local cache "
                    f"({path}); {hint}"
                )
            self._add_local(file, path)
        self._check_weight_map(weight_map)

    def _add(self, file: str, infos: dict[str, TensorInfo], meta: dict[str, str]) -> None:
        self.metadata.update(meta)
        for name, info in infos.items():
            if name in self._tensors:
                raise CheckpointFormatError(
                    f"{self._label(file)}: tensor {name!r} is also stored in {self._tensors[name].file}"
                )
            self._tensors[name] = info

    def _add_local(self, file: str, path: Path) -> None:
        local = LocalSource(path, given=f"{self._label(file)}")
        self._locals[file] = (local, str(path))
        # TensorInfo.file is the name within the repository in every mode, so reports do not depend on where
        # the cache lives.
        infos = {name: dataclasses.replace(info, file=file) for name, info in local.tensors().items()}
        self._add(file, infos, local.metadata)

    def _check_weight_map(self, weight_map: dict[str, str] | None) -> None:
        for name, shard in (weight_map or {}).items():
            info = self._tensors.get(name)
            if info is None or info.file != shard:
                raise CheckpointFormatError(
                    f"{self._label(INDEX_NAME)}: maps tensor {name!r} to {shard}, which does not hold it"
                )

    def _map_files(self, fn: Callable[[str], T], files: list[str]) -> list[T]:
        """``fn`` over ``files``, concurrently when there are several (shard headers are independent)."""
        if self._pool is None or len(files) < 2:
            return [fn(f) for f in files]
        return list(self._pool.map(fn, files))

    # ---------------------------------------------------------------------------------------- downloading

    def _download(self, file: str) -> str:
        # One try: hf_hub_download already retries connection errors and 5xx with its own bounded backoff, and
        # retrying around it would multiply the waits.
        return self._hub_call(
            self._label(file),
            file,
            lambda: hf_hub_download(
                self.repo_id,
                file,
                revision=self.sha,
                cache_dir=self.cache_dir,
                token=self.__token.value if self.__token else False,
                endpoint=self.endpoint,
                etag_timeout=self.timeout,
            ),
            tries=1,
        )

    def _remember_ref(self) -> None:
        """Record revision -> commit in the cache's refs/ folder, as hf_hub_download does for the revision
        it is given.

        Downloads use the commit SHA (so a moving branch cannot mix versions), which leaves the branch name
        unrecorded, and offline mode could then not find ``org/name@main``. Best effort: a read-only cache
        only costs the offline lookup by name.
        """
        if self.sha is None or self.revision == self.sha:
            return
        ref = self.cache_dir / f"models--{self.repo_id.replace('/', '--')}" / "refs" / self.revision
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != self.sha:
                tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
                tmp.write_text(self.sha, encoding="utf-8")
                os.replace(tmp, ref)
        except OSError as exc:
            log.debug("cannot record %s -> %s in the cache: %s", self.revision, self.sha, exc)

    def _load_config(self) -> dict[str, Any] | None:
        name = "config.json"
        if self._siblings is not None and name not in self._siblings:
            return None
        if self.mode == "offline":
            path = self._snapshot / name if self._snapshot is not None else None
            raw = path.read_bytes() if path is not None and path.is_file() else None
        elif self.mode == "download":
            raw = Path(self._download(name)).read_bytes()
        else:
            raw = self._get_whole(name)
        if raw is None:
            return None
        try:
            return load_json_config(raw.decode("utf-8"), self._label(name))
        except UnicodeDecodeError:
            return None

    # ------------------------------------------------------------------------------------------- streaming

    def _http(self) -> Any:
        if self._client is None:
            raise InputError(f"{self._label()}: source is closed")
        return self._client

    def _url(self, file: str) -> str:
        return hf_hub_url(self.repo_id, file, revision=self.sha or self.revision, endpoint=self.endpoint)

    def _auth(self, url: str) -> dict[str, str]:
        # The token goes to the Hub endpoint only. httpx drops it again if the Hub redirects to another origin
        # (the storage CDN), whose signed URL needs no token.
        if self.__token and url.startswith(self.endpoint + "/"):
            return {"Authorization": f"Bearer {self.__token.value}"}
        return {}

    def _get_index_streaming(self) -> bytes | None:
        # Without a file list (a mirror whose API omits siblings) a missing index is normal, not an error.
        return self._get_whole(INDEX_NAME, missing_ok=self._siblings is None)

    def _read_remote_header(self, file: str) -> tuple[dict[str, TensorInfo], dict[str, str], int | None]:
        """Parse one shard's header from two range requests: the 8-byte length, then the JSON itself."""
        label = self._label(file)
        prefix = bytearray(8)
        got, size = self._fetch(file, 0, 8, memoryview(prefix), clamp_ok=True)
        n = header_length(bytes(prefix[:got]), label, size)
        header = bytearray(n)
        self._fetch(file, 8, 8 + n, memoryview(header), size=size)
        infos, meta = parse_header(bytes(header), label, size)
        return {name: dataclasses.replace(info, file=file) for name, info in infos.items()}, meta, size

    def _fetch_parts(self, file: str, start: int, end: int, out: memoryview) -> None:
        """Fill ``out`` with bytes [start, end) of ``file``; big ranges as parallel part requests."""
        size = self._sizes.get(file)
        bounds = [(s, min(s + self.part_bytes, end)) for s in range(start, end, self.part_bytes)]
        if len(bounds) == 1 or self._pool is None:
            for s, e in bounds:
                self._fetch(file, s, e, out[s - start : e - start], size=size)
            return
        futures = [
            self._pool.submit(self._fetch, file, s, e, out[s - start : e - start], size=size)
            for s, e in bounds
        ]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = next(
            (f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None
        )
        # A part cancelled by close() never ran, so ``out`` is not filled: that is a failure too.
        if failed is not None or any(f.cancelled() for f in futures):
            for fut in futures:
                fut.cancel()
            concurrent.futures.wait(
                futures
            )  # parts already running still write into ``out``: let them finish
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
            raise InputError(f"{self._label(file)}: source closed while reading")

    def _fetch(
        self,
        file: str,
        start: int,
        end: int,
        out: memoryview,
        size: int | None = None,
        clamp_ok: bool = False,
    ) -> tuple[int, int | None]:
        """Fill ``out`` with bytes [start, end) of ``file``, retrying; return (bytes filled, file size).

        ``clamp_ok`` accepts a range that the server cut at the end of a shorter file (only for the 8-byte
        prefix, so that a tiny non-safetensors file gets a format error instead of a network one).
        """
        url = self._url(file)
        ask = _Ask(file, start, end, out, size, clamp_ok)
        return self._with_retries(
            f"{self._label(file)} bytes {start}-{end - 1}", lambda: self._fetch_once(url, ask)
        )

    def _fetch_once(self, url: str, ask: _Ask) -> tuple[int, int | None]:
        if self._direct is not None:
            return self._fetch_direct(url, ask)
        file = ask.file
        headers = {"Range": ask.range, **self._auth(url)}
        try:
            with self._http().stream("GET", url, headers=headers) as response:
                return self._answer(response, ask)
        except httpx.TooManyRedirects:
            raise self._error(
                f"{self._label(file)}: redirect loop (more than {self.max_redirects} redirects)"
            ) from None
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            raise self._error(f"{self._label(file)}: {_describe_exc(exc)}") from None
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out after {self.timeout:g}s ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed or dropped ({_describe_exc(exc)})") from None

    def _fetch_direct(self, url: str, ask: _Ask) -> tuple[int, int | None]:
        client = self._direct
        if client is None:
            raise InputError(f"{self._label()}: source is closed")
        file = ask.file
        try:
            with client.get(url, lambda hop: {"Range": ask.range, **self._auth(hop)}) as response:
                return self._answer(response, ask)
        except direct.TooManyRedirects:
            raise self._error(
                f"{self._label(file)}: redirect loop (more than {self.max_redirects} redirects)"
            ) from None
        except direct.UnsupportedURL as exc:
            raise self._error(f"{self._label(file)}: {_describe_exc(exc)}") from None
        except TimeoutError as exc:
            raise _Transient(f"timed out after {self.timeout:g}s ({type(exc).__name__})") from None
        except http.client.InvalidURL:
            # Permanent, and its message would repeat a signed storage URL: say what, not where.
            raise self._error(f"{self._label(file)}: the server redirected to an invalid URL") from None
        except ssl.SSLCertVerificationError as exc:
            raise self._error(f"{self._label(file)}: {_describe_exc(exc)}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"connection failed or dropped ({_describe_exc(exc)})") from None

    def _answer(self, response: Any, ask: _Ask) -> tuple[int, int | None]:
        """Read one range answer (httpx's or the direct client's) into ``ask.out``; see ``_fetch``."""
        self._check_commit(response, ask.file)
        if response.status_code == 206:
            return self._read_partial(response, ask)
        if response.status_code == 200:
            return self._read_unranged(response, ask)
        if response.status_code == 416 and ask.clamp_ok:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            return 0, int(total) if total.isdigit() else None
        self._raise_status(response, ask.file, ask.start, ask.end)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_commit(self, response: Any, file: str) -> None:
        # Every Hub answer names the commit it served; a different one means the pin was not honoured.
        for r in [*response.history, response]:
            commit = r.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
            if commit and self.sha and commit != self.sha:
                raise self._error(
                    f"{self._label(file)}: the server answered for commit {commit[:12]}, not the pinned {self.sha[:12]}"
                )

    def _raise_status(self, response: Any, file: str | None, start: int = 0, end: int = 0) -> None:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"server error (HTTP {status})", _retry_after(response.headers))
        if status == 416:
            raise self._error(
                f"{self._label(file)}: the server says bytes {start}-{end - 1} lie past the end of the file "
                "(HTTP 416): the file is shorter than its header says"
            )
        raise self._error(self._status_problem(status, response.headers.get("X-Error-Code"), file))

    def _check_identity(self, response: Any, file: str) -> None:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise self._error(
                f"{self._label(file)}: the server sent a {encoding}-encoded body despite Accept-Encoding: identity; "
                "its bytes are not the file's"
            )

    def _read_partial(self, response: Any, ask: _Ask) -> tuple[int, int | None]:
        file, start, end, out, size, clamp_ok = ask.file, ask.start, ask.end, ask.out, ask.size, ask.clamp_ok
        label = self._label(file)
        self._check_identity(response, file)
        content_range = response.headers.get("Content-Range", "")
        m = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
        if m is None:
            raise self._error(f"{label}: HTTP 206 without a valid Content-Range ({content_range!r})")
        first, last = int(m[1]), int(m[2])
        total = int(m[3]) if m[3] != "*" else None
        if size is not None and total is not None and total != size:
            raise self._error(
                f"{label}: the file is now {total} bytes, it was {size} when its header was read"
            )
        want_last = end - 1
        if clamp_ok and total is not None and last == total - 1 < want_last:
            want_last = last
        want = want_last - start + 1
        span = last - first + 1
        # A server may send more than was asked (RFC 9110 lets it align or coalesce ranges): the asked bytes
        # are cut out of the range its Content-Range names, if that range holds them all and is not much
        # larger. Anything else is refused: bytes are only ever taken from where the server says they are.
        wider = (
            first <= start
            and last >= want_last
            and (total is None or last < total)
            and span - want <= max(want, self.MAX_UNRANGED_BODY)
        )
        if (first, last) != (start, want_last) and not wider:
            raise self._error(
                f"{label}: asked for bytes {start}-{end - 1} but the server sent {first}-{last} "
                f"(Content-Range {content_range!r})"
            )
        length = response.headers.get("Content-Length")
        if length is not None and length.strip() != str(span):
            raise self._error(
                f"{label}: Content-Length {length.strip()} disagrees with the {span}-byte range "
                f"{'sent' if span != want else 'requested'} (bytes {first}-{last})"
            )
        if span == want:
            self._drain(response, file, out[:want])
        else:
            sent = memoryview(bytearray(span))
            self._drain(response, file, sent)
            out[:want] = sent[start - first : start - first + want]
        return want, total

    def _read_unranged(self, response: Any, ask: _Ask) -> tuple[int, int | None]:
        file, start, end, out, size, clamp_ok = ask.file, ask.start, ask.end, ask.out, ask.size, ask.clamp_ok
        label = self._label(file)
        self._check_identity(response, file)
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.strip().isdigit() else None
        refusal = (
            "{label}: the server ignored the byte-range request (HTTP 200 with the whole {shown} file instead of "
            "206 Partial Content); refusing to download whole files to read part of them: use --download"
        )
        if total is not None and total > self.MAX_UNRANGED_BODY:
            raise self._error(refusal.format(label=label, shown=f"{total}-byte"))
        whole: bytearray | None = None
        if total is None:
            # No length (a chunked body, or one that ends when the connection closes): read on while the
            # file could still be a small one.
            whole = self._drain_upto(response, self.MAX_UNRANGED_BODY)
            if whole is None:
                raise self._error(refusal.format(label=label, shown="unknown-size"))
            if size is not None and len(whole) < size:
                # Without a length a dropped connection looks like the end of the body: worth another try.
                raise _Transient(f"short body: the server sent {len(whole)} of the {size}-byte file")
            total = len(whole)
        if size is not None and total != size:
            raise self._error(
                f"{label}: the file is now {total} bytes, it was {size} when its header was read"
            )
        if whole is None:
            whole = bytearray(total)
            self._drain(response, file, memoryview(whole))
        stop = min(end, total) if clamp_ok else end
        if stop > total:
            raise self._error(f"{label}: bytes {start}-{end - 1} lie past the end of the {total}-byte file")
        got = max(0, stop - start)
        out[:got] = whole[start:stop]
        return got, total

    def _drain(self, response: Any, file: str, out: memoryview) -> None:
        """Copy the body into ``out``, which must come out exactly full: never a byte more or less."""
        if isinstance(response, direct.DirectResponse):
            self._drain_direct(response, file, out)
            return
        pos = 0
        want = len(out)
        for chunk in response.iter_raw():
            n = len(chunk)
            with self._lock:
                self.bytes_transferred += n
            if pos + n > want:
                raise self._error(
                    f"{self._label(file)}: over-long body: the server sent more than the {want} bytes asked for"
                )
            out[pos : pos + n] = chunk
            pos += n
        if pos != want:
            # A body cut short is usually a dropped connection: worth another try.
            raise _Transient(f"short body: the server sent {pos} of the {want} bytes asked for")

    def _drain_direct(self, response: direct.DirectResponse, file: str, out: memoryview) -> None:
        # The socket fills ``out`` itself; one more byte read past the end tells an over-long body.
        pos = 0
        want = len(out)
        while pos < want:
            n = response.readinto(out[pos:])
            if not n:
                break
            with self._lock:
                self.bytes_transferred += n
            pos += n
        if pos != want:
            raise _Transient(f"short body: the server sent {pos} of the {want} bytes asked for")
        extra = response.readinto(memoryview(bytearray(1)))
        if extra:
            with self._lock:
                self.bytes_transferred += extra
            raise self._error(
                f"{self._label(file)}: over-long body: the server sent more than the {want} bytes asked for"
            )

    def _drain_upto(self, response: Any, limit: int) -> bytearray | None:
        """The whole body of an answer without a length, or None once it runs past ``limit`` bytes."""
        data = bytearray()
        if isinstance(response, direct.DirectResponse):
            buf = memoryview(bytearray(64 * 1024))
            chunks: Any = iter(lambda: bytes(buf[: response.readinto(buf)]), b"")
        else:
            chunks = response.iter_raw()
        for chunk in chunks:
            with self._lock:
                self.bytes_transferred += len(chunk)
            data += chunk
            if len(data) > limit:
                return None
        return data

    def _drain_json(self, response: Any, file: str) -> bytearray:
        """The whole length-less body of a small JSON file (index, config), refused past MAX_JSON_BYTES."""
        data = self._drain_upto(response, MAX_JSON_BYTES)
        if data is None:
            raise self._error(f"{self._label(file)}: too large for a JSON file")
        return data

    def _get_whole(self, file: str, missing_ok: bool = False) -> bytes | None:
        """A small file (index, config) in one plain GET; None when ``missing_ok`` and it does not exist."""
        url = self._url(file)

        def attempt() -> bytes | None:
            try:
                with self._http().stream("GET", url, headers=self._auth(url)) as response:
                    self._check_commit(response, file)
                    if response.status_code == 404 and missing_ok:
                        return None
                    if response.status_code != 200:
                        self._raise_status(response, file)
                    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                    if encoding in _ZLIB_ENCODINGS:
                        return self._decoded_whole(response, file, encoding)
                    self._check_identity(response, file)
                    length = response.headers.get("Content-Length")
                    if length is not None and length.strip().isdigit():
                        if int(length) > MAX_JSON_BYTES:
                            raise self._error(
                                f"{self._label(file)}: {length} bytes is too large for a JSON file"
                            )
                        buf = bytearray(int(length))
                        self._drain(response, file, memoryview(buf))
                        return bytes(buf)
                    return bytes(self._drain_json(response, file))
            except httpx.TooManyRedirects:
                raise self._error(
                    f"{self._label(file)}: redirect loop (more than {self.max_redirects} redirects)"
                ) from None
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
                raise self._error(f"{self._label(file)}: {_describe_exc(exc)}") from None
            except httpx.TransportError as exc:
                raise _Transient(f"connection failed or dropped ({_describe_exc(exc)})") from None

        return self._with_retries(self._label(file), attempt)

    def _decoded_whole(self, response: Any, file: str, encoding: str) -> bytes:
        """A small whole file sent compressed although identity was asked for (some proxies compress JSON):
        decoded, as the file itself is what is wanted, within MAX_JSON_BYTES both ways."""
        raw = self._drain_json(response, file)
        decoder = zlib.decompressobj(_ZLIB_ENCODINGS[encoding])
        try:
            data = decoder.decompress(bytes(raw), MAX_JSON_BYTES + 1)
        except zlib.error as exc:
            raise self._error(
                f"{self._label(file)}: the server labelled the body {encoding} but it does not decode ({exc})"
            ) from None
        if len(data) > MAX_JSON_BYTES or not decoder.eof or decoder.unused_data:
            raise self._error(f"{self._label(file)}: not a whole {encoding} stream of a JSON file")
        return data
