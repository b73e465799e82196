"""A fake Hugging Face Hub for tests: a threaded HTTP server on 127.0.0.1 that speaks the endpoints the real
huggingface_hub client and weightdiff's Hub source use, with switches that inject every fault we handle.

Endpoints (paths as the Hub has them):

- ``GET /api/models/{org}/{name}[/revision/{rev}]``: model info JSON with ``id``, ``sha`` and ``siblings``.
- ``GET|HEAD /{org}/{name}/resolve/{rev}/{file}``: the file at that revision, with single-range ``Range``
  support (206 + Content-Range, 416 past the end), ``ETag``, ``X-Repo-Commit`` and ``Content-Length``.
  Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``)
  like the Hub's, which is how huggingface_hub tells them apart.
- ``GET|HEAD /cdn/{sha}/{file}``: where ``/resolve/`` redirects when ``faults.redirect`` is set. The redirect
  goes to ``localhost`` rather than ``127.0.0.1``, a different origin, as the Hub's storage CDN is.

``FakeHub.faults`` holds the switches (see ``Faults``); ``bytes_served`` counts file body bytes sent and
``requests`` records every request. The server holds files in memory and never touches the network beyond
the loopback interface. It is a test double, not a Hub: no uploads, no listing beyond siblings, no Xet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Faults:
    """Fault injection switches; every field off means a well-behaved Hub."""

    #: Statuses answered, one per request, to the next file (resolve/cdn) requests, e.g. [500, 503].
    file_statuses: list[int] = field(default_factory=list)
    #: A status answered to every file request.
    file_status_always: int | None = None
    #: Same two for the model info API.
    api_statuses: list[int] = field(default_factory=list)
    api_status_always: int | None = None
    #: Close the connection without answering the next N file requests (-1: every one).
    drop_connections: int = 0
    #: Answer Range requests with 200 and the whole file.
    ignore_range: bool = False
    #: Send only half the requested bytes, without Content-Length, then close (a body cut short).
    short_body: bool = False
    #: Send the requested bytes plus extra ones, without Content-Length, then close.
    long_body: bool = False
    #: Announce (and send) a Content-Length one byte short of the requested range.
    wrong_content_length: bool = False
    #: Announce a Content-Range shifted by one byte (and send those bytes).
    wrong_content_range: bool = False
    #: Announce the right Content-Length, send half of it, then close.
    truncate_body: bool = False
    #: Redirect /resolve/ to /cdn/ on another origin (localhost).
    redirect: bool = False
    #: Redirect /resolve/ to itself, forever.
    redirect_loop: bool = False
    #: Label file answers with Content-Encoding: gzip (body unchanged), as a misconfigured proxy might.
    content_encoding: str | None = None
    #: Name another commit in X-Repo-Commit, as a server that does not honour the pinned sha would.
    wrong_commit: bool = False
    #: Sleep this long before answering file requests.
    stall_s: float = 0.0
    #: Leave "sha" out of model info (the client must fall back to X-Repo-Commit).
    omit_sha: bool = False
    #: Leave "siblings" out of model info.
    omit_siblings: bool = False
    #: Files answered with 404 EntryNotFound although they exist.
    missing_files: set[str] = field(default_factory=set)
    #: Widen every answered range outward to multiples of this many bytes (206 with the wider Content-Range),
    #: as a server or cache that aligns ranges may.
    align_ranges: int | None = None
    #: Send .json files gzip-compressed (with Content-Encoding: gzip) although identity was asked for.
    gzip_json: bool = False
    #: Send bodies chunked (Transfer-Encoding: chunked, no Content-Length).
    chunked: bool = False
    #: Cut the next N whole-file answers (200, sent without Content-Length) to half, then close (-1: all).
    short_unranged: int = 0
    #: Only file requests whose name matches this apply the body/status faults (None: all files).
    only_files: set[str] | None = None


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    #: Requests must carry this token (401 otherwise), like a private repo.
    private: bool = False
    #: File requests without a granted token get 403 GatedRepo; model info stays public, as on the Hub.
    gated: bool = False


def files_from_dir(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by its relative POSIX path, as the repository would hold it."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class FakeHub:
    """The fake Hub server. Use as a context manager; ``endpoint`` is its base URL."""

    def __init__(self, token: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        #: A server-side SSL context makes this an https:// Hub (its certificate must name 127.0.0.1/localhost).
        self.tls = tls
        self.repos: dict[str, FakeRepo] = {}
        self.faults = Faults()
        self.bytes_served = 0
        self.requests: list[dict[str, Any]] = []
        #: Most file requests in progress at once (to check that part fetches overlap, and boundedly).
        self.max_active = 0
        self._active = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ setup

    def add_commit(self, repo_id: str, files: dict[str, bytes], ref: str = "main", **repo_flags: Any) -> str:
        """Add a commit of ``files`` to ``repo_id`` (created if new), point ``ref`` at it, return its sha."""
        repo = self.repos.setdefault(repo_id, FakeRepo())
        for key, value in repo_flags.items():
            setattr(repo, key, value)
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._server.block_on_close = False  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------------- inspection

    def file_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["kind"] in ("resolve", "cdn")]

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()
            self.max_active = 0

    # ------------------------------------------------------------------------------------------- internals

    def _record(self, handler: BaseHTTPRequestHandler, kind: str) -> None:
        with self._lock:
            self.requests.append(
                {
                    "kind": kind,
                    "method": handler.command,
                    "path": handler.path,
                    "range": handler.headers.get("Range"),
                    "authorization": handler.headers.get("Authorization"),
                }
            )

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    def _enter(self) -> None:
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def _pop_status(self, queue: list[int], always: int | None) -> int | None:
        with self._lock:
            if queue:
                return queue.pop(0)
        return always

    def _take_drop(self) -> bool:
        with self._lock:
            if self.faults.drop_connections == 0:
                return False
            if self.faults.drop_connections > 0:
                self.faults.drop_connections -= 1
            return True

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        return self.token is not None and handler.headers.get("Authorization") == f"Bearer {self.token}"


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on purpose in fault tests (a refused body, a timeout); that is not a server bug.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    # Headers and body go out in separate writes; without TCP_NODELAY each small answer waits ~40 ms for a
    # delayed ACK (Nagle), which makes the tests slow for no reason.
    disable_nagle_algorithm = True
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    # ----------------------------------------------------------------------------------------------- routing

    def _route(self, head: bool) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/api/models/"):
            self.fake._record(self, "api")
            return self._model_info(path[len("/api/models/") :])
        if path.startswith("/cdn/"):
            self.fake._record(self, "cdn")
            sha, _, name = path[len("/cdn/") :].partition("/")
            for repo in self.fake.repos.values():
                if sha in repo.commits:
                    return self._file(repo, sha, unquote(name), head, cdn=True)
            return self._error(404, "EntryNotFound")
        if "/resolve/" in path:
            self.fake._record(self, "resolve")
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            rev, _, name = rest.partition("/")
            return self._resolve(unquote(repo_id), unquote(rev), unquote(name), head)
        self.fake._record(self, "other")
        return self._error(404, None)

    def _lookup(self, repo_id: str, rev: str) -> tuple[FakeRepo | None, str | None, str | None]:
        """(repo, commit sha, error code) for a repo id and a branch, tag or sha."""
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return None, None, "RepoNotFound"
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            return repo, None, "RevisionNotFound"
        return repo, sha, None

    def _model_info(self, rest: str) -> None:
        repo_id, _, rev = rest.partition("/revision/")
        status = self.fake._pop_status(self.fake.faults.api_statuses, self.fake.faults.api_status_always)
        if status is not None:
            return self._error(status, None)
        repo, sha, code = self._lookup(unquote(repo_id), unquote(rev) if rev else "main")
        if code == "RepoNotFound":
            return self._error(404, code)
        assert repo is not None
        if repo.private and not self.fake._authorized(self):
            return self._error(401, None, "Invalid credentials in Authorization header")
        if code is not None:
            return self._error(404, code)
        assert sha is not None
        info: dict[str, Any] = {"id": unquote(repo_id), "modelId": unquote(repo_id), "private": repo.private}
        info["gated"] = "manual" if repo.gated else False
        if not self.fake.faults.omit_sha:
            info["sha"] = sha
        if not self.fake.faults.omit_siblings:
            info["siblings"] = [{"rfilename": name} for name in sorted(repo.commits[sha])]
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        faults = self.fake.faults
        repo, sha, code = self._lookup(repo_id, rev)
        if code == "RepoNotFound":
            return self._error(404, code)
        assert repo is not None
        if repo.private and not self.fake._authorized(self):
            return self._error(401, None, "Invalid credentials in Authorization header")
        if code is not None:
            return self._error(404, code)
        assert sha is not None
        if repo.gated and not self.fake._authorized(self):
            return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.")
        if faults.redirect_loop:
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if faults.redirect and name in repo.commits[sha] and name not in faults.missing_files:
            data = repo.commits[sha][name]
            self.send_response(302)
            self.send_header(
                "Location", f"{self.fake.scheme}://localhost:{self.fake.port}/cdn/{sha}/{quote(name)}"
            )
            self.send_header("X-Repo-Commit", sha)
            self.send_header("X-Linked-Etag", _etag(data))
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._file(repo, sha, name, head, cdn=False)

    # -------------------------------------------------------------------------------------------- answers

    def _error(self, status: int, code: str | None, message: str | None = None) -> None:
        body = json.dumps({"error": message or code or f"HTTP {status}"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, repo: FakeRepo, sha: str, name: str, head: bool, cdn: bool) -> None:
        self.fake._enter()
        try:
            self._send_file(repo, sha, name, head, cdn)
        finally:
            self.fake._leave()

    def _send_file(self, repo: FakeRepo, sha: str, name: str, head: bool, cdn: bool) -> None:
        faults = self.fake.faults
        data = repo.commits[sha].get(name)
        if data is None or name in faults.missing_files:
            return self._error(404, "EntryNotFound", "Entry not found")
        faulty = faults.only_files is None or name in faults.only_files
        if faulty and faults.stall_s:
            time.sleep(faults.stall_s)
        if faulty and self.fake._take_drop():
            self.close_connection = True
            return None
        status = self.fake._pop_status(faults.file_statuses, faults.file_status_always) if faulty else None
        if status is not None:
            return self._error(status, None)

        size = len(data)
        first, last = 0, size - 1
        partial = False
        wanted = self.headers.get("Range")
        if wanted and not (faulty and faults.ignore_range):
            m = _RANGE_RE.fullmatch(wanted.strip())
            if m is None or (not m[1] and not m[2]):
                return self._error(416, None, "Malformed range")
            if m[1]:
                first = int(m[1])
                last = min(int(m[2]), size - 1) if m[2] else size - 1
            else:  # suffix range: the last N bytes
                first = max(0, size - int(m[2]))
            if first >= size or first > last:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            partial = True
        if faulty and partial and faults.align_ranges:
            step = faults.align_ranges
            first, last = first - first % step, min(size - 1, last - last % step + step - 1)
        body = memoryview(data)[first : last + 1]  # a view: a 16 MiB part is not copied before sending
        announced_first, announced_last = first, last
        length: int | None = len(body)
        close_after = False
        if faulty and partial:
            if faults.wrong_content_range:
                announced_first, announced_last = first + 1, last + 1
            if faults.wrong_content_length:
                body = body[:-1]
                length = len(body)
            if faults.short_body:
                body, length, close_after = body[: len(body) // 2], None, True
            if faults.long_body:
                body, length, close_after = bytes(body) + b"\0" * 16, None, True
        truncate = faulty and faults.truncate_body and len(body) > 1
        if faulty and not partial and faults.short_unranged:
            faults.short_unranged -= 1 if faults.short_unranged > 0 else 0
            body, length, close_after = body[: len(body) // 2], None, True
        encoding = faults.content_encoding if faulty else None
        if faulty and faults.gzip_json and name.endswith(".json"):
            body, encoding = memoryview(gzip.compress(bytes(body))), "gzip"
            length = len(body)
        chunked = faulty and faults.chunked

        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {announced_first}-{announced_last}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", _etag(data))
        if not cdn:
            self.send_header("X-Repo-Commit", "0" * 40 if faulty and faults.wrong_commit else sha)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif length is not None:
            self.send_header("Content-Length", str(length))
        if close_after or truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return None
        if truncate:
            body = body[: len(body) // 2]
        # Counted before it is sent: a client may check the count as soon as its last byte has arrived.
        self.fake._count(len(body))
        if chunked:
            for at in range(0, len(body), 1 << 16):
                part = body[at : at + (1 << 16)]
                self.wfile.write(b"%x\r\n" % len(part) + bytes(part) + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return None
        self.wfile.write(body)
        return None


_ETAGS: dict[int, tuple[bytes, str]] = {}


def _etag(data: bytes) -> str:
    # Hashing a whole shard on every range request would make the server, not the client, the bottleneck of a
    # benchmark; file contents never change once committed, so the hash is cached (keyed by the object, kept
    # alive by the cache so the id cannot be reused).
    hit = _ETAGS.get(id(data))
    if hit is None or hit[0] is not data:
        hit = (data, f'"{hashlib.sha256(data).hexdigest()}"')
        _ETAGS[id(data)] = hit
    return hit[1]
