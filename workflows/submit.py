"""`make submit`: send the pipeline to an Argo Server and start a run.

Creates the WorkflowTemplate from `workflows/pipeline.yaml` (the Hera render) or updates it when it exists,
submits a Workflow from it (`workflowTemplateRef`) with the run id and the run options (`jobs.run_options`: the
profile; the --config file, --config-yaml and --set as one inline YAML; the backend) as parameters, prints the run's
Argo UI URL and, with `--watch`, follows the run node by node until it ends. It talks to the Argo Server's HTTP
API through Hera's `WorkflowsService`, configured from the environment:

  ARGO_SERVER                 the server, e.g. `https://localhost:2746` (required; no scheme means https)
  ARGO_TOKEN                  `Bearer <token>` or the bare token (client auth mode); unset sends none
  ARGO_NAMESPACE              namespace of the template and the runs (default: distill)
  ARGO_INSECURE_SKIP_VERIFY   `true` skips TLS verification (self-signed development servers only);
                              verification is on by default (a private CA: REQUESTS_CA_BUNDLE=<ca.pem>)

The default run id is the one `python -m jobs run-id` prints with the same run options (`jobs.cli.derive_run_id`: a
hash of card, prompts and config), so submitting the same inputs twice continues one run instead of redoing it.

Every failure is one line on stderr and a non-zero exit: 2 for bad input (no ARGO_SERVER, a bad run id or
config), 1 for the server (unreachable, TLS, 401/403, template rejected) or a run that ends other than Succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import requests
import yaml

from jobs.cli import derive_run_id
from jobs.config import PipelineConfig
from jobs.errors import InputError
from jobs.run_options import OneLineParser, add_run_options, pipeline_config, workflow_parameters
from jobs.store import StoreSettings

RENDERED = Path(__file__).with_name("pipeline.yaml")
DEFAULT_NAMESPACE = "distill"
TRUE = {"1", "true", "yes", "on"}
FINAL = {"Succeeded", "Failed", "Error"}


class SubmitError(Exception):
    """A failure to report as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Settings:
    server: str  # with scheme and a trailing slash
    token: str | None
    namespace: str
    verify: bool

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> Settings:
        server = (env.get("ARGO_SERVER") or "").strip()
        if not server:
            raise SubmitError("ARGO_SERVER is not set: export ARGO_SERVER=https://<argo-server>:2746 "
                              "(on kind: see `make cluster-up`)", code=2)
        if not re.match(r"^https?://", server):
            server = "https://" + server
        return cls(server=server.rstrip("/") + "/", token=(env.get("ARGO_TOKEN") or "").strip() or None,
                   namespace=(env.get("ARGO_NAMESPACE") or "").strip() or DEFAULT_NAMESPACE,
                   verify=(env.get("ARGO_INSECURE_SKIP_VERIFY") or "").strip().lower() not in TRUE)

    def ui_url(self, name: str) -> str:
        return f"{self.server}workflows/{self.namespace}/{name}"


class _TimeoutSession(requests.Session):
    """Hera's service sends requests without a timeout; a dead server must not hang `make submit`."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, **kwargs)


def service(settings: Settings, timeout: float = 30.0):
    from hera.workflows import WorkflowsService

    return WorkflowsService(host=settings.server, token=settings.token, namespace=settings.namespace,
                            verify_ssl=settings.verify, session=_TimeoutSession(timeout))


def _server_message(exc: Exception) -> str:
    """The server's own message out of Hera's "Server returned status code N with message: `...`"."""
    text = str(exc)
    match = re.search(r"with message: `(.*)`\s*$", text, re.S)
    return " ".join((match.group(1) if match else text).split())


@contextmanager
def talking_to(settings: Settings, action: str) -> Iterator[None]:
    """Turns what can go wrong on the wire into one SubmitError line."""
    from hera.exceptions import BadRequest, Forbidden, HeraException, NotFound, Unauthorized

    where = settings.server.rstrip("/")
    try:
        yield
    except requests.exceptions.SSLError as exc:
        reason = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else type(exc).__name__
        raise SubmitError(f"TLS verification of {where} failed ({reason}) while trying to {action}: trust its CA "
                          "(REQUESTS_CA_BUNDLE=<ca.pem>) or, for a development server only, set "
                          "ARGO_INSECURE_SKIP_VERIFY=true") from None
    except requests.exceptions.Timeout:
        raise SubmitError(f"the Argo Server at {where} did not answer in time while trying to {action}") from None
    except requests.exceptions.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
        raise SubmitError(f"cannot reach the Argo Server at {where} ({reason}) to {action}: is it running and "
                          "ARGO_SERVER right? (on kind: `make cluster-up` exposes it on localhost:2746)") from None
    except Unauthorized as exc:
        hint = "ARGO_TOKEN is not set" if not settings.token else "ARGO_TOKEN was not accepted"
        raise SubmitError(f"the Argo Server at {where} refused to {action}: 401 Unauthorized ({hint}; use "
                          f"ARGO_TOKEN=\"Bearer $(kubectl create token distill-submit -n {settings.namespace})\"): "
                          f"{_server_message(exc)}") from None
    except Forbidden as exc:
        raise SubmitError(f"not allowed to {action} in namespace {settings.namespace}: 403 Forbidden: "
                          f"{_server_message(exc)}") from None
    except BadRequest as exc:
        raise SubmitError(f"the Argo Server rejected the request to {action}: 400 Bad Request: "
                          f"{_server_message(exc)}") from None
    except NotFound as exc:
        raise SubmitError(f"could not {action}: 404 Not Found: {_server_message(exc)}") from None
    except HeraException as exc:
        raise SubmitError(f"could not {action}: {_server_message(exc)}") from None


def load_template(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SubmitError(f"{path}: cannot read ({exc.strerror}); run `make render`", code=2) from None
    except yaml.YAMLError as exc:
        raise SubmitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})", code=2) from None
    if not isinstance(doc, dict) or doc.get("kind") != "WorkflowTemplate" or not doc.get("metadata", {}).get("name"):
        raise SubmitError(f"{path}: not a WorkflowTemplate with a metadata.name", code=2)
    return doc


def apply_template(svc, settings: Settings, doc: dict) -> str:
    """Create the WorkflowTemplate, or update it when it exists; 'created', 'updated' or 'unchanged'.

    An update keeps the stored object's labels and annotations (Helm's and Argo CD's ownership marks) and sends
    its resourceVersion, as the Kubernetes API requires; a conflicting concurrent change is retried once.
    """
    from hera.exceptions import AlreadyExists, NotFound
    from hera.workflows.models import (
        ObjectMeta,
        WorkflowTemplate,
        WorkflowTemplateCreateRequest,
        WorkflowTemplateUpdateRequest,
    )

    name, ns = doc["metadata"]["name"], settings.namespace
    wanted = WorkflowTemplate.model_validate(doc)
    for attempt in range(2):
        with talking_to(settings, f"read WorkflowTemplate {name}"):
            try:
                current = svc.get_workflow_template(name, namespace=ns)
            except NotFound:
                current = None
        if current is None:
            with talking_to(settings, f"create WorkflowTemplate {name}"):
                try:
                    svc.create_workflow_template(WorkflowTemplateCreateRequest(namespace=ns, template=wanted),
                                                 namespace=ns)
                    return "created"
                except AlreadyExists:
                    continue  # created meanwhile: read it again and update it
        if _dump(current.spec) == _dump(wanted.spec):
            return "unchanged"
        meta = current.metadata
        updated = wanted.model_copy(deep=True)
        updated.metadata = ObjectMeta(name=name, namespace=ns, resource_version=meta.resource_version,
                                      labels={**(meta.labels or {}), **(wanted.metadata.labels or {})} or None,
                                      annotations={**(meta.annotations or {}),
                                                   **(wanted.metadata.annotations or {})} or None)
        try:
            with talking_to(settings, f"update WorkflowTemplate {name}"):
                svc.update_workflow_template(
                    name, WorkflowTemplateUpdateRequest(name=name, namespace=ns, template=updated), namespace=ns)
            return "updated"
        except SubmitError as exc:
            if attempt == 0 and "has been modified" in str(exc):
                continue
            raise
    raise SubmitError(f"WorkflowTemplate {name} kept changing on the server; try again")


def _dump(model) -> str:
    return model.model_dump_json(exclude_none=True, by_alias=True) if model is not None else ""


def submit(svc, settings: Settings, template: str, parameters: dict[str, str], labels: dict[str, str]) -> str:
    """Submit a Workflow from the template; returns its generated name."""
    from hera.workflows.models import SubmitOpts, WorkflowSubmitRequest

    request = WorkflowSubmitRequest(
        namespace=settings.namespace, resource_kind="WorkflowTemplate", resource_name=template,
        submit_options=SubmitOpts(generate_name=f"{template}-",
                                  parameters=[f"{k}={v}" for k, v in parameters.items()],
                                  labels=",".join(f"{k}={v}" for k, v in labels.items())))
    with talking_to(settings, f"submit a run of {template}"):
        workflow = svc.submit_workflow(request, namespace=settings.namespace)
    return workflow.metadata.name


def watch(svc, settings: Settings, name: str, out: TextIO, interval: float = 5.0,
          timeout: float | None = None) -> tuple[str, str]:
    """Poll the run until it ends, printing each step (Pod node) when its phase changes; (phase, message)."""
    started, last = time.monotonic(), None
    seen: dict[str, str] = {}
    failures = 0
    while True:
        try:
            with talking_to(settings, f"read run {name}"):
                workflow = svc.get_workflow(name, namespace=settings.namespace)
            failures = 0
        except SubmitError as exc:
            # a dropped connection while following a long run is worth a few retries, an answer is not
            failures += 1
            if failures > 3 or ("cannot reach" not in str(exc) and "did not answer" not in str(exc)):
                raise
            time.sleep(interval)
            continue
        status = workflow.status
        phase = (status.phase if status else None) or "Pending"
        nodes = [n for n in ((status.nodes or {}).values() if status else []) if n.type == "Pod"]
        for node in sorted(nodes, key=lambda n: (str(n.started_at.root) if n.started_at else "", n.id)):
            node_phase = node.phase or "Pending"
            if seen.get(node.id) != node_phase:
                seen[node.id] = node_phase
                note = f"  {node.message}" if node.message and node_phase in ("Failed", "Error") else ""
                print(f"  {node.display_name or node.name:<24} {node_phase}{note}", file=out, flush=True)
        progress = f" ({status.progress})" if status and status.progress else ""
        if phase != last:
            print(f"{name}: {phase}{progress}", file=out, flush=True)
            last = phase
        if phase in FINAL:
            return phase, (status.message or "") if status else ""
        if timeout is not None and time.monotonic() - started > timeout:
            raise SubmitError(f"run {name} still {phase} after {timeout:.0f}s; it goes on: {settings.ui_url(name)}")
        time.sleep(interval)


def default_run_id(pipeline: PipelineConfig) -> str:
    """What `python -m jobs run-id` prints with the same run options."""
    try:
        return derive_run_id(pipeline, StoreSettings.from_env())
    except InputError as exc:
        raise SubmitError(f"cannot derive the run id: {exc}", code=2) from None


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m workflows.submit", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="environment: ARGO_SERVER, ARGO_TOKEN, ARGO_NAMESPACE, ARGO_INSECURE_SKIP_VERIFY")
    add_run_options(p)
    p.add_argument("--image-registry", help="registry prefix of the phase images (default: the template's)")
    p.add_argument("--image-tag", help="tag of the phase images (default: the template's)")
    p.add_argument("--template", type=Path, default=RENDERED, help="the rendered WorkflowTemplate to send")
    p.add_argument("--no-apply", action="store_true",
                   help="do not create or update the template (it is managed elsewhere, e.g. Argo CD); only submit")
    p.add_argument("--watch", action="store_true", help="follow the run until it ends; exit 1 unless it succeeds")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls with --watch (default: 5)")
    p.add_argument("--timeout", type=float, help="with --watch, give up following after this many seconds")
    return p


def main(argv: list[str] | None = None, env=None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = parser().parse_args(argv)
        settings = Settings.from_env(os.environ if env is None else env)
        doc = load_template(args.template)
        # a config the steps would refuse is refused here, before anything is sent
        pipeline = pipeline_config(args)
        run_id = args.run_id or default_run_id(pipeline)
        if not settings.verify:
            print("warning: ARGO_INSECURE_SKIP_VERIFY is set: the server's TLS certificate is not checked", file=err)
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        svc = service(settings)
        name = doc["metadata"]["name"]
        if not args.no_apply:
            outcome = apply_template(svc, settings, doc)
            print(f"WorkflowTemplate {settings.namespace}/{name} {outcome}", file=out)
        parameters = {"run-id": run_id, **workflow_parameters(args)}
        if args.image_registry:
            parameters["image-registry"] = args.image_registry
        if args.image_tag:
            parameters["image-tag"] = args.image_tag
        workflow = submit(svc, settings, name, parameters, labels={"distill.run-id": run_id})
        print(f"submitted {workflow} (run id {run_id}, profile {args.profile})", file=out)
        print(settings.ui_url(workflow), file=out, flush=True)
        if not args.watch:
            return 0
        phase, message = watch(svc, settings, workflow, out, interval=args.interval, timeout=args.timeout)
        if phase != "Succeeded":
            raise SubmitError(f"run {workflow} ended {phase}{': ' + message if message else ''}; "
                              f"logs: {settings.ui_url(workflow)}")
        return 0
    except SubmitError as exc:
        print(f"error: {exc}", file=err)
        return exc.code
    except InputError as exc:
        print(f"error: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
