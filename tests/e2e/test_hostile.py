"""Senders that misbehave at the socket level, against a real coordinator process:
a body cut off before its declared length, broken chunked framing, a header
that never ends. Each is the sender's problem: no internal error in the log,
nothing stored, the coordinator still healthy."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from harness import start_coordinator


def _send(addr: tuple[str, int], raw: bytes, linger_s: float = 0.3) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(raw)
        time.sleep(linger_s)
        s.shutdown(socket.SHUT_WR)
        try:
            return s.recv(4096)
        except OSError:
            return b""


def test_cut_off_and_malformed_uploads(tmp_path):
    proc, url = start_coordinator(tmp_path / "data")
    try:
        host, port = url.removeprefix("http://").split(":")
        addr = (host, int(port))
        head = b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # Declares 100 kB, sends 5 kB, goes away.
        _send(addr, head + b"Content-Length: 100000\r\n\r\n" + b"x" * 5000)
        # Chunked framing with a chunk size that is not hex.
        reply = _send(addr, head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        assert reply.split(b" ")[1].startswith(b"4"), reply[:200]  # aiohttp's parser answers
        # A header block that never finishes.
        _send(addr, b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000)
        time.sleep(0.5)
        health = json.loads(urllib.request.urlopen(url + "/healthz", timeout=5).read())
        assert health["status"] == "ok"
        assert not list((tmp_path / "data").glob("datasets/*.json"))
        out = proc.output()
        assert "unhandled error" not in out and "Traceback" not in out, out[-3000:]
        assert "malformed HTTP (400) Invalid character in chunk size" in out  # said, briefly
    finally:
        proc.stop()
