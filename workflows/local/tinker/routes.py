"""The HTTP side: one handler thread per connection, a table of (method, route) -> handler, and the long-poll of
retrieve_future, which notices a client that went away (its connection closed) while it waits.

Every request the stand-in cannot serve gets an answer at once (404 for a route it does not have, whatever the
method; 400 for a request it refuses) and a log line, never an HTML 501: the SDK retries 5xx for five minutes."""

from __future__ import annotations

import datetime
import json
import re
import select
import socket
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from workflows.local.tinker import sampling
from workflows.local.tinker.checkpoints import page, parse_recipients, public
from workflows.local.tinker.common import API, UserError, check_ttl, log
from workflows.local.tinker.records import Future, TrainModel, session_of
from workflows.local.tinker.wire import parse_forward_backward

if TYPE_CHECKING:
    from workflows.local.tinker.server import Server

POLL_WAIT_S = 20.0  # a retrieve_future waits this long for its result before answering 408 (poll again)
POLL_SLICE_S = 0.25  # how often a waiting retrieve_future looks whether its client is still there
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "proto_compress_fwdbwd": False,
                 "sample_use_retrieve_futures": False, "sample_join_sampling_session": False,
                 "custom_loss_server_side": False, "parallel_fwdbwd_chunks": True}
JSON = "application/json"
CHECKPOINT = r"training_runs/([^/]+)/checkpoints/((?:weights|sampler_weights|external_weights)/[^/]+)"
Answer = tuple[int, Any, str]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):
        pass  # every request gets one structured line in _handle instead

    def log_error(self, format, *args):
        log().info("http error", detail=format % args)

    # -- plumbing
    def _send(self, status: int, payload: Any = None, content_type: str = JSON) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps({} if payload is None else payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            log().info("client went away before its answer", path=self.path, status=status)

    def _body(self) -> bytes:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding", "").lower() == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        return raw

    def client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read; the SDK never pipelines)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        arrived = time.time()
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        raw = self._body() if method not in ("GET", "DELETE") or self.headers.get("Content-Length") else b""
        status = 500
        try:
            if path.startswith("/files/") and method == "GET":
                status, payload, content_type = self._file(path)
                return self._send(status, payload, content_type)
            if path == "/_local/stats":
                status = 200
                return self._send(200, self.server.backend.snapshot())
            if not path.startswith(API + "/"):
                status = 404
                return self._send(404, {"detail": f"{method} {path} is not served here"})
            key = self.headers.get("X-API-Key") or ""
            if not key.startswith("tml-"):
                status = 401
                return self._send(401, {"detail": "invalid API key: it must start with 'tml-'"})
            route = path[len(API) + 1:]
            fault = self.server.backend.inject_fault(route)
            if fault is not None:
                status = fault
                log().info("fault injected", route=route, status=fault)
                return self._send(fault, {"detail": f"injected fault ({fault})"})
            body = json.loads(raw) if raw and self.headers.get("Content-Type", "").startswith(JSON) else {}
            answer = self._route(method, route, raw, body, urllib.parse.parse_qs(url.query), arrived)
            if answer is None:  # the client went away while waiting: nothing to send
                status = 499
                self.close_connection = True
                return
            status, payload, content_type = answer
            self._send(status, payload, content_type)
        except (UserError, KeyError, ValueError, TypeError) as error:  # a request of the wrong shape: not retried
            status = 400
            self._send(400, {"detail": f"bad request: {error}"})
        except Exception as error:
            log().exception("handler failed", path=path)
            self._send(500, {"detail": f"{type(error).__name__}: {error}"})
        finally:
            if not path.endswith(("retrieve_future", "session_heartbeat", "telemetry")) or status >= 400:
                log().info("request", method=method, path=path, status=status,
                           ms=round((time.time() - arrived) * 1000, 1))

    def _file(self, path: str) -> Answer:
        parts = [urllib.parse.unquote(p) for p in path.split("/")[2:]]
        if len(parts) != 4 or parts[1] != "external_weights" or any(p in ("", ".", "..") or "/" in p for p in parts):
            return 404, {"detail": "not found"}, JSON
        folder = self.server.backend.checkpoints.find(parts[0], f"external_weights/{parts[2]}")
        target = folder / parts[3] if folder else None
        if target is None or not target.is_file() or target.name == "meta.json":
            return 404, {"detail": "not found"}, JSON
        return 200, target.read_bytes(), "application/octet-stream"

    # -- the API
    def _route(self, method: str, route: str, raw: bytes, body: dict, query: dict, arrived: float) -> Answer | None:
        for (wanted, pattern), handle in ROUTES.items():
            if wanted == method and (match := re.fullmatch(pattern, route)):
                args = [urllib.parse.unquote(group) for group in match.groups()]
                return handle(self, *args, raw=raw, body=body, query=query, arrived=arrived)
        return 404, {"detail": f"{method} /{route} is not implemented by this stand-in"}, JSON

    @staticmethod
    def _future(future: Future, **extra) -> Answer:
        return 200, {"request_id": future.request_id, **extra}, JSON

    def create_session(self, **_) -> Answer:
        session_id = uuid.uuid4().hex[:16]
        return 200, {"session_id": session_id, "type": "create_session"}, JSON

    def heartbeat(self, body: dict, **_) -> Answer:
        if body.get("session_id"):
            self.server.backend.touch_session(str(body["session_id"]))
        return 200, {"type": "session_heartbeat"}, JSON

    def finish_session(self, session_id: str, **_) -> Answer:
        self.server.backend.finish_session(session_id)
        return 200, {}, JSON

    def capabilities(self, **_) -> Answer:
        models = [{"model_name": name, "trainable": True, "sampleable": True}
                  for name in self.server.backend.engines.names()]
        return 200, {"supported_models": models}, JSON

    def create_model(self, body: dict, arrived: float, **_) -> Answer:
        backend = self.server.backend
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        lora = body.get("lora_config") or {}
        backend.engines.check(body["base_model"])  # a 400 now, not a failed future
        with backend.lock:
            if model_id not in backend.models:
                backend.models[model_id] = TrainModel(model_id, body["base_model"], int(lora.get("rank", 32)),
                                                      int(lora.get("seed") or 0))
        return self._future(backend.submit_new_model("create_model", model_id, body, arrived), model_id=model_id)

    def load_weights(self, body: dict, arrived: float, **_) -> Answer:
        backend = self.server.backend
        if body.get("session_id") is not None:  # create-via-load: the new model's first request, no model_id
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            with backend.lock:
                if model_id not in backend.models:
                    backend.models[model_id] = TrainModel(model_id, body.get("base_model") or "", 0, 0)
            return self._future(backend.submit_new_model("load_new", model_id, body, arrived), model_id=model_id)
        return self._training("load_weights", body.get("model_id"), body.get("seq_id"), body, arrived)

    def forward_backward(self, raw: bytes, arrived: float, **_) -> Answer:
        model_id, seq_id, parsed = parse_forward_backward(raw)
        if isinstance(parsed, UserError):
            return self._training("refused", model_id, seq_id, str(parsed), arrived)
        return self._training("forward_backward", model_id, seq_id, parsed, arrived)

    def training_request(self, kind: str, body: dict, arrived: float) -> Answer:
        try:
            check_ttl(body.get("ttl_seconds"))
            if kind == "save_weights_external" and body.get("age_encryption_recipients") is not None:
                body["_recipients"] = parse_recipients(body["age_encryption_recipients"])
        except UserError as error:
            return self._training("refused", body.get("model_id"), body.get("seq_id"), str(error), arrived)
        return self._training(kind, body.get("model_id"), body.get("seq_id"), body, arrived)

    def _training(self, kind: str, model_id: str | None, seq_id: int | None, body: Any, arrived: float) -> Answer:
        """Queues a training job in its model's seq_id order; a "refused" one (body: why) fails in its turn, so the
        seq_id the SDK gave it is taken and the model's later requests still run."""
        try:
            future = self.server.backend.submit_training(kind, model_id or "", seq_id, body, arrived)
        except KeyError:
            return 404, {"detail": f"no model {model_id!r}"}, JSON
        return self._future(future, model_id=model_id)

    def get_info(self, body: dict, **_) -> Answer:
        backend = self.server.backend
        model = backend.models.get(body.get("model_id", ""))
        if model is None or model.engine is None:
            return 404, {"detail": f"no model {body.get('model_id')!r}"}, JSON
        return 200, {"type": "get_info", "model_id": model.model_id, "is_lora": True, "lora_rank": model.rank,
                     "model_name": model.base_model,
                     "model_data": {"arch": model.engine.model.config.model_type, "model_name": model.base_model,
                                    "tokenizer_id": str(backend.engines.folder(model.base_model))}}, JSON

    def create_sampling_session(self, body: dict, **_) -> Answer:
        backend = self.server.backend
        sampling_id = f"{body['session_id']}:sample:{body['sampling_session_seq_id']}"
        path, base = body.get("model_path"), body.get("base_model")
        if path:
            folder = backend.checkpoints.resolve(path, ("sampler_weights", "weights"))
            entry = {"base_model": base or backend.checkpoints.meta(folder)["base_model"], "model_path": path,
                     "adapter": str(folder)}
        elif base:
            backend.engines.check(base)
            entry = {"base_model": base, "model_path": None, "adapter": None}
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        with backend.lock:
            backend.samplers[sampling_id] = entry
        return 200, {"sampling_session_id": sampling_id, "type": "create_sampling_session"}, JSON

    def get_sampler(self, sampler_id: str, **_) -> Answer:
        sampler = self.server.backend.samplers.get(sampler_id)
        if sampler is None:
            return 404, {"detail": "no such sampler"}, JSON
        return 200, {"sampler_id": sampler_id, "base_model": sampler["base_model"],
                     "model_path": sampler["model_path"]}, JSON

    def asample(self, body: dict, arrived: float, **_) -> Answer:
        backend = self.server.backend
        session = body.get("sampling_session_id")
        if session:
            entry = backend.samplers.get(session)
            if entry is None:
                return 404, {"detail": f"no sampling session {session!r}"}, JSON
        elif body.get("model_path"):
            folder = backend.checkpoints.resolve(body["model_path"], ("sampler_weights", "weights"))
            entry = {"base_model": backend.checkpoints.meta(folder)["base_model"], "adapter": str(folder)}
        elif body.get("base_model"):
            backend.engines.check(body["base_model"])
            entry = {"base_model": body["base_model"], "adapter": None}
        else:
            raise UserError("asample needs a sampling session, a model_path or a base_model")
        future = backend.new_future(arrived, session_of(session) if session else None)
        num = int(body.get("num_samples") or 1)
        try:
            job = sampling.parse_sample(backend, body, entry, future, arrived)
        except UserError as error:
            future.fail(str(error), "user")
            return self._future(future, sample_sequence_ids=[f"{future.request_id}:{i}" for i in range(num)])
        seq = body.get("seq_id")
        future = backend.submit_sample((session, seq) if session and seq is not None else None, job)
        return self._future(future, sample_sequence_ids=[f"{future.request_id}:{i}" for i in range(num)])

    def retrieve(self, body: dict, **_) -> Answer | None:
        """Long-polls the future; None when the client went away meanwhile (the worker may then drop its work)."""
        backend = self.server.backend
        future = backend.futures.get(body.get("request_id", ""))
        if future is None:  # gone (a server restart): the SDK re-submits what it can
            return 410, {"detail": "unknown or expired request"}, JSON
        deadline = time.monotonic() + POLL_WAIT_S
        with backend.lock:
            future.watchers += 1
            future.left_at = None
        try:
            while not future.done.wait(min(POLL_SLICE_S, max(0.0, deadline - time.monotonic()))):
                if self.client_gone():
                    future.left_at = time.monotonic()
                    return None
                if time.monotonic() >= deadline:
                    break
        finally:
            with backend.lock:
                future.watchers -= 1
        if not future.done.is_set() or future.ready_at > time.time() + POLL_WAIT_S:
            return 408, {"type": "try_again", "request_id": future.request_id, "queue_state": "active"}, JSON
        time.sleep(max(0.0, future.ready_at - time.time()))
        if future.error is not None:
            return 200, {"error": future.error, "category": future.category}, JSON
        if isinstance(future.payload, bytes):
            return 200, future.payload, "application/x-protobuf"
        return 200, future.payload, JSON

    # -- the REST routes (RestClient): training runs and their checkpoints
    def _run_or_404(self, model_id: str) -> dict:
        model = self.server.backend.models.get(model_id)
        run = self.server.backend.checkpoints.run(model_id, model.last_request if model else None)
        if run is None:
            raise LookupError(f"no training run {model_id!r}")
        return run

    def training_run(self, model_id: str, **_) -> Answer:
        return 200, self._run_or_404(model_id), JSON

    def training_runs(self, query: dict, **_) -> Answer:
        backend = self.server.backend
        runs, cursor = page(backend.checkpoints.run_ids(), query, 20)
        return 200, {"training_runs": [self._run_or_404(model_id) for model_id in runs], "cursor": cursor}, JSON

    def run_checkpoints(self, model_id: str, **_) -> Answer:
        self._run_or_404(model_id)
        return 200, {"checkpoints": public(self.server.backend.checkpoints.checkpoints(model_id)), "cursor": None}, JSON

    def user_checkpoints(self, query: dict, **_) -> Answer:
        checkpoints, cursor = page(self.server.backend.checkpoints.checkpoints(), query, 100)
        return 200, {"checkpoints": public(checkpoints), "cursor": cursor}, JSON

    def weights_info(self, body: dict, **_) -> Answer:
        return 200, self.server.backend.checkpoints.weights_info(body.get("tinker_path") or ""), JSON

    def delete_checkpoint(self, model_id: str, checkpoint_id: str, **_) -> Answer:
        if not self.server.backend.checkpoints.delete(model_id, checkpoint_id):
            raise LookupError(f"no checkpoint tinker://{model_id}/{checkpoint_id}")
        return 200, {}, JSON

    def set_ttl(self, model_id: str, checkpoint_id: str, body: dict, **_) -> Answer:
        if "ttl_seconds" not in body:
            raise UserError("the body must give ttl_seconds (seconds, or null to remove the expiry)")
        ttl = check_ttl(body["ttl_seconds"])
        if not self.server.backend.checkpoints.set_ttl(model_id, checkpoint_id, ttl):
            raise LookupError(f"no checkpoint tinker://{model_id}/{checkpoint_id}")
        return 200, {}, JSON

    def external_urls(self, model_id: str, checkpoint_id: str, **_) -> Answer:
        backend = self.server.backend
        if not checkpoint_id.startswith("external_weights/"):
            raise UserError(f"{checkpoint_id} is not an external weights checkpoint")
        folder = backend.checkpoints.find(model_id, checkpoint_id)
        if folder is None:
            raise LookupError(f"no checkpoint tinker://{model_id}/{checkpoint_id}")
        base = f"{self.server.url}/files"
        urls = {f.name: f"{base}/{urllib.parse.quote(model_id)}/external_weights/{urllib.parse.quote(folder.name)}/"
                        f"{urllib.parse.quote(f.name)}"
                for f in sorted(folder.iterdir()) if f.is_file() and f.name != "meta.json"}
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        return 200, {"urls": urls, "expires": expires.isoformat()}, JSON


def _static(payload: dict):
    return lambda _handler, **_: (200, payload, JSON)


def _training_route(kind: str):
    return lambda handler, body, arrived, **_: handler.training_request(kind, body, arrived)


def _not_found_is_404(handle):
    def wrapped(handler, *args, **kwargs):
        try:
            return handle(handler, *args, **kwargs)
        except LookupError as error:
            return 404, {"detail": str(error)}, JSON
    return wrapped


ROUTES = {
    ("POST", "client/config"): _static(CLIENT_CONFIG),
    ("POST", "client/dynamic_config"): _static({}),
    ("GET", "healthz"): _static({"status": "ok"}),
    ("POST", "telemetry"): _static({"status": "accepted"}),
    ("POST", "cancel_future"): _static({}),
    ("GET", "get_server_capabilities"): Handler.capabilities,
    ("POST", "create_session"): Handler.create_session,
    ("POST", "session_heartbeat"): Handler.heartbeat,
    ("POST", r"sessions/([^/]+)/finish"): Handler.finish_session,
    ("POST", "create_model"): Handler.create_model,
    ("POST", "get_info"): Handler.get_info,
    ("POST", "forward_backward"): Handler.forward_backward,
    **{("POST", kind): _training_route(kind)
       for kind in ("optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external")},
    ("POST", "load_weights"): Handler.load_weights,
    ("POST", "create_sampling_session"): Handler.create_sampling_session,
    ("GET", r"samplers/([^/]+)"): Handler.get_sampler,
    ("POST", "asample"): Handler.asample,
    ("POST", "retrieve_future"): Handler.retrieve,
    ("GET", "training_runs"): Handler.training_runs,
    ("GET", r"training_runs/([^/]+)"): _not_found_is_404(Handler.training_run),
    ("GET", r"training_runs/([^/]+)/checkpoints"): _not_found_is_404(Handler.run_checkpoints),
    ("DELETE", CHECKPOINT): _not_found_is_404(Handler.delete_checkpoint),
    ("PUT", CHECKPOINT + "/ttl"): _not_found_is_404(Handler.set_ttl),
    ("GET", CHECKPOINT + "/external_weights_urls"): _not_found_is_404(Handler.external_urls),
    ("GET", "checkpoints"): Handler.user_checkpoints,
    ("POST", "weights_info"): _not_found_is_404(Handler.weights_info),
}
