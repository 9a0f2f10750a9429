"""The run options (jobs/run_options.py) mean the same in all three command lines: `python -m jobs`, the local
runner and `python -m workflows.submit`; --config names a file in each."""

from __future__ import annotations

import io

import pytest

import jobs.cli
import workflows.local.runner
import workflows.submit
from jobs.run_options import pipeline_config, workflow_parameters

# what each entry needs besides the run options
PARSERS = {"jobs": (jobs.cli.parser, ["ingest"]), "runner": (workflows.local.runner.parser, []),
           "submit": (workflows.submit.parser, [])}


def shared_argv(tmp_path) -> list[str]:
    config = tmp_path / "my.yaml"
    config.write_text("train: {steps: 5, batch_size: 2, lora_rank: 4}\n")
    return ["--profile", "ci", "--config", str(config), "--config-yaml", "train: {steps: 4, batch_size: 3}",
            "--set", "train.steps=3", "--backend", "tinker", "--run-id", "r1"]


def test_the_same_options_give_the_same_config_and_parameters_in_every_entry(tmp_path):
    argv = shared_argv(tmp_path)
    parsed = {name: make().parse_args([*own, *argv]) for name, (make, own) in PARSERS.items()}
    configs = {name: pipeline_config(args) for name, args in parsed.items()}
    # each layer over the one before: the file, then --config-yaml, then --set, then --backend
    train = configs["jobs"].train
    assert (train.lora_rank, train.batch_size, train.steps) == (4, 3, 3)
    assert configs["jobs"].model.backend == "tinker" and configs["jobs"].profile == "ci"
    assert configs["runner"] == configs["jobs"] and configs["submit"] == configs["jobs"]
    assert {args.run_id for args in parsed.values()} == {"r1"}
    parameters = {name: workflow_parameters(args) for name, args in parsed.items()}
    assert parameters["runner"] == parameters["submit"] == parameters["jobs"] == {
        "profile": "ci", "config": "train:\n  batch_size: 3\n  lora_rank: 4\n  steps: 3", "backend": "tinker"}


def test_a_step_given_the_workflow_parameters_loads_the_same_config(tmp_path):
    """What runner and submit send is what each DAG step turns back into the config (its args as rendered)."""
    args = jobs.cli.parser().parse_args(["ingest", *shared_argv(tmp_path)])
    sent = workflow_parameters(args)
    step = jobs.cli.parser().parse_args(["ingest", "--profile", sent["profile"], "--run-id", "r1",
                                         "--config-yaml", sent["config"], "--backend", sent["backend"]])
    assert pipeline_config(step) == pipeline_config(args)


def test_defaults_send_an_empty_config_and_no_backend():
    args = workflows.submit.parser().parse_args(["--profile", "ci"])
    assert workflow_parameters(args) == {"profile": "ci", "config": "{}"}  # the template's empty backend applies


def run_entry(name: str, argv: list[str], capsys) -> tuple[int, str]:
    if name == "submit":
        err = io.StringIO()
        code = workflows.submit.main(argv, env={"ARGO_SERVER": "http://127.0.0.1:9"}, out=io.StringIO(), err=err)
        return code, err.getvalue()
    code = {"jobs": lambda: jobs.cli.main(["ingest", *argv]),
            "runner": lambda: workflows.local.runner.main(argv)}[name]()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("entry", PARSERS)
@pytest.mark.parametrize("value", ["no-such-config.yaml", "train: {steps: 3}"], ids=["missing-file", "inline-yaml"])
def test_config_names_a_file_in_every_entry(entry, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_entry(entry, ["--profile", "ci", "--run-id", "r1", "--config", value], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].endswith(f"argument --config: no such file {value!r} (--config names a YAML file; inline "
                             "YAML goes in --config-yaml)"), lines[0]
    assert lines[0].startswith("error: ")
    assert not (tmp_path / ".distill").exists()  # the runner started nothing

