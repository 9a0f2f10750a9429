"""A stand-in for the Hugging Face Hub, on loopback, for tests: the real Hub is unreachable offline.

It speaks just enough of the Hub's HTTP API that `huggingface_hub==2.4.0`'s own `HfApi.create_repo` and
`HfApi.upload_folder` work against it when the client's endpoint is `HubStandIn.url` (pass `endpoint=` to
`HfApi`, or set `HF_ENDPOINT` before `huggingface_hub` is imported: it is read at import time). Routes, as
the client calls them (see `hf_api.py`, `_commit_api.py`, `lfs.py`):

- `POST /api/repos/create`: 200 with the repo URL, 409 when it exists (the client's `exist_ok` accepts that);
- `GET  /api/models/<ns>/<name>[/revision/<rev>]`: model info (`repo_info`, used by `create_repo` after a
  401/403 and by `create_commit` when nothing changed);
- `POST /api/validate-yaml`: accepts any README metadata;
- `GET  /api/agent-harnesses`: an empty registry (the client fetches it, unauthenticated, from
  `constants.ENDPOINT` when it first builds its headers, to name a coding agent in its user agent);
- `POST /api/models/<ns>/<name>/preupload/<rev>`: "lfs" for files of 10 MiB or more or with a usual LFS
  suffix (`*.safetensors`, `*.bin`, ...), "regular" otherwise; `oid` of what is stored already;
- `POST /<ns>/<name>.git/info/lfs/objects/batch`: the git-LFS batch API, always answering the "basic"
  transfer (one PUT per object, never multipart, never xet) with an upload URL carrying a one-time ticket
  (the client sends that PUT without its token, as to a presigned S3 URL) and a verify URL;
- `PUT  /lfs-upload/<ticket>`: the object's bytes, checked against the announced sha256 and size;
- `POST /<ns>/<name>.git/info/lfs/objects/verify`: checks the object arrived;
- `POST /api/models/<ns>/<name>/commit/<rev>`: the NDJSON commit (`header`, `file` base64, `lfsFile` by oid,
  `deletedFile`, `deletedFolder`); answers `commitOid` (a sha1 hex) and `commitUrl`.

Xet is not spoken: any `.../xet-...` route answers 501 saying so. `huggingface_hub` uses xet whenever the
`hf_xet` package is installed (`upload_folder` then takes its xet pipeline for every "lfs" file), so a
test must turn it off: `HF_HUB_DISABLE_XET=1` in the environment before import, or at run time
`monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)` (the client reads that
constant at call time in `utils._runtime.is_xet_available`).

Every `/api/...` and `.git/...` route checks `Authorization: Bearer <token>` against the token given to
the stand-in and answers 401 `Invalid credentials in Authorization header` otherwise, as the Hub does. Only
models (repo type "model") and the branch `main` exist. Committed files stay in memory: `files(repo_id)`
returns them, `commits(repo_id)` the commit log and `requests` the (method, path) of every request served
(never headers, so never the token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".msgpack", ".npy",
                ".npz", ".pkl", ".zip", ".tar", ".gz", ".parquet", ".arrow")
BAD_CREDENTIALS = "Invalid credentials in Authorization header"

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<ticket>[0-9a-f]+)$"), "lfs_put"),
]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports for a regular file (and the client compares)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # paths stored as LFS objects
    log: list[dict] = field(default_factory=list)  # commits, oldest first

    @property
    def head(self) -> str:
        return self.log[-1]["oid"] if self.log else "0" * 40


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubStandIn:
    """`with HubStandIn(token) as hub:` serves on `hub.url` until the block ends."""

    def __init__(self, token: str, host: str = "127.0.0.1"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.requests: list[tuple[str, str]] = []
        self._tickets: dict[str, tuple[str, int]] = {}  # one-time upload ticket -> (oid, size)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what a test reads back
    def files(self, repo_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id].files) if repo_id in self.repos else {}

    def commits(self, repo_id: str) -> list[dict]:
        with self._lock:
            return list(self.repos[repo_id].log) if repo_id in self.repos else []

    def lfs_paths(self, repo_id: str) -> set[str]:
        with self._lock:
            return set(self.repos[repo_id].lfs) if repo_id in self.repos else set()

    # -- lifecycle
    def start(self) -> HubStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- routes: each takes the parsed request and returns (status, json body)
    def _repo(self, repo_id: str) -> Repo:
        found = self.repos.get(repo_id)
        if found is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return found

    @staticmethod
    def _branch(rev: str | None) -> None:
        if rev is not None and unquote(rev) != "main":
            raise HubError(404, f"Invalid rev id: {unquote(rev)}", code="RevisionNotFound")

    def create_repo(self, body: dict, **_) -> tuple[int, dict]:
        if body.get("type", "model") != "model":
            raise HubError(400, "the stand-in only holds model repos")
        name, org = body.get("name"), body.get("organization")
        if not name or not org:
            raise HubError(400, "name and organization are required")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = Repo(repo_id, private=body.get("visibility", "private") != "public")
        return 200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)}

    def validate_yaml(self, body: dict, **_) -> tuple[int, dict]:
        if not isinstance(body.get("content"), str):
            raise HubError(400, "content is required")
        return 200, {"errors": [], "warnings": []}

    def repo_info(self, repo: str, rev: str | None = None, **_) -> tuple[int, dict]:
        self._branch(rev)
        found = self._repo(repo)
        return 200, {"id": repo, "modelId": repo, "sha": found.head, "private": found.private,
                     "siblings": [{"rfilename": path} for path in sorted(found.files)]}

    def preupload(self, repo: str, rev: str, body: dict, **_) -> tuple[int, dict]:
        self._branch(rev)
        found = self._repo(repo)
        answers = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = size >= LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)
            oid = None
            if path in found.files:
                data = found.files[path]
                oid = hashlib.sha256(data).hexdigest() if path in found.lfs else git_blob_oid(data)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        return 200, {"files": answers, "commitOid": found.head}

    def lfs_batch(self, repo: str, body: dict, **_) -> tuple[int, dict]:
        self._repo(repo)
        if body.get("operation") != "upload":
            raise HubError(400, "the stand-in only takes uploads")
        if "basic" not in (body.get("transfers") or ["basic"]):
            raise HubError(400, "the stand-in only offers the basic transfer")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.blobs:
                ticket = secrets.token_hex(16)
                self._tickets[ticket] = (oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{ticket}"},
                    "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, ticket: str, raw: bytes, **_) -> tuple[int, dict]:
        wanted = self._tickets.pop(ticket, None)
        if wanted is None:
            raise HubError(403, "unknown or used upload ticket")
        oid, size = wanted
        if len(raw) != size or hashlib.sha256(raw).hexdigest() != oid:
            raise HubError(400, f"object {oid}: content does not match its oid and size")
        self.blobs[oid] = raw
        return 200, {}

    def lfs_verify(self, repo: str, body: dict, **_) -> tuple[int, dict]:
        self._repo(repo)
        data = self.blobs.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"object {body.get('oid')} was not uploaded")
        return 200, {"success": True}

    def commit(self, repo: str, rev: str, raw: bytes, **_) -> tuple[int, dict]:
        self._branch(rev)
        found = self._repo(repo)
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != found.head:
            raise HubError(412, f"parent commit {parent} is not the head {found.head}")
        files, lfs = dict(found.files), set(found.lfs)
        changed = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: only base64 content is taken")
                files[path] = base64.b64decode(value["content"])
                lfs.discard(path)
            elif key == "lfsFile":
                data = self.blobs.get(value.get("oid", ""))
                if data is None:
                    raise HubError(400, f"{path}: LFS object {value.get('oid')} was never uploaded")
                files[path] = data
                lfs.add(path)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"{path}: A file with this name doesn't exist", code="EntryNotFound")
                del files[path]
                lfs.discard(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
                    lfs.discard(name)
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
            changed.append(path)
        tree = hashlib.sha1()
        for name in sorted(files):
            tree.update(f"{name}\0{git_blob_oid(files[name])}\n".encode())
        oid = hashlib.sha1(f"{found.head}\n{tree.hexdigest()}\n{header.get('summary', '')}".encode()).hexdigest()
        found.files, found.lfs = files, lfs
        found.log.append({"oid": oid, "summary": header.get("summary", ""),
                          "description": header.get("description", ""), "paths": changed})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}",
                     "pullRequestUrl": None}


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "HubStandIn/1"

        def log_message(self, *args) -> None:  # quiet: tests read `hub.requests` instead
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            raw = self._body()
            path = urlsplit(self.path).path
            with hub._lock:
                hub.requests.append((method, path))
            if "xet" in path.lower():
                self._send(501, {"error": "the Hub stand-in speaks no xet: set HF_HUB_DISABLE_XET=1"},
                           {"X-Error-Message": "xet not supported by the stand-in"})
                return
            if method == "GET" and path == "/api/agent-harnesses":  # the client's agent detection, no auth
                self._send(200, {"standardEnvVars": [], "harnesses": {}})
                return
            for verb, pattern, name in _ROUTES:  # noqa: B007 - the matching route is used after the loop
                match = pattern.match(path)
                if verb == method and match:
                    break
            else:
                self._send(404, {"error": f"the stand-in has no route {method} {path}"})
                return
            if name != "lfs_put" and self.headers.get("Authorization", "") != f"Bearer {hub.token}":
                self._send(401, {"error": BAD_CREDENTIALS}, {"X-Error-Message": BAD_CREDENTIALS})
                return
            try:
                body = json.loads(raw) if raw and name not in ("lfs_put", "commit") else {}
                with hub._lock:
                    status, answer = getattr(hub, name)(**match.groupdict(), body=body, raw=raw)
            except HubError as exc:
                headers = {"X-Error-Message": exc.message}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                self._send(exc.status, {"error": exc.message}, headers)
                return
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": f"malformed request: {exc}"})
                return
            self._send(status, answer)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    return Handler
