"""The Helm chart (helm/distill): lint, render every ci/*-values.yaml, validate every document, checkov.

Argo kinds are validated against Argo's JSON schema and its CRDs made strict (unknown fields fail), core kinds
against the Kubernetes schemas (`kubernetes-validate`, strict). The chart's WorkflowTemplate must be the Hera
render byte for byte, and no rendered manifest may carry a secret value.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from test_workflow_render import ARGO_KINDS, RENDERED, ROOT, argo_errors, needs_schemas

CHART = ROOT / "helm" / "distill"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCENARIOS = [None, *CI_VALUES]
SCENARIO_IDS = ["defaults", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
NAMESPACE = "distill"
# Kubernetes versions the core kinds must validate against: the chart's kubeVersion floor's neighbourhood and
# the newest schemas kubernetes-validate ships
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _helm() -> str | None:
    local = ROOT / ".venv" / "bin" / "helm"
    return str(local) if local.is_file() else shutil.which("helm")


HELM = _helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found: run `make setup` (infra/install-helm.sh)")


def helm(*args: str) -> str:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


@functools.cache
def template(values: Path | None = None, *sets: str) -> str:
    args = ["template", "distill", str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return helm(*args)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(text: str, kind: str) -> list[dict]:
    return [d for d in documents(text) if d["kind"] == kind]


def test_ci_scenarios_exist():
    assert {p.name for p in CI_VALUES} >= {"minio-values.yaml", "tinker-values.yaml", "aws-values.yaml"}


@needs_helm
@pytest.mark.parametrize("values", SCENARIOS, ids=SCENARIO_IDS)
def test_helm_lint(values):
    out = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in out


@needs_helm
@needs_schemas
@pytest.mark.parametrize("values", SCENARIOS, ids=SCENARIO_IDS)
def test_rendered_documents_validate(values):
    docs = documents(template(values))
    kinds = {d["kind"] for d in docs}
    assert {"WorkflowTemplate", "CronWorkflow", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= kinds
    problems = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("argoproj.io/"):
            assert doc["kind"] in ARGO_KINDS, where
            problems += [f"{where}: {e}" for e in argo_errors(doc)]
        else:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    problems.append(f"{where} (Kubernetes {version}): {exc.message}")
    assert problems == []


@needs_helm
def test_workflow_template_is_the_hera_render_byte_for_byte():
    from workflows.pipeline import render

    source = render()
    assert RENDERED.read_text() == source, "workflows/pipeline.yaml is stale: run `make render`"
    copy = CHART / "files" / "pipeline.yaml"
    assert copy.read_bytes() == RENDERED.read_bytes(), "helm/distill/files/pipeline.yaml differs: run `make chart-sync`"
    output = template(None)
    marker = "# Source: distill/templates/workflowtemplate.yaml\n"
    start = output.index(marker) + len(marker)
    end = output.find("\n---\n", start)
    body = output[start:] if end < 0 else output[start:end + 1]
    # helm trims each document and ends it with one newline: the document is the render, byte for byte
    assert body == source
    for values in CI_VALUES:
        assert by_kind(template(values), "WorkflowTemplate") == [yaml.safe_load(source)]


def test_the_values_schema_offers_the_profiles_and_backends_the_code_knows():
    from jobs.config import BACKENDS, PROFILES

    run = json.loads((CHART / "values.schema.json").read_text())["properties"]["run"]["properties"]
    assert run["profile"]["enum"] == list(PROFILES) and run["backend"]["enum"] == ["", *BACKENDS]


@needs_helm
def test_names_the_dag_refers_to_are_the_charts():
    dag = yaml.safe_load(RENDERED.read_text())
    docs = documents(template(None))
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ServiceAccount", dag["spec"]["serviceAccountName"]) in names
    assert ("ConfigMap", dag["spec"]["artifactRepositoryRef"]["configMap"]) in names
    config_maps, secrets = set(), set()
    for tmpl in dag["spec"]["templates"]:
        for env in tmpl.get("container", {}).get("env", []):
            ref = env.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                config_maps.add((ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]))
            if "secretKeyRef" in ref:
                secrets.add((ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]))
    data = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    for name, key in config_maps:
        assert key in data.get(name, {}), f"the DAG reads {name}/{key}, which the chart does not create"
    assert secrets == {("distill-s3", "access-key"), ("distill-s3", "secret-key"), ("distill-hub", "token"),
                       ("distill-tinker", "api-key")}
    ref = dag["spec"]["artifactRepositoryRef"]
    repo = yaml.safe_load(data[ref["configMap"]][ref["key"]])
    assert repo["archiveLogs"] is True
    assert repo["s3"]["accessKeySecret"] == {"name": "distill-s3", "key": "access-key"}
    assert repo["s3"]["secretKeySecret"] == {"name": "distill-s3", "key": "secret-key"}


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                    # AWS access key id
    re.compile(r"hf_[A-Za-z0-9]{30,}"),                 # Hugging Face token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(password|secret[-_]?key|api[-_]?key|token)\s*:\s*['\"]?[A-Za-z0-9+/=_-]{12,}"),
]


@needs_helm
@pytest.mark.parametrize("values", SCENARIOS, ids=SCENARIO_IDS)
def test_no_secret_values_in_rendered_manifests(values):
    text = template(values, "events.enabled=true")
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), pattern.pattern
    for doc in documents(text):
        if doc["kind"] == "Secret":  # only the webhook client's token, which Kubernetes fills in
            assert doc["type"] == "kubernetes.io/service-account-token"
            assert not doc.get("data") and not doc.get("stringData")
    dag = yaml.safe_load(RENDERED.read_text())
    for tmpl in dag["spec"]["templates"]:
        for env in tmpl.get("container", {}).get("env", []):
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                assert "value" not in env and "secretKeyRef" in env["valueFrom"], env["name"]


WRITE_VERBS = {"update", "delete", "deletecollection", "escalate", "bind", "impersonate"}


@needs_helm
def test_rbac_is_least_privilege():
    docs = documents(template(None, "events.enabled=true"))
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "Role"}
    assert roles["distill-workflow"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                                          "verbs": ["create", "patch"]}]
    for name, rules in roles.items():
        for rule in rules:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], name
            assert "secrets" not in rule["resources"], name
            if name != "distill-submit":
                assert not WRITE_VERBS & set(rule["verbs"]), name
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert bindings["distill-workflow"]["subjects"] == [{"kind": "ServiceAccount", "name": "distill-workflow",
                                                          "namespace": NAMESPACE}]


@needs_helm
def test_hardened_pod_security():
    dag = yaml.safe_load(RENDERED.read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"] == dag["spec"]["securityContext"]
    assert dag["spec"]["securityContext"]["runAsNonRoot"] is True
    assert dag["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for tmpl in dag["spec"]["templates"]:
        if "container" in tmpl:
            assert tmpl["container"]["securityContext"] == {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]}}, tmpl["name"]
    (cron,) = by_kind(template(None), "CronWorkflow")
    assert cron["spec"]["workflowSpec"]["securityContext"] == values["podSecurityContext"]
    assert cron["spec"]["workflowSpec"]["serviceAccountName"] == "distill-workflow"


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_each_scenario_runs_a_config_the_phases_accept(values):
    """The parameters the chart's scheduled runs pass are what every phase loads (`python -m jobs` does the same)."""
    from jobs.config import backend_override, load_pipeline_config

    (cron,) = by_kind(template(values), "CronWorkflow")
    params = {p["name"]: p["value"] for p in cron["spec"]["workflowSpec"]["arguments"]["parameters"]}
    pipeline = load_pipeline_config(params["profile"], overrides=backend_override(params["backend"]),
                                    inline=params["config"])
    if values.name == "tinker-values.yaml":
        assert pipeline.model.backend == "tinker" and pipeline.train.steps == 1000


@needs_helm
def test_cron_is_off_by_default():
    (cron,) = by_kind(template(None), "CronWorkflow")
    spec = cron["spec"]
    assert spec["suspend"] is True and isinstance(spec["schedules"], list) and spec["schedules"]
    assert spec["workflowSpec"]["workflowTemplateRef"] == {"name": "distill"}
    params = {p["name"]: p["value"] for p in spec["workflowSpec"]["arguments"]["parameters"]}
    assert params == {"run-id": "scheduled", "profile": "demo", "config": "{}", "backend": "",
                      "image-registry": "localhost/distill", "image-tag": "0.1.0"}
    (cron,) = by_kind(template(None, "cron.suspend=false"), "CronWorkflow")
    assert cron["spec"]["suspend"] is False
    assert by_kind(template(None, "cron.enabled=false"), "CronWorkflow") == []


@needs_helm
def test_event_binding_retrains_on_card_change_with_commit_as_run_id():
    assert by_kind(template(None), "WorkflowEventBinding") == []  # off unless asked for
    (binding,) = by_kind(template(None, "events.enabled=true"), "WorkflowEventBinding")
    selector = binding["spec"]["event"]["selector"]
    assert 'discriminator == "github"' in selector
    assert 'payload.ref == "refs/heads/main"' in selector
    assert '# == "jobs/assets/cards/beethoven.yaml"' in selector
    assert (ROOT / "jobs" / "assets" / "cards" / "beethoven.yaml").is_file()  # the default path is the real card
    params = {p["name"]: p for p in binding["spec"]["submit"]["arguments"]["parameters"]}
    assert params["run-id"] == {"name": "run-id", "valueFrom": {"event": "payload.after"}}
    assert params["image-tag"] == {"name": "image-tag", "valueFrom": {"event": "payload.after"}}
    assert binding["spec"]["submit"]["workflowTemplateRef"] == {"name": "distill"}
    (binding,) = by_kind(template(None, "events.enabled=true", "events.imageTagFromCommit=false"),
                         "WorkflowEventBinding")
    params = {p["name"]: p for p in binding["spec"]["submit"]["arguments"]["parameters"]}
    assert params["image-tag"] == {"name": "image-tag", "value": "0.1.0"}


@needs_helm
def test_artifact_repository_per_scenario():
    def repo(values):
        (cm,) = [d for d in by_kind(template(values), "ConfigMap")
                 if d["metadata"]["name"] == "distill-artifact-repository"]
        return yaml.safe_load(cm["data"]["default"])["s3"]

    minio = repo(CHART / "ci" / "minio-values.yaml")
    assert minio["endpoint"] == "minio.minio.svc.cluster.local:9000" and minio["insecure"] is True
    aws = repo(CHART / "ci" / "aws-values.yaml")
    assert aws["endpoint"] == "s3.eu-west-1.amazonaws.com" and aws["insecure"] is False
    assert aws["useSDKCreds"] is True and "accessKeySecret" not in aws


def test_every_values_key_is_documented():
    """helm-docs style: a `# --` comment right above every key (children of podSecurityContext and other
    objects documented as a whole excepted)."""
    whole = {"podSecurityContext"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        stack = [(i, k) for i, k in stack if i < indent]
        inside_whole = any(k in whole for _, k in stack)
        stack.append((indent, key))
        if inside_whole:
            continue
        above = number - 1
        comment = []
        while above >= 0 and lines[above].strip().startswith("#"):
            comment.append(lines[above].strip())
            above -= 1
        if not any(c.startswith("# --") for c in comment):
            missing.append(".".join(k for _, k in stack))
    assert missing == []


def test_argocd_application_points_at_the_chart():
    (app,) = documents((ROOT / "infra" / "argocd-application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").is_file()
    for values_file in source["helm"]["valueFiles"]:
        assert (ROOT / source["path"] / values_file).is_file(), values_file
    assert app["spec"]["destination"]["namespace"] == NAMESPACE


def test_infra_scripts_parse():
    for script in sorted((ROOT / "infra").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    kind_config = yaml.safe_load((ROOT / "infra" / "kind-config.yaml").read_text())
    assert kind_config["kind"] == "Cluster" and kind_config["apiVersion"] == "kind.x-k8s.io/v1alpha4"


def _checkov() -> str | None:
    local = ROOT / ".venv" / "bin" / "checkov"
    return str(local) if local.exists() else shutil.which("checkov")


@needs_helm
@pytest.mark.skipif(_checkov() is None,
                    reason="checkov not found: run infra/install-checkov.sh .venv/bin .venv/bin/python")
def test_checkov_on_the_rendered_chart(tmp_path):
    """No failed check on any scenario; every skipped check is justified inline (`checkov:skip=ID: reason`)."""
    for values, name in zip(SCENARIOS, SCENARIO_IDS, strict=True):
        text = template(values, "events.enabled=true")
        # one document per file: checkov's Argo Workflows runner reads only single-document files
        for index, chunk in enumerate(text.split("\n---\n")):
            if re.search(r"^kind:", chunk, re.M):
                (tmp_path / f"{name}-{index:02d}.yaml").write_text(chunk.lstrip("-\n") + "\n")
    result = subprocess.run(
        [_checkov(), "-d", str(tmp_path), "--framework", "kubernetes", "argo_workflows", "secrets",
         "--output", "json", "--skip-download", "--quiet"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_COLOR": "1"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed, unjustified, checked = [], [], set()
    for report in reports:
        checked.add(report["check_type"])
        for check in report["results"].get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}")
        for check in report["results"].get("skipped_checks", []):
            reason = (check.get("check_result") or {}).get("suppress_comment", "").strip()
            if len(reason) < 20:
                unjustified.append(f"{check['check_id']} {check['resource']}")
    assert failed == []
    assert unjustified == []
    assert {"kubernetes", "argo_workflows"} <= checked
