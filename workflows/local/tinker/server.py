"""The stand-in's process: the HTTP server over the backend, its command line, and a prompt stop on SIGTERM or
SIGINT (the worker stops at its next forward pass, the HTTP threads are daemons: no wait for a long batch)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from workflows.local.tinker import __doc__ as DOC
from workflows.local.tinker.common import log
from workflows.local.tinker.engines import parse_model_arg
from workflows.local.tinker.routes import Handler
from workflows.local.tinker.state import Backend


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # server_close would join every handler thread, a long-poll's 20 s included
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], backend: Backend):
        super().__init__(address, Handler)
        self.backend = backend

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str), "an AF_INET server's address is (host: str, port)"
        return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.local.tinker", description=(DOC or "").split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="checkpoints and stats live here")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "localhost"],
                        help="loopback only")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                        help="also serve the Hugging Face causal LM in DIR, as base model NAME (default: DIR's "
                             "absolute path); repeatable")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each result is available")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests answered 429/500")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--max-batch", type=int, default=64, help="sample rows per engine call, at most")
    parser.add_argument("--engine-batch", type=int, default=16, help="the engine's own decoding batch")
    parser.add_argument("--batch-window", type=float, default=0.02,
                        help="seconds the worker waits for more sample requests before a batch")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fault_rate < 1.0:
        parser.error("--fault-rate must be in [0, 1)")
    try:
        local_models = dict(parse_model_arg(value) for value in args.model)
        backend = Backend(args.data_dir.resolve(), latency=args.latency, fault_rate=args.fault_rate,
                          fault_seed=args.fault_seed, dtype=args.dtype, max_batch=args.max_batch,
                          engine_batch=args.engine_batch, batch_window=args.batch_window,
                          local_models=local_models).start()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = Server(("127.0.0.1", args.port), backend)

    def stop(signum, _frame):
        log().info("stopping", signal=signal.Signals(signum).name)
        backend.stopping = True  # the worker raises at its next forward pass
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"tinker-server listening on {server.url}", flush=True)
    for name in local_models:
        print(f"serving base model {name}", flush=True)
    log().info("tinker-server started", url=server.url, data_dir=str(backend.data_dir), latency=args.latency,
               fault_rate=args.fault_rate, fault_seed=args.fault_seed, dtype=args.dtype, max_batch=args.max_batch,
               models=backend.engines.names())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        backend.stop(wait=3.0)
        log().info("tinker-server stopped")
    return 0
