"""A stand-in for the Argo Server, on loopback, for tests: no cluster and no Argo Server exist here.

It serves the few routes of the Argo Server HTTP API that `workflows.submit` calls, as
`../shared/schemas/argo-server.swagger.json` (Argo Workflows v4.1.2) defines them:

- `POST /api/v1/workflow-templates/{namespace}`: create; 409 AlreadyExists when the name is taken;
- `GET  /api/v1/workflow-templates/{namespace}/{name}`: the stored template, 404 NotFound when absent;
- `PUT  /api/v1/workflow-templates/{namespace}/{name}`: update; 409 Conflict unless
  `metadata.resourceVersion` is the stored one, as the Kubernetes API requires;
- `POST /api/v1/workflows/{namespace}/submit`: a Workflow from a WorkflowTemplate (`workflowTemplateRef`), with
  a generated name (`<generateName or template name->` + 5 characters);
- `GET  /api/v1/workflows/{namespace}/{name}`: the Workflow; each GET advances it one step: Pending, then one
  DAG task after the other Running then Succeeded (a `withParam` task fans out into two Pod nodes), and the
  Workflow ends Succeeded (or Failed at the task named by `fail_task`).

Every request body is validated against the request schema the swagger names for that route ($refs
resolved, jsonschema Draft 4); a body that does not conform is answered 400 and its errors are kept in
`schema_errors`, so a test can assert the client held to the real contract. Every answer is validated the same
way against the route's 200 response schema (`response_errors`), so the stand-in cannot drift from it either.
Beyond the schema it applies a few of the checks Argo's own `validate.go` makes on create, update and submit
(entrypoint and DAG task templates exist; declared parameters only; a parameter without a value must be
supplied; enum values), answering 400 InvalidArgument as the real server does.

Errors use the real server's body, grpc-gateway's `{"code", "message", "error"}`. Switches: `token` (required
`Authorization: Bearer <token>`, else 401), `mode = "unauthorized" | "forbidden" | "invalid"` to answer every
API call 401, 403, or 400 (template rejected) regardless. `requests` records (method, path) of every call.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
import ssl
import string
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from jsonschema import Draft4Validator

SWAGGER = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "argo-server.swagger.json"
GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6}  # HTTP status -> gRPC code, as grpc-gateway maps them

_ROUTES = [
    ("POST", re.compile(r"^/api/v1/workflow-templates/(?P<namespace>[^/]+)$"), "create_template",
     "/api/v1/workflow-templates/{namespace}"),
    ("GET", re.compile(r"^/api/v1/workflow-templates/(?P<namespace>[^/]+)/(?P<name>[^/]+)$"), "get_template",
     "/api/v1/workflow-templates/{namespace}/{name}"),
    ("PUT", re.compile(r"^/api/v1/workflow-templates/(?P<namespace>[^/]+)/(?P<name>[^/]+)$"), "update_template",
     "/api/v1/workflow-templates/{namespace}/{name}"),
    ("POST", re.compile(r"^/api/v1/workflows/(?P<namespace>[^/]+)/submit$"), "submit",
     "/api/v1/workflows/{namespace}/submit"),
    ("GET", re.compile(r"^/api/v1/workflows/(?P<namespace>[^/]+)/(?P<name>[^/]+)$"), "get_workflow",
     "/api/v1/workflows/{namespace}/{name}"),
]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@functools.cache
def swagger() -> dict:
    return json.loads(SWAGGER.read_text())


@functools.cache
def _validator(ref: str) -> Draft4Validator:
    return Draft4Validator({"$ref": ref, "definitions": swagger()["definitions"]})


def schema_for(method: str, route: str, what: str) -> str | None:
    """The $ref of a route's request body (`what="request"`) or 200 response (`what="response"`)."""
    operation = swagger()["paths"][route][method.lower()]
    if what == "response":
        return operation["responses"]["200"]["schema"]["$ref"]
    body = [p for p in operation.get("parameters", []) if p.get("in") == "body"]
    return body[0]["schema"]["$ref"] if body else None


def schema_errors_of(ref: str, document: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in _validator(ref).iter_errors(document)]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(start: str, seconds: int) -> str:
    """`start` plus some seconds: each pod of a stand-in run starts a little after the one before."""
    moment = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return datetime.fromtimestamp(moment.timestamp() + seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _suffix(n: int = 5) -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def validate_template(template: dict) -> None:
    """A few of the checks Argo's validate.go makes; raises ApiError 400 like the server's InvalidArgument."""
    spec = template.get("spec") or {}
    names = [t.get("name") for t in spec.get("templates", [])]
    entrypoint = spec.get("entrypoint")
    if entrypoint and entrypoint not in names:
        raise ApiError(400, f"spec.entrypoint template '{entrypoint}' is undefined")
    for tmpl in spec.get("templates", []):
        for task in (tmpl.get("dag") or {}).get("tasks", []):
            if task.get("template") not in names:
                raise ApiError(400, f"templates.{tmpl['name']}.tasks.{task.get('name')} "
                                    f"template '{task.get('template')}' not found")


class ArgoStandIn:
    """Start with `with ArgoStandIn(token=...) as argo:`; `argo.url` is the server URL."""

    def __init__(self, token: str | None = None, mode: str | None = None, fail_task: str | None = None,
                 tls: tuple[str, str] | None = None):
        self.token, self.mode, self.fail_task = token, mode, fail_task
        self.templates: dict[tuple[str, str], dict] = {}
        self.workflows: dict[tuple[str, str], dict] = {}
        self._progress: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, object]] = []
        self.schema_errors: list[str] = []
        self.response_errors: list[str] = []
        self._lock = threading.Lock()
        self._resource_version = 1000
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ArgoStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the API -----------------------------------------------------------------------------------------

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def create_template(self, namespace: str, body: dict) -> dict:
        template = copy.deepcopy(body.get("template") or {})
        meta = template.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(400, "WorkflowTemplate.argoproj.io \"\" is invalid: metadata.name: Required value")
        validate_template(template)
        if (namespace, name) in self.templates:
            raise ApiError(409, f"workflowtemplates.argoproj.io \"{name}\" already exists")
        meta.update(namespace=namespace, uid=f"{_suffix(8)}-{_suffix(4)}", resourceVersion=self._next_version(),
                    generation=1, creationTimestamp=_now())
        template.setdefault("apiVersion", "argoproj.io/v1alpha1")
        template.setdefault("kind", "WorkflowTemplate")
        self.templates[(namespace, name)] = template
        return template

    def get_template(self, namespace: str, name: str) -> dict:
        try:
            return self.templates[(namespace, name)]
        except KeyError:
            raise ApiError(404, f"workflowtemplates.argoproj.io \"{name}\" not found") from None

    def update_template(self, namespace: str, name: str, body: dict) -> dict:
        stored = self.get_template(namespace, name)
        template = copy.deepcopy(body.get("template") or {})
        meta = template.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL")
        validate_template(template)
        version = meta.get("resourceVersion")
        if not version:
            raise ApiError(400, f"WorkflowTemplate.argoproj.io \"{name}\" is invalid: metadata.resourceVersion: "
                                "Invalid value: 0x0: must be specified for an update")
        if version != stored["metadata"]["resourceVersion"]:
            raise ApiError(409, f"Operation cannot be fulfilled on workflowtemplates.argoproj.io \"{name}\": the "
                                "object has been modified; please apply your changes to the latest version and "
                                "try again")
        meta.update(name=name, namespace=namespace, uid=stored["metadata"]["uid"],
                    creationTimestamp=stored["metadata"]["creationTimestamp"],
                    generation=stored["metadata"].get("generation", 1) + 1, resourceVersion=self._next_version())
        template.setdefault("apiVersion", "argoproj.io/v1alpha1")
        template.setdefault("kind", "WorkflowTemplate")
        self.templates[(namespace, name)] = template
        return template

    def submit(self, namespace: str, body: dict) -> dict:
        kind = (body.get("resourceKind") or "").lower()
        if kind not in ("workflowtemplate", "workflowtemplates"):
            raise ApiError(400, f"Resource kind '{body.get('resourceKind')}' is not supported for submitting")
        template = self.get_template(namespace, body.get("resourceName") or "")
        options = body.get("submitOptions") or {}
        declared = {p["name"]: p for p in template["spec"].get("arguments", {}).get("parameters", [])}
        given = {}
        for item in options.get("parameters") or []:
            name, sep, value = item.partition("=")
            if not sep:
                raise ApiError(400, f"expected parameter of the form: NAME=VALUE. Received: {item}")
            if name not in declared:
                raise ApiError(400, f"spec.arguments.{name} is not a parameter of workflow template "
                                    f"{template['metadata']['name']}")
            given[name] = value
        parameters = []
        for name, param in declared.items():
            value = given.get(name, param.get("value"))
            if value is None:
                raise ApiError(400, f"spec.arguments.{name}.value is required")
            if param.get("enum") and value not in param["enum"]:
                raise ApiError(400, f"spec.arguments.{name}.value: {value} is not in the enum {param['enum']}")
            if name in given:
                parameters.append({"name": name, "value": value})
        labels = {"workflows.argoproj.io/workflow-template": template["metadata"]["name"]}
        for pair in filter(None, (options.get("labels") or "").split(",")):
            key, _, value = pair.partition("=")
            labels[key] = value
        generate = options.get("generateName") or f"{template['metadata']['name']}-"
        name = options.get("name") or generate + _suffix()
        workflow = {
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "generateName": generate, "namespace": namespace, "labels": labels,
                         "uid": f"{_suffix(8)}-{_suffix(4)}", "resourceVersion": self._next_version(),
                         "creationTimestamp": _now()},
            "spec": {"workflowTemplateRef": {"name": template["metadata"]["name"]},
                     "arguments": {"parameters": parameters}},
            "status": {},
        }
        self.workflows[(namespace, name)] = workflow
        self._progress[(namespace, name)] = 0
        return workflow

    def _pod_nodes(self, template: dict) -> list[str]:
        """Display names of the Pod nodes a run of the template creates, in order (fan-out: two shards)."""
        spec = template["spec"]
        entry = next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])
        names = []
        for task in entry.get("dag", {}).get("tasks", []):
            if "withParam" in task or "withItems" in task:
                names += [f"{task['name']}(0:0)", f"{task['name']}(1:1)"]
            else:
                names.append(task["name"])
        return names

    def get_workflow(self, namespace: str, name: str) -> dict:
        key = (namespace, name)
        if key not in self.workflows:
            raise ApiError(404, f"workflows.argoproj.io \"{name}\" not found")
        workflow = self.workflows[key]
        status = workflow["status"]
        if status.get("phase") in ("Succeeded", "Failed"):
            return workflow
        template = self.templates[(namespace, workflow["spec"]["workflowTemplateRef"]["name"])]
        pods = self._pod_nodes(template)
        step = self._progress[key]
        self._progress[key] = step + 1
        now = _now()
        status.setdefault("startedAt", now)
        if step == 0:
            status["phase"] = "Pending"
            return workflow
        done = step - 1  # pods finished before this poll; the next one is running
        root = {"id": name, "name": name, "displayName": name, "type": "DAG", "phase": "Running",
                "templateName": template["spec"]["entrypoint"], "startedAt": status["startedAt"], "children": []}
        nodes = {name: root}
        failed = False
        for index, display in enumerate(pods[:done + 1]):
            node_id = f"{name}-{abs(hash((name, display))) % 10**10}"
            task = display.split("(")[0]
            phase = "Succeeded" if index < done else "Running"
            if task == self.fail_task and index <= done:
                phase, failed = "Failed", True
            node = {"id": node_id, "name": f"{name}.{display}", "displayName": display, "type": "Pod",
                    "phase": phase, "templateName": task, "startedAt": _at(status["startedAt"], index),
                    "progress": "1/1" if phase == "Succeeded" else "0/1"}
            if phase != "Running":
                node["finishedAt"] = now
            if phase == "Failed":
                node["message"] = "Error (exit code 1)"
            nodes[node_id] = node
            root["children"].append(node_id)
            if failed:
                break
        finished = sum(1 for n in nodes.values() if n["type"] == "Pod" and n["phase"] == "Succeeded")
        status.update(phase="Running", nodes=nodes, progress=f"{finished}/{len(pods)}")
        if failed or done >= len(pods):
            phase = "Failed" if failed else "Succeeded"
            root.update(phase=phase, finishedAt=now)
            status.update(phase=phase, finishedAt=now)
            if failed:
                status["message"] = f"child '{node_id}' failed"
            if not failed:
                for node in nodes.values():  # the last running pod has finished too
                    if node["phase"] == "Running":
                        node.update(phase="Succeeded", finishedAt=now, progress="1/1")
                status["progress"] = f"{len(pods)}/{len(pods)}"
        return workflow

    # -- HTTP --------------------------------------------------------------------------------------------

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str) -> None:
                self._answer(status, {"code": GRPC.get(status, 2), "message": message, "error": message})

            def _serve(self, method: str) -> None:
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with standin._lock:
                    standin.requests.append((method, path))
                    for verb, pattern, action, route in _ROUTES:  # noqa: B007 - the matching route is used after the loop
                        match = pattern.match(path)
                        if verb == method and match:
                            break
                    else:
                        return self._error(404, f"Not Found: {method} {path}")
                    if standin.mode == "unauthorized" or (
                            standin.token and self.headers.get("Authorization") != f"Bearer {standin.token}"):
                        return self._error(401, "token not valid. see https://argo-workflows.readthedocs.io/en/"
                                                "latest/faq/")
                    if standin.mode == "forbidden":
                        resource = "workflows" if "workflows/" in path else "workflowtemplates"
                        return self._error(403, f"{resource}.argoproj.io is forbidden: User \"system:serviceaccount:"
                                                f"{match['namespace']}:distill-submit\" cannot {method.lower()} "
                                                f"resource \"{resource}\" in API group \"argoproj.io\" in the "
                                                f"namespace \"{match['namespace']}\"")
                    body = None
                    request_ref = schema_for(method, route, "request")
                    if request_ref:
                        try:
                            body = json.loads(raw or b"null")
                        except json.JSONDecodeError as exc:
                            return self._error(400, f"invalid JSON body: {exc}")
                        errors = schema_errors_of(request_ref, body)
                        standin.bodies.append((method, path, body))
                        if errors:
                            standin.schema_errors += [f"{method} {path}: {e}" for e in errors]
                            return self._error(400, f"request body does not match {request_ref}: {errors[0]}")
                    if standin.mode == "invalid" and action in ("create_template", "update_template"):
                        return self._error(400, "templates.train.container.image: image is required")
                    try:
                        args = [v for k, v in match.groupdict().items()]
                        result = getattr(standin, action)(*args, *([body] if request_ref else []))
                    except ApiError as exc:
                        return self._error(exc.status, exc.message)
                    result = copy.deepcopy(result)
                    errors = schema_errors_of(schema_for(method, route, "response"), result)
                    standin.response_errors += [f"{method} {path} answer: {e}" for e in errors]
                    return self._answer(200, result)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

        return Handler
