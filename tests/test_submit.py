"""`make submit` (workflows/submit.py) against a stand-in Argo Server on loopback (tests/argo_standin.py).

The stand-in checks every request body against the Argo Server API schema (../shared/schemas/
argo-server.swagger.json) and answers as the server does; these tests show create-or-update of the template,
submit, the printed UI URL, --watch to the end, and the one-line errors.
"""

from __future__ import annotations

import copy
import io
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from argo_standin import SWAGGER, ArgoStandIn

from jobs.phases import PHASE
from workflows.submit import RENDERED, main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "stand-in-token-0123456789"
pytestmark = [
    pytest.mark.skipif(not SWAGGER.is_file(),
                       reason=f"Argo Server API schema not found at {SWAGGER} (../shared/schemas)"),
    # Hera 7.1's service calls pydantic's deprecated `.json()`; not ours to fix
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
]


def run(argo_url: str, *args: str, token: str | None = TOKEN, **env) -> tuple[int, str, str]:
    environment = {"ARGO_SERVER": argo_url, "ARGO_NAMESPACE": "distill", **env}
    if token:
        environment["ARGO_TOKEN"] = token
    out, err = io.StringIO(), io.StringIO()
    code = main(["--profile", "ci", *args], env=environment, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


def expected_run_id(profile: str = "ci") -> str:
    """What `python -m jobs run-id --profile ci` prints."""
    from jobs.cli import main as jobs_main

    buffer = io.StringIO()
    stdout, sys.stdout = sys.stdout, buffer
    try:
        assert jobs_main(["run-id", "--profile", profile]) == 0
    finally:
        sys.stdout = stdout
    return buffer.getvalue().strip()


def test_create_submit_print_url_and_watch_to_success():
    rendered = yaml.safe_load(RENDERED.read_text())
    with ArgoStandIn(token=TOKEN) as argo:
        code, out, err = run(argo.url, "--watch", "--interval", "0.01")
        assert code == 0, err
        assert argo.schema_errors == [] and argo.response_errors == []
        # create (the template did not exist), then submit from it, then polls
        assert argo.requests[:3] == [("GET", "/api/v1/workflow-templates/distill/distill"),
                                     ("POST", "/api/v1/workflow-templates/distill"),
                                     ("POST", "/api/v1/workflows/distill/submit")]
        stored = argo.templates[("distill", "distill")]
        assert stored["spec"] == rendered["spec"]  # the Hera render, unchanged on the way
        (workflow,) = argo.workflows.values()
        name = workflow["metadata"]["name"]
        assert workflow["spec"]["workflowTemplateRef"] == {"name": "distill"}
        run_id = expected_run_id()
        assert {"name": "run-id", "value": run_id} in workflow["spec"]["arguments"]["parameters"]
        assert {"name": "profile", "value": "ci"} in workflow["spec"]["arguments"]["parameters"]
        assert workflow["metadata"]["labels"]["distill.run-id"] == run_id
    lines = out.splitlines()
    assert lines[0] == "WorkflowTemplate distill/distill created"
    assert lines[1] == f"submitted {name} (run id {run_id}, profile ci)"
    assert lines[2] == f"{argo.url}/workflows/distill/{name}"
    # node progress, in DAG order, each step Running then Succeeded; the fan-out shows both shards
    steps = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[1] == "Succeeded"]
    shards = ["teacher(0:0)", "teacher(1:1)"]  # the ci profile's two shards, as Argo names fan-out steps
    assert steps == [step for label, phase in PHASE.items() for step in (shards if phase.sharded else [label])]
    assert f"{name}: Pending" in lines and f"{name}: Succeeded ({len(steps)}/{len(steps)})" == lines[-1]
    assert err == ""


def test_update_keeps_ownership_and_unchanged_sends_nothing():
    rendered = yaml.safe_load(RENDERED.read_text())
    with ArgoStandIn(token=TOKEN) as argo:
        old = copy.deepcopy(rendered)
        old["spec"]["arguments"]["parameters"][1]["value"] = "full"  # an older render on the server
        old["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "Helm"}
        old["metadata"]["annotations"] = {"meta.helm.sh/release-name": "distill"}
        argo.create_template("distill", {"template": old})
        code, out, err = run(argo.url, "--run-id", "ci-run-1")
        assert code == 0, err
        assert out.splitlines()[0] == "WorkflowTemplate distill/distill updated"
        put = [body for method, _, body in argo.bodies if method == "PUT"]
        assert len(put) == 1 and put[0]["template"]["metadata"]["resourceVersion"]
        stored = argo.templates[("distill", "distill")]
        assert stored["spec"] == rendered["spec"]
        assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
        assert stored["metadata"]["annotations"] == {"meta.helm.sh/release-name": "distill"}
        code, out, err = run(argo.url, "--run-id", "ci-run-2")
        assert code == 0 and out.splitlines()[0] == "WorkflowTemplate distill/distill unchanged"
        assert [m for m, _ in argo.requests].count("PUT") == 1
        assert argo.schema_errors == [] and argo.response_errors == []


def test_parameters_passed_through(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("train: {steps: 5, batch_size: 2}\n")
    with ArgoStandIn(token=TOKEN) as argo:
        code, _, err = run(argo.url, "--run-id", "r1", "--config", str(config), "--config-yaml", "train: {steps: 4}",
                           "--set", "train.lora_rank=4", "--backend", "tinker",
                           "--image-registry", "kind.local/distill", "--image-tag", "dev")
        assert code == 0, err
        (workflow,) = argo.workflows.values()
        # the file, the inline YAML and the settings as the one inline YAML the steps read; the backend beside it
        assert {p["name"]: p["value"] for p in workflow["spec"]["arguments"]["parameters"]} == {
            "run-id": "r1", "profile": "ci", "config": "train:\n  batch_size: 2\n  lora_rank: 4\n  steps: 4",
            "backend": "tinker", "image-registry": "kind.local/distill", "image-tag": "dev"}
        assert argo.schema_errors == []


def test_watch_reports_a_failed_run():
    with ArgoStandIn(token=TOKEN, fail_task="train") as argo:
        code, out, err = run(argo.url, "--run-id", "r1", "--watch", "--interval", "0.01")
    assert code == 1
    line = one_line(err)
    assert "ended Failed" in line and "/workflows/distill/" in line
    assert "  train                    Failed  Error (exit code 1)" in out.splitlines()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line():
    code, out, err = run(f"http://127.0.0.1:{closed_port()}", "--run-id", "r1")
    assert code == 1 and out == ""
    assert "cannot reach the Argo Server at http://127.0.0.1:" in one_line(err)


@pytest.mark.parametrize("mode, token, expected", [
    (None, "wrong-token", "401 Unauthorized (ARGO_TOKEN was not accepted"),
    (None, None, "401 Unauthorized (ARGO_TOKEN is not set"),
    ("unauthorized", TOKEN, "401 Unauthorized"),
    ("forbidden", TOKEN, "403 Forbidden: workflowtemplates.argoproj.io is forbidden"),
    ("invalid", TOKEN, "400 Bad Request: templates.train.container.image: image is required"),
])
def test_server_refusals_are_one_line(mode, token, expected):
    with ArgoStandIn(token=TOKEN, mode=mode) as argo:
        code, _, err = run(argo.url, "--run-id", "r1", token=token)
    assert code == 1
    assert expected in one_line(err)
    assert not argo.workflows


def test_invalid_template_rejected_by_server_checks(tmp_path):
    broken = yaml.safe_load(RENDERED.read_text())
    broken["spec"]["entrypoint"] = "no-such-template"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with ArgoStandIn(token=TOKEN) as argo:
        code, _, err = run(argo.url, "--run-id", "r1", "--template", str(path))
        assert argo.schema_errors == []  # well-formed, but Argo's validation refuses it
    assert code == 1
    line = one_line(err)
    assert "create WorkflowTemplate distill: 400 Bad Request" in line and "no-such-template" in line


def test_bad_input_exits_2():
    code, _, err = run("", "--run-id", "r1")
    assert code == 2 and "ARGO_SERVER is not set" in one_line(err)
    with ArgoStandIn(token=TOKEN) as argo:
        code, _, err = run(argo.url, "--run-id", "bad/run id")
        assert code == 2 and "run id 'bad/run id' is not valid" in one_line(err)
        code, _, err = run(argo.url, "--config", "train: [unclosed")
        assert code == 2 and "argument --config: no such file 'train: [unclosed'" in one_line(err)
        code, _, err = run(argo.url, "--run-id", "r1", "--config-yaml", "train: [unclosed")
        assert code == 2 and "--config-yaml:1:" in one_line(err) and "not valid YAML" in err
        code, _, err = run(argo.url, "--run-id", "r1", "--set", "train.steps=0")
        assert code == 2 and "config train.steps:" in one_line(err)
        code, _, err = run(argo.url, "--set", "ingest.card=/no/such/card.yaml")
        assert code == 2 and "cannot derive the run id: /no/such/card.yaml: cannot read" in one_line(err)
        assert argo.requests == []


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not found: cannot make a self-signed certificate for the TLS test")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_is_verified_by_default(self_signed, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with ArgoStandIn(token=TOKEN, tls=self_signed) as argo:
        assert argo.url.startswith("https://")
        code, _, err = run(argo.url, "--run-id", "r1")
        assert code == 1
        line = one_line(err)
        assert "TLS verification of https://127.0.0.1:" in line and "ARGO_INSECURE_SKIP_VERIFY" in line
        assert argo.requests == []  # nothing got through the handshake
        code, out, err = run(argo.url, "--run-id", "r1", ARGO_INSECURE_SKIP_VERIFY="true")
        assert code == 0, err
        assert "TLS certificate is not checked" in err
        assert out.splitlines()[0] == "WorkflowTemplate distill/distill created"
        # a trusted CA (here: the certificate itself) works without skipping verification
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", self_signed[0])
        code, _, err = run(argo.url, "--run-id", "r2")
        assert code == 0, err


def test_standin_holds_requests_to_the_schema():
    """The stand-in itself: a body that breaks the API schema is refused and recorded."""
    with ArgoStandIn() as argo:
        answer = requests.post(f"{argo.url}/api/v1/workflow-templates/distill",
                               json={"template": {"metadata": {"name": "x"}, "spec": {"templates": "not-a-list"}}},
                               timeout=10)
        assert answer.status_code == 400 and answer.json()["code"] == 3
        assert argo.schema_errors and "templates" in argo.schema_errors[0]


def test_cli_entry_point_one_line_error():
    result = subprocess.run([sys.executable, "-m", "workflows.submit", "--run-id", "r1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "ARGO_SERVER": f"http://127.0.0.1:{closed_port()}"})
    assert result.returncode == 1
    assert "cannot reach the Argo Server" in one_line(result.stderr)


def test_no_apply_only_submits():
    with ArgoStandIn(token=TOKEN) as argo:
        argo.create_template("distill", {"template": yaml.safe_load(RENDERED.read_text())})
        code, out, err = run(argo.url, "--run-id", "r1", "--no-apply")
        assert code == 0, err
        assert argo.requests == [("POST", "/api/v1/workflows/distill/submit")]
        assert out.splitlines()[0].startswith("submitted distill-")
