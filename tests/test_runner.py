"""The local runner on small synthetic WorkflowTemplates: fan-out, outputs, retries, unsupported features."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from workflows.local.runner import Runner, check_finished, check_supported
from workflows.local.steps import ProcessExecutor, StepFailed, UnsupportedFeature


def container(code: str, outputs: tuple[str, ...] = (), retry: dict | None = None, inputs=()) -> dict:
    template = {"container": {"image": "x", "command": ["python", "-c", code], "args": [],
                              "env": [{"name": "OUT", "value": "/tmp/outputs"}],
                              "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}}
    if outputs:
        template["outputs"] = {"parameters": [{"name": o, "valueFrom": {"path": f"/tmp/outputs/{o}"}}
                                              for o in outputs]}
    if retry:
        template["retryStrategy"] = retry
    if inputs:
        template["inputs"] = {"parameters": [{"name": i} for i in inputs]}
    return template


def workflow(templates: dict[str, dict], tasks: list[dict]) -> dict:
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowTemplate", "metadata": {"name": "t"},
            "spec": {"entrypoint": "main", "arguments": {"parameters": [{"name": "run-id"}]},
                     "templates": [{"name": n, **t} for n, t in templates.items()]
                     + [{"name": "main", "dag": {"tasks": tasks}}]}}


def make_runner(doc: dict, tmp_path, **params) -> Runner:
    return Runner(doc, params, ProcessExecutor(tmp_path / "work", {}, {}), tmp_path / "logs", parallelism=4,
                  echo=lambda _: None)


WRITE_LIST = ("import os,json; os.makedirs(os.environ['OUT']); "
              "open(os.environ['OUT']+'/items','w').write(json.dumps([0,1,2]))")
# each item logs when it started and ended, so the test sees overlap without timing anything itself
SLEEP_AND_MARK = ("import sys,time; s=time.time(); time.sleep(1); "
                  "print('item', sys.argv[1], 'span', s, time.time())")


def test_fan_out_runs_items_in_parallel_with_their_values(tmp_path):
    templates = {"list": container(WRITE_LIST, outputs=("items",)),
                 "work": container(SLEEP_AND_MARK, inputs=("n",))}
    templates["work"]["container"]["args"] = ["{{inputs.parameters.n}}"]
    doc = workflow(templates, [{"name": "list", "template": "list"},
                               {"name": "work", "template": "work", "depends": "list",
                                "withParam": "{{tasks.list.outputs.parameters.items}}",
                                "arguments": {"parameters": [{"name": "n", "value": "{{item}}"}]}}])
    results = make_runner(doc, tmp_path, **{"run-id": "r"}).run()
    assert [r.step.label for r in results][1:] == ["work(0)", "work(1)", "work(2)"]
    spans = []
    for item in "012":
        words = (tmp_path / "logs" / f"work({item}).log").read_text().split()
        assert words[:2] == ["item", item]
        spans.append((float(words[3]), float(words[4])))
    # all three ran at once: each started before any of them ended
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    assert results[0].outputs == {"items": "[0, 1, 2]"}


def test_a_task_starts_when_its_own_dependencies_are_done(tmp_path):
    # first -> slow (2 s) and first -> quick -> after_quick: after_quick must not wait for slow
    mark = "import sys,time; s=time.time(); time.sleep({}); print('span', s, time.time())"
    templates = {"first": container(mark.format(0)), "slow": container(mark.format(2)),
                 "quick": container(mark.format(0)), "after_quick": container(mark.format(0))}
    doc = workflow(templates, [{"name": "first", "template": "first"},
                               {"name": "slow", "template": "slow", "depends": "first"},
                               {"name": "quick", "template": "quick", "depends": "first"},
                               {"name": "after_quick", "template": "after_quick", "depends": "quick"}])
    make_runner(doc, tmp_path, **{"run-id": "r"}).run()
    span = {name: [float(w) for w in (tmp_path / "logs" / f"{name}.log").read_text().split()[1:3]]
            for name in templates}
    assert span["after_quick"][0] < span["slow"][1]
    assert span["quick"][1] <= span["after_quick"][0]


def test_retries_until_success_each_attempt_with_empty_volumes_removed_after(tmp_path):
    # the attempt count lives outside the step's volumes (its path is an argument, which the runner does not
    # rewrite); what an attempt leaves in its /tmp volume the next one must not see, as in a new pod
    flaky = ("import os,sys; p=sys.argv[1]; n=int(open(p).read()) if os.path.exists(p) else 0; "
             "open(p,'w').write(str(n+1)); left=os.path.exists(os.environ['OUT']+'-left'); "
             "open(os.environ['OUT']+'-left','w').write('x'); print('left', left); sys.exit(0 if n >= 1 else 1)")
    template = container(flaky, retry={"limit": "2", "backoff": {"duration": "0s"}})
    template["container"]["args"] = [str(tmp_path / "count")]
    doc = workflow({"flaky": template}, [{"name": "flaky", "template": "flaky"}])
    results = make_runner(doc, tmp_path, **{"run-id": "r"}).run()
    assert results[0].attempts == 2
    assert (tmp_path / "logs" / "flaky.log").read_text().split() == ["left", "False", "left", "False"]
    assert not (tmp_path / "work" / "flaky").exists()  # the finished step's volume is gone


def test_exit_code_excluded_by_the_retry_expression_is_not_retried(tmp_path):
    doc = workflow({"bad": container("import sys; print('error: bad card'); sys.exit(2)",
                                     retry={"limit": "3", "expression": "asInt(lastRetry.exitCode) != 2"})},
                   [{"name": "bad", "template": "bad"}])
    with pytest.raises(StepFailed, match=r"bad failed with exit code 2 after 1 attempt\(s\): error: bad card"):
        make_runner(doc, tmp_path, **{"run-id": "r"}).run()


def test_a_failed_step_stops_the_dag(tmp_path):
    doc = workflow({"fail": container("raise SystemExit(1)"), "after": container("print('ran')")},
                   [{"name": "fail", "template": "fail"}, {"name": "after", "template": "after", "depends": "fail"}])
    with pytest.raises(StepFailed):
        make_runner(doc, tmp_path, **{"run-id": "r"}).run()
    assert not (tmp_path / "logs" / "after.log").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"].update(onExit="cleanup"), "spec: onExit"),
    (lambda d: d["spec"]["templates"][0].update(script={"source": "x"}), "script"),
    (lambda d: d["spec"]["templates"][1]["dag"]["tasks"][0].update(when="1 == 1"), "when"),
    (lambda d: d["spec"]["templates"][1]["dag"]["tasks"][0].update(depends="a.Failed || b"), "depends"),
    (lambda d: d["spec"]["templates"][0].update(retryStrategy={"expression": "lastRetry.status == 'Error'"}),
     "retry expression"),
])
def test_unsupported_features_fail_before_any_step(tmp_path, change, message):
    doc = workflow({"one": container("print(1)")}, [{"name": "one", "template": "one"}])
    change(doc)
    with pytest.raises(UnsupportedFeature, match=message):
        make_runner(doc, tmp_path, **{"run-id": "r"})


def test_required_parameter_and_unknown_placeholder(tmp_path):
    doc = workflow({"one": container("print(1)")}, [{"name": "one", "template": "one"}])
    with pytest.raises(StepFailed, match="run-id is required"):
        make_runner(doc, tmp_path)
    doc["spec"]["templates"][0]["container"]["args"] = ["{{workflow.name}}"]
    with pytest.raises(UnsupportedFeature, match=r"workflow\.name"):
        make_runner(doc, tmp_path, **{"run-id": "r"}).run()


def test_the_rendered_pipeline_is_supported():
    check_supported(yaml.safe_load((REPO / "workflows" / "pipeline.yaml").read_text()))


class ManifestsOnly:
    """A stand-in for the artifact store that holds only manifests: ingest's lists shards 0 and 1."""

    def __init__(self, absent: set[str]):
        self.absent = absent

    def manifest(self, unit: str) -> dict | None:
        return None if unit in self.absent else {"metrics": {"shards": [0, 1]}}

    require = manifest


def test_a_run_is_finished_only_with_every_units_manifest():
    check_finished(ManifestsOnly(set()))
    with pytest.raises(StepFailed, match=r"without the manifest of teacher/shard-00001, publish$"):
        check_finished(ManifestsOnly({"teacher/shard-00001", "publish"}))
