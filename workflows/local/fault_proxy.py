"""A fault-injecting HTTP proxy on loopback, in front of the local S3 server.

A configurable share of requests is answered with S3's 500 or 503 error, answered late, or loses its
connection after the server has done the work (the client never learns that its write happened, as on a
real network). Requests whose `METHOD /path` matches a pattern are stalled: forwarded nowhere and never
answered, as a hung server would, so a test can stop a phase exactly there. Every request, fault and stall
is counted, and the counts are rewritten to a JSON file as they change.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypedDict

KINDS = ("500", "503", "slow", "drop")
ERROR_CODES = {"500": "InternalError", "503": "SlowDown"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "upgrade", "te"}
CHUNK = 1 << 20


@dataclass(frozen=True)
class FaultPlan:
    share: float = 0.0  # of requests that get one of `kinds`, drawn at random
    kinds: tuple[str, ...] = KINDS
    stall: str | None = None  # regular expression over "METHOD /path"
    slow_s: float = 1.0
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str, stall: str | None = None) -> FaultPlan:
        """`SHARE[:KIND,KIND...]`, e.g. `0.1` (every kind) or `0.05:503,drop`."""
        share, _, kinds = spec.partition(":")
        chosen = tuple(k.strip() for k in kinds.split(",") if k.strip()) or KINDS
        unknown = set(chosen) - set(KINDS)
        value = float(share)
        if stall:
            try:
                re.compile(stall)
            except re.error as exc:
                raise ValueError(f"stall pattern {stall!r}: {exc}") from None
        if unknown or not 0.0 <= value <= 1.0:
            raise ValueError(f"fault plan {spec!r}: a share in [0, 1], then optionally ':' and kinds from "
                             f"{', '.join(KINDS)}")
        return cls(share=value, kinds=chosen, stall=stall)


class Stats(TypedDict):
    requests: int
    faults: dict[str, int]  # per kind
    stalled: int


class FaultProxy:
    def __init__(self, upstream_port: int, plan: FaultPlan, stats_path: Path):
        self.upstream_port, self.plan, self.stats_path = upstream_port, plan, stats_path
        self.stats: Stats = {"requests": 0, "faults": dict.fromkeys(plan.kinds, 0), "stalled": 0}
        self._stall = re.compile(plan.stall) if plan.stall else None
        self._random = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = _Server(self)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._write_stats()
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def decide(self, request_line: str) -> str | None:
        """The fault for this request ('stall', a kind, or None), counted."""
        with self._lock:
            self.stats["requests"] += 1
            if self._stall and self._stall.match(request_line):
                fault = "stall"
                self.stats["stalled"] += 1
            elif self._random.random() < self.plan.share:
                fault = self._random.choice(self.plan.kinds)
                self.stats["faults"][fault] += 1
            else:
                fault = None
            self._write_stats()
        return fault

    def _write_stats(self) -> None:
        staging = self.stats_path.with_suffix(".partial")
        staging.write_text(json.dumps(self.stats, sort_keys=True))
        staging.replace(self.stats_path)


class _Server(ThreadingHTTPServer):
    """The proxy's HTTP server on a free loopback port; its handlers reach the FaultProxy through it."""

    daemon_threads = True

    def __init__(self, proxy: FaultProxy):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive towards the client, as S3 clients expect
    server: _Server  # the one server that creates these handlers

    def log_message(self, *args) -> None:  # requests carry signed headers: log nothing
        pass

    def relay(self) -> None:
        proxy = self.server.proxy
        fault = proxy.decide(f"{self.command} {self.path}")
        if self.headers.get("Transfer-Encoding"):
            self.send_error(501, "chunked request bodies are not relayed")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if fault == "stall":
            proxy._stopped.wait()
            self.close_connection = True
            return
        if fault in ERROR_CODES:
            self._discard(length)
            self._error(int(fault), ERROR_CODES[fault])
            return
        if fault == "slow":
            time.sleep(proxy.plan.slow_s)
        # a fresh upstream connection per request: loopback connects are cheap, and none goes stale
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=300)
        try:
            self._answer(self._forward(upstream, length), cut=fault == "drop")
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

    def _discard(self, length: int) -> None:
        while length > 0:
            block = self.rfile.read(min(CHUNK, length))
            if not block:
                break
            length -= len(block)

    def _error(self, status: int, code: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected fault</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, upstream: http.client.HTTPConnection, length: int) -> http.client.HTTPResponse:
        # the Host header goes through unchanged: the client signed it
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                upstream.putheader(name, value)
        upstream.endheaders()
        while length > 0:
            block = self.rfile.read(min(CHUNK, length))
            if not block:
                break
            upstream.send(block)
            length -= len(block)
        return upstream.getresponse()

    def _answer(self, response: http.client.HTTPResponse, cut: bool) -> None:
        """Relay the upstream answer; with `cut`, only the first half of it, then drop the connection."""
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        if response.getheader("Transfer-Encoding"):  # small listings: send them with a length
            body = response.read()
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"] + [("Content-Length",
                                                                                         str(len(body)))]
            chunks, total = iter([body]), len(body)
        else:
            total = 0 if self.command == "HEAD" else int(response.getheader("Content-Length") or 0)
            chunks = iter(lambda: response.read(CHUNK), b"")
        if cut:
            self.close_connection = True
            if total == 0:
                return  # nothing to cut short: the whole answer is lost
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        left = total // 2 if cut else total
        for block in chunks:
            self.wfile.write(block[:left])
            left -= len(block)
            if left <= 0:
                break
