"""Byte-range GETs over plain HTTP/1.1 keep-alive connections, read straight into the caller's buffer.

The Hub source fetches tensor bytes in parts of a few MiB. Through httpx every part arrives as a stream of
small ``bytes`` chunks, each parsed, allocated and copied by Python code, which tops out well below what a
loopback or datacenter link delivers. ``http.client`` can instead ``readinto`` a caller's ``memoryview``:
the socket fills the destination buffer directly. This module wraps that in the little the Hub source needs:

- ``DirectClient.get(url, headers)`` sends one GET, follows redirects itself (the Hub sends tensor
  downloads to a storage host), and returns a ``DirectResponse`` with ``status_code``, ``headers``
  (case-insensitive ``get``), ``history`` (the redirect hops, for their headers) and ``readinto``.
- One keep-alive connection per thread and origin, reused across requests; a connection is dropped
  whenever a response is abandoned before its end, so a half-read body can never be taken for the next
  answer.
- TLS with the same trust settings as httpx (its default SSL context, which honours ``SSL_CERT_FILE``).

It does not retry, validate ranges, count bytes or decide what an answer means: the Hub source does all of
that, the same way for this client and for httpx. It does not speak to proxies; the Hub source uses httpx
when a proxy is configured.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Characters left as they are when a request target is quoted (RFC 3986 reserved ones, and "%").
_URL_SAFE = "/?#[]@!$&'()*+,;=:%~"
#: Failures of a reused keep-alive connection before any answer: the server had closed it.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
#: A redirect or error body up to this size is read to the end so that its connection can be reused.
SMALL_BODY = 64 * 1024


class TooManyRedirects(Exception):
    """More than ``max_redirects`` redirects for one request."""


class UnsupportedURL(Exception):
    """A URL (or redirect target) that is not http:// or https://."""


class DirectResponse:
    """One answer: status, headers and the body, read with ``readinto``. Use as a context manager."""

    def __init__(
        self,
        raw: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        url: str,
        history: list[DirectResponse],
        on_abandon: Callable[[http.client.HTTPConnection], None],
    ) -> None:
        self._raw = raw
        self._conn = conn
        self._on_abandon = on_abandon
        self.url = url
        self.history = history
        self.status_code = raw.status
        self.headers = raw.headers

    def readinto(self, out: memoryview) -> int:
        """Fill as much of ``out`` as the next socket read gives; 0 at the end of the body."""
        return self._raw.readinto(out)

    def close(self) -> None:
        """Finish with the answer; its connection is reused only when the body was read to its end."""
        raw = self._raw
        if raw.isclosed():
            if raw.length:  # the server closed the connection before the announced end of the body
                self._on_abandon(self._conn)
            return
        length = raw.length
        if length is not None and length <= SMALL_BODY and not raw.will_close:
            try:
                raw.read()
                return
            except (OSError, http.client.HTTPException):
                pass
        raw.close()
        self._on_abandon(self._conn)

    def __enter__(self) -> DirectResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirectClient:
    """Keep-alive HTTP/1.1 connections, one per thread and origin (see the module docstring)."""

    def __init__(
        self,
        *,
        timeout: float,
        max_redirects: int,
        ssl_context: ssl.SSLContext | None,
        headers: dict[str, str],
    ) -> None:
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.ssl_context = ssl_context
        self.headers = dict(headers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[http.client.HTTPConnection] = set()
        self._closed = False

    def get(self, url: str, headers: Callable[[str], dict[str, str]]) -> DirectResponse:
        """GET ``url`` following redirects; ``headers(url)`` gives each hop's own headers (auth, range).

        Raises ``TooManyRedirects``, ``UnsupportedURL``, and ``OSError`` / ``http.client.HTTPException``
        for transport failures (refused, reset, timed out, a malformed status line).
        """
        history: list[DirectResponse] = []
        while True:
            response = self._send(url, headers(url), history)
            if response.status_code not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            if not location:
                return response  # a redirect status without a target: the caller reports the status
            response.close()
            if len(history) >= self.max_redirects:
                raise TooManyRedirects(f"more than {self.max_redirects} redirects")
            history.append(response)
            url = urljoin(url, location)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, set()
        for conn in conns:
            conn.close()

    # ------------------------------------------------------------------------------------------- internals

    def _send(self, url: str, headers: dict[str, str], history: list[DirectResponse]) -> DirectResponse:
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError for a port that is not a number in range
        except ValueError:
            raise UnsupportedURL(f"invalid URL {url.split('?')[0]!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsupportedURL(f"unsupported URL {url.split('?')[0]!r}")
        # Quoted as httpx would: a redirect target may carry spaces or non-ASCII; existing escapes stay.
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE)
        origin = (parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))
        for attempt in (1, 2):
            conn = self._connection(origin)
            reused = conn.sock is not None
            try:
                conn.request("GET", target, headers={**self.headers, **headers})
                raw = conn.getresponse()
            except _STALE as exc:
                self._drop(conn)
                # A kept-alive connection that the server closed while idle fails before any answer; a GET
                # may be sent again at once on a fresh connection (not counted as a try).
                if reused and attempt == 1:
                    continue
                raise exc from None
            except BaseException:
                self._drop(conn)
                raise
            return DirectResponse(raw, conn, url, history, self._drop)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str, int], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(origin)
        if conn is not None and conn in self._all:
            return conn
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        with self._lock:
            if self._closed:
                raise OSError("the client is closed")
            self._all.add(conn)
        conns[origin] = conn
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        # Forgotten here, so that this thread's next request to the origin opens a fresh connection.
        conn.close()
        with self._lock:
            self._all.discard(conn)


def default_ssl_context(httpx: Any, for_direct: bool = False) -> ssl.SSLContext:
    """The SSL context httpx would use, so that both clients trust the same certificates.

    Built once per certificate setting (``SSL_CERT_FILE`` / ``SSL_CERT_DIR``) and client kind, and shared:
    loading the certificate store takes tens of milliseconds, and every source opens two clients. The direct
    client gets a context of its own, fixed to HTTP/1.1, because httpx sets the ALPN protocols of the context
    it is given on every connection.
    """
    return _ssl_context(httpx, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"), for_direct)


@functools.lru_cache(maxsize=8)
def _ssl_context(httpx: Any, cafile: str | None, capath: str | None, for_direct: bool) -> ssl.SSLContext:
    del cafile, capath  # the cache key: httpx reads them from the environment itself
    if httpx is not None and hasattr(httpx, "create_ssl_context"):
        context = httpx.create_ssl_context()
    else:  # pragma: no cover - every supported httpx has create_ssl_context
        context = ssl.create_default_context()
    if for_direct:
        context.set_alpn_protocols(["http/1.1"])
    return context
