"""SIGTERM and SIGINT to the runner or the local S3 wrapper: every process they started ends with them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, alive, descendants

# started by the runner or the wrapper: a child that starts a grandchild, says so in a file, and waits
CHILD = ("import subprocess, sys, time; subprocess.Popen(['sleep', '600']); "
         "open(sys.argv[1], 'w').write('up'); time.sleep(600)")


def start_and_wait_for(argv: list[str], marker: Path) -> subprocess.Popen:
    # output to a file, not a pipe: a process left behind would hold a pipe open and hang the test
    with open(marker.with_name("output"), "w") as output:
        process = subprocess.Popen(argv, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None, marker.with_name("output").read_text()
        assert time.time() < deadline, "the child never started"
        time.sleep(0.1)
    return process


def stop_and_check(process: subprocess.Popen, signum: int, marker: Path) -> list[str]:
    """Signals the process, checks that it and everything it started ended; returns its last output lines."""
    started = descendants(process.pid)
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in started}
    assert {"rclone", "sleep"} <= set(names.values()), names
    process.send_signal(signum)
    process.wait(timeout=60)
    output = marker.with_name("output").read_text()
    assert process.returncode == 128 + signum, output
    assert alive(started) == set(), {pid: names[pid] for pid in alive(started)}
    return output.strip().splitlines()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_local_s3_wrapper_stops_its_command_and_rclone(tmp_path, signum):
    marker = tmp_path / "up"
    process = start_and_wait_for([sys.executable, "-m", "workflows.local.s3", "--data-dir", str(tmp_path), "--",
                                  sys.executable, "-c", CHILD, str(marker)], marker)
    stop_and_check(process, signum, marker)


def test_runner_stops_its_steps_and_rclone(tmp_path):
    marker = tmp_path / "up"
    step = {"name": "wait", "container": {"image": "x", "command": ["python", "-c", CHILD], "args": [str(marker)],
                                          "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
            "retryStrategy": {"limit": "2", "backoff": {"duration": "0s"}}}
    workflow = {"apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowTemplate", "metadata": {"name": "t"},
                "spec": {"entrypoint": "main", "arguments": {"parameters": [{"name": n} for n in
                                                                            ("run-id", "profile", "config")]},
                         "templates": [step, {"name": "main",
                                              "dag": {"tasks": [{"name": "wait", "template": "wait"}]}}]}}
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(workflow))
    process = start_and_wait_for([sys.executable, "-m", "workflows.local.runner", "--profile", "ci",
                                  "--run-id", "stop-1", "--workflow", str(tmp_path / "wf.yaml"),
                                  "--data-dir", str(tmp_path / "data")],
                                 marker)
    lines = stop_and_check(process, signal.SIGTERM, marker)
    assert lines[-1] == "error: stopped by SIGTERM: 1 running step(s) ended, the S3 server shut down"
    assert not any("attempt 2" in line for line in lines)  # a stopped step is not retried
