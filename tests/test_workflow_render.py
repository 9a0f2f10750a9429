"""The committed render of the Hera DAG (workflows/pipeline.yaml) matches the DAG and Argo's schemas.

The schema helpers here are shared with tests/test_chart.py: Argo's JSON schema (`schema.json`) and Argo's CRDs
made strict (`additionalProperties: false` added recursively, as `kubeconform -strict` does), both from
../shared/schemas (see its README). Tests that need them skip, saying why, when that folder is absent.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator, Draft202012Validator

from jobs.phases import PHASE
from workflows.local.runner import check_supported
from workflows.pipeline import render

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
RENDERED = ROOT / "workflows" / "pipeline.yaml"
needs_schemas = pytest.mark.skipif(not (SCHEMAS / "argo-workflows.schema.json").is_file(),
                                   reason=f"Argo schemas not found at {SCHEMAS} (../shared/schemas)")
ARGO_KINDS = ("Workflow", "WorkflowTemplate", "CronWorkflow", "ClusterWorkflowTemplate", "WorkflowEventBinding")
CRD_FILES = {"Workflow": "argoproj.io_workflows.yaml", "WorkflowTemplate": "argoproj.io_workflowtemplates.yaml",
             "CronWorkflow": "argoproj.io_cronworkflows.yaml",
             "WorkflowEventBinding": "argoproj.io_workfloweventbindings.yaml"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _argo_schema() -> dict:
    return json.loads((SCHEMAS / "argo-workflows.schema.json").read_text())


@functools.cache
def argo_validator(kind: str) -> Draft202012Validator:
    """Argo's JSON schema for one kind: a small root that $refs its definition and carries all of them."""
    schema = _argo_schema()
    return Draft202012Validator({"$schema": schema["$schema"],
                                 "$ref": f"#/definitions/io.argoproj.workflow.v1alpha1.{kind}",
                                 "definitions": schema["definitions"]})


def strict(schema: dict) -> dict:
    """Every object schema that lists `properties` gets `additionalProperties: false`, recursively, unless it
    says it keeps unknown fields; so a misspelled or unknown field fails, as the API server's pruning would drop it."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_validator(kind: str) -> Draft4Validator:
    crd = yaml.load((SCHEMAS / "crds" / CRD_FILES[kind]).read_text(), Loader=_Loader)
    return Draft4Validator(strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))


def argo_errors(doc: dict) -> list[str]:
    """Errors of one Argo document against the JSON schema and the strict CRD (where one is shipped)."""
    kind = doc.get("kind")
    errors = [f"schema.json {'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in argo_validator(kind).iter_errors(doc)]
    if kind in CRD_FILES:
        errors += [f"strict CRD {'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
                   for e in crd_validator(kind).iter_errors(doc)]
    return errors


def test_render_matches_the_dag():
    assert RENDERED.read_text() == render(), (
        "workflows/pipeline.yaml differs from the Hera DAG: run `make render` (and `make chart-sync`)")


def rendered_edges() -> dict[str, set[str]]:
    doc = yaml.safe_load(RENDERED.read_text())
    dag = next(t for t in doc["spec"]["templates"] if t["name"] == doc["spec"]["entrypoint"])["dag"]
    return {task["name"]: {d.strip() for d in task.get("depends", "").split("&&") if d.strip()}
            for task in dag["tasks"]}


def test_dag_edges_are_the_phase_tables_needs():
    edges = rendered_edges()
    assert list(edges) == list(PHASE)

    def closure(graph: dict[str, set[str]], name: str) -> set[str]:
        return set(graph[name]).union(*(closure(graph, n) for n in graph[name]))

    needs = {name: set(phase.needs) for name, phase in PHASE.items()}
    for name in PHASE:
        # the same order on the cluster as the table asks, and no edge another edge already implies
        assert closure(edges, name) == closure(needs, name), name
        assert not any(e in closure(edges, other) for e in edges[name] for other in edges[name]), name


def test_report_and_export_run_in_parallel():
    edges = rendered_edges()

    def after(name: str) -> set[str]:
        return set(edges[name]).union(*(after(n) for n in edges[name]))

    assert "report" not in after("export") and "export" not in after("report")
    assert "evaluate" in after("report") and "evaluate" in after("export")


@needs_schemas
def test_render_validates_against_argo_schema_and_strict_crd():
    docs = [d for d in yaml.safe_load_all(RENDERED.read_text()) if d]
    assert [d["kind"] for d in docs] == ["WorkflowTemplate"]
    assert argo_errors(docs[0]) == []


@needs_schemas
def test_strict_crd_catches_unknown_fields():
    """The strict step works: a misspelled field fails, which plain schema.json would let through."""
    doc = yaml.safe_load(RENDERED.read_text())
    doc["spec"]["templates"][0]["retrySrategy"] = doc["spec"]["templates"][0].pop("retryStrategy")
    assert not list(argo_validator("WorkflowTemplate").iter_errors(doc))
    assert any("retrySrategy" in e for e in argo_errors(doc))


def test_local_runner_accepts_the_render():
    check_supported(yaml.safe_load(RENDERED.read_text()))


def test_monitoring_in_the_render():
    """Argo UI and Prometheus: figures as output parameters, metrics per template, logs archived, run id label."""
    spec = yaml.safe_load(RENDERED.read_text())["spec"]
    assert spec["archiveLogs"] is True
    assert spec["podMetadata"]["labels"]["distill.run-id"] == "{{workflow.parameters.run-id}}"
    containers = {t["name"]: t for t in spec["templates"] if "container" in t}
    for name, template in containers.items():
        names = {m["name"] for m in template["metrics"]["prometheus"]}
        assert {"distill_step_duration_seconds", "distill_step_total"} <= names, name
    gauges = {m["name"]: m for t in containers.values() for m in t["metrics"]["prometheus"] if "gauge" in m}
    assert gauges["distill_train_final_loss"]["gauge"]["value"] == "{{outputs.parameters.last-loss}}"
    assert gauges["distill_eval_similarity"]["gauge"]["value"] == "{{outputs.parameters.similarity-student}}"
    for gauge in gauges.values():  # an output read from a failed step is empty: emit only on success
        assert gauge["when"] == "{{status}} == Succeeded"
    # one help text per metric name, as Prometheus requires
    helps = {}
    for template in containers.values():
        for metric in template["metrics"]["prometheus"]:
            assert helps.setdefault(metric["name"], metric["help"]) == metric["help"]
    outputs = {p["name"] for t in containers.values() for p in t.get("outputs", {}).get("parameters", [])}
    assert {"last-loss", "similarity-student", "token-reduction", "prompts"} <= outputs
