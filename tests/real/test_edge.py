"""The HTTP edge of a real ``kiln serve`` (issue 11), over raw sockets where a client
library would hide what is on the wire: idle and half-sent connections are dropped
after the header deadline, a slow body is not, and a rebinding-style Host is refused
by the server uvicorn actually runs."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.real_model

DEADLINE = 2.0  # KILN_HEADER_TIMEOUT for this server; the default is 10 s


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("edge"), env={"KILN_HEADER_TIMEOUT": str(DEADLINE)})
    yield s
    stop_server(s)


def connect(server: Server) -> socket.socket:
    host, port = server.host.split(":")
    sock = socket.create_connection((host, int(port)), timeout=DEADLINE + 8)
    return sock


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (reading whatever it sends first)."""
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def open_fds(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def test_idle_and_partial_connections_are_dropped(edge_server):
    kinds = {
        "silent": b"",
        "half request line": b"GET /api/vers",
        "headers without the blank line": b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    }
    socks = {}
    for name, data in kinds.items():
        socks[name] = connect(edge_server)
        socks[name].sendall(data)
    # the server keeps answering others meanwhile
    assert httpx.get(edge_server.url + "/api/version", timeout=10).status_code == 200
    for name, sock in socks.items():
        waited = closed_after(sock)
        assert waited < DEADLINE + 3, f"{name}: held {waited:.1f}s"
        sock.close()


def test_a_dripping_client_gets_a_deadline_not_an_idle_timer(edge_server):
    sock = connect(edge_server)
    t0 = time.monotonic()
    request = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    try:
        for byte in request:  # a byte every 0.25 s never leaves the connection idle for long
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
    except (BrokenPipeError, ConnectionResetError):
        pass
    held = time.monotonic() - t0 + closed_after(sock)
    sock.close()
    assert held < DEADLINE + 3, f"held {held:.1f}s"


def test_partial_request_after_a_response_is_dropped(edge_server):
    sock = connect(edge_server)
    sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and stalls
    assert closed_after(sock) < DEADLINE + 3
    sock.close()


def test_a_slow_body_is_not_cut(edge_server):
    """The deadline covers the line and headers only: a slow upload outlives it."""
    import hashlib

    body = b"x" * 64
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    sock = connect(edge_server)
    sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode())
    for i in range(0, len(body), 16):
        time.sleep(DEADLINE / 2)
        sock.sendall(body[i:i + 16])
    reply = sock.recv(4096)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 201"), reply


def test_held_connections_are_released(edge_server):
    base = open_fds(edge_server)
    socks = []
    for _ in range(300):
        s = connect(edge_server)
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    time.sleep(0.5)
    held = open_fds(edge_server)
    time.sleep(DEADLINE + 2)
    after = open_fds(edge_server)
    for s in socks:
        s.close()
    print(f"\n{len(socks)} half-sent connections: server fds {base} before, {held} while held, "
          f"{after} {DEADLINE + 2:.0f}s later")
    assert held >= base + 250, (base, held)  # the connections were really open at the server
    assert after <= base + 5, (base, held, after)


def test_rebinding_host_is_refused_on_the_wire(edge_server):
    sock = connect(edge_server)
    port = edge_server.host.split(":")[1]
    sock.sendall(f"GET /api/tags HTTP/1.1\r\nHost: evil.test:{port}\r\nConnection: close\r\n\r\n".encode())
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
    assert b"KILN_ALLOWED_HOSTS" in reply and b"smollm2" not in reply


FORGED = "x\r\n2026-01-01 00:00:00,000 INFO kiln.access: id=forged status=200\x1b[2J\x1b]0;owned\x07"


def test_no_log_line_is_forged(edge_server):
    """What a client sends (a model name, an option key, a path) never splits or
    colours a line of the server's log, whichever module writes it."""
    chat = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    httpx.post(edge_server.url + "/api/chat", json={**chat, "model": FORGED}, timeout=60)
    r = httpx.post(edge_server.url + "/api/chat", json={**chat, "options": {FORGED: 1, "num_predict": 1}},
                   timeout=120)
    assert r.status_code == 200, r.text
    httpx.get(edge_server.url + "/api/%0d%0a2026-01-01%2000:00:00,000%20INFO%20forged%1b[31m", timeout=30)
    text = edge_server.log.read_text(errors="replace")
    assert "id=forged" in text  # the values were logged, escaped
    assert "\x1b" not in text and "\x07" not in text
    for line in text.splitlines():
        assert not line.startswith("2026-01-01 00:00:00,000"), line  # no line begins where a client said
