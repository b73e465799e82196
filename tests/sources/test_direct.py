"""Tests of the direct range client (weightdiff/sources/direct.py) against a small HTTP server on 127.0.0.1.

The Hub source's use of it (ranges, faults, TLS, tokens) is tested in tests/test_sources_hub.py; these tests
cover the client's own promises: connection reuse, never reusing a half-read connection, redirects.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from weightdiff.sources import direct
from weightdiff.sources.direct import DirectClient, TooManyRedirects, UnsupportedURL

BODY = bytes(range(256)) * 4096  # 1 MiB, every byte position distinguishable modulo 256


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "peer": self.client_address, "headers": dict(self.headers)})
        if self.path.startswith("/hop/"):
            n = int(self.path.rsplit("/", 1)[1])
            target = "/body" if n == 0 else f"/hop/{n - 1}"  # relative, as a Location may be
            self._answer(302, b"moved", [("Location", target)])
        elif self.path == "/loop":
            self._answer(302, b"", [("Location", "/loop")])
        elif self.path == "/ftp":
            self._answer(302, b"", [("Location", "ftp://127.0.0.1/x")])
        elif self.path == "/space":
            self._answer(302, b"", [("Location", "/a file/\u00e9t\u00e9?x=1 2")])
        elif self.path == "/cut":  # announces the whole body, sends half, hangs up (no "Connection: close")
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BODY), 100_000):
                part = BODY[i : i + 100_000]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._answer(200, BODY, [])

    def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(params=[None])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    # ``timeout``: how long the server keeps an idle keep-alive connection open (None: for ever).
    handler = type("Handler", (_Handler,), {"seen": seen, "timeout": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _client() -> DirectClient:
    return DirectClient(timeout=5.0, max_redirects=4, ssl_context=None, headers={"User-Agent": "t"})


def _read_all(response: Any, size: int) -> bytes:
    out = bytearray(size)
    view, pos = memoryview(out), 0
    while pos < size:
        n = response.readinto(view[pos:])
        if not n:
            break
        pos += n
    return bytes(out[:pos])


def test_bodies_arrive_whole_and_connections_are_reused(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = server
    client = _client()
    for _ in range(3):
        with client.get(f"{url}/body", lambda _u: {"X-Test": "1"}) as response:
            assert response.status_code == 200 and response.headers.get("content-length") == str(len(BODY))
            assert _read_all(response, len(BODY)) == BODY
    assert len({tuple(s["peer"]) for s in seen}) == 1  # one keep-alive connection for all three
    assert all(s["headers"]["X-Test"] == "1" and s["headers"]["User-Agent"] == "t" for s in seen)
    client.close()


def test_a_half_read_answer_is_never_taken_for_the_next_one(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = server
    client = _client()
    with client.get(f"{url}/body", lambda _u: {}) as response:
        assert _read_all(response, 1000) == BODY[:1000]  # the rest of the body is abandoned
    with client.get(f"{url}/body", lambda _u: {}) as response:
        assert _read_all(response, len(BODY)) == BODY
    assert len({tuple(s["peer"]) for s in seen}) == 2  # the abandoned connection was not reused
    client.close()


def test_chunked_bodies(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, _seen = server
    client = _client()
    with client.get(f"{url}/chunked", lambda _u: {}) as response:
        assert _read_all(response, len(BODY) + 10) == BODY
    client.close()


def test_redirects_are_followed_with_each_hops_headers(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = server
    client = _client()
    hops: list[str] = []

    def headers(hop: str) -> dict[str, str]:
        hops.append(hop)
        return {"X-Hop": str(len(hops))}

    with client.get(f"{url}/hop/2", headers) as response:
        assert response.status_code == 200 and _read_all(response, len(BODY)) == BODY
        assert [r.status_code for r in response.history] == [302, 302, 302]
        assert response.url == f"{url}/body"
    assert hops == [f"{url}/hop/2", f"{url}/hop/1", f"{url}/hop/0", f"{url}/body"]
    assert [s["headers"]["X-Hop"] for s in seen] == ["1", "2", "3", "4"]
    assert len({tuple(s["peer"]) for s in seen}) == 1  # redirect bodies were read, the connection kept
    client.close()


def test_redirect_loops_and_other_schemes_are_refused(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = server
    client = _client()
    with pytest.raises(TooManyRedirects, match="more than 4 redirects"):
        client.get(f"{url}/loop", lambda _u: {})
    assert len(seen) == 5
    with pytest.raises(UnsupportedURL, match=r"ftp://127\.0\.0\.1/x"):
        client.get(f"{url}/ftp", lambda _u: {})
    client.close()


def test_a_closed_client_refuses_new_requests(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, _seen = server
    client = _client()
    with client.get(f"{url}/body", lambda _u: {}) as response:
        _read_all(response, len(BODY))
    client.close()
    with pytest.raises(OSError, match="closed"):
        client.get(f"{url}/body", lambda _u: {})


@pytest.mark.parametrize("server", [0.2], indirect=True)
def test_a_connection_the_server_closed_while_idle_is_replaced_quietly(server) -> None:
    url, seen = server
    client = _client()
    for _ in range(2):
        with client.get(f"{url}/body", lambda _u: {}) as response:
            assert _read_all(response, len(BODY)) == BODY
        time.sleep(0.5)  # the server hangs up the idle connection after 0.2 s
    assert len(seen) == 2 and len({tuple(s["peer"]) for s in seen}) == 2
    client.close()


def test_a_body_cut_short_drops_its_connection(
    server: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = server
    monkeypatch.setattr(
        direct, "_STALE", ()
    )  # no quiet second attempt: the dead connection must not be reused
    client = _client()
    with client.get(f"{url}/cut", lambda _u: {}) as response:
        assert len(_read_all(response, len(BODY))) < len(BODY)
    with client.get(f"{url}/body", lambda _u: {}) as response:
        assert _read_all(response, len(BODY)) == BODY
    assert len({tuple(s["peer"]) for s in seen}) == 2
    client.close()


def test_redirect_targets_are_quoted(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = server
    client = _client()
    with client.get(f"{url}/space", lambda _u: {}) as response:
        assert response.status_code == 200 and _read_all(response, len(BODY)) == BODY
    assert seen[-1]["path"] == "/a%20file/%C3%A9t%C3%A9?x=1%202"
    with pytest.raises(UnsupportedURL, match="invalid URL"):
        client.get(url.replace(url.rsplit(":", 1)[1], "99999") + "/x", lambda _u: {})
    client.close()
