"""SIGKILL the train phase mid-run, run it again: it resumes from the last checkpoint and ends with the same
adapter as an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load

from conftest import REPO, store_for

pytestmark = pytest.mark.slow
# steps 8, checkpoints every 2: the kill lands after the first checkpoint with steps still to go
TRAIN = ("--set", "train.steps=8", "--set", "train.checkpoint_every=2", "--set", "train.val_every=4")


def jobs(*args: str, run_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs", *args, "--profile", "ci", "--run-id", run_id, *TRAIN],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]


def prepare(run_id: str) -> None:
    for phase in ("ingest",):
        finish(jobs(phase, run_id=run_id))
    shards = [jobs("teacher", "--shard", str(i), run_id=run_id) for i in (0, 1)]
    for process in shards:
        finish(process)
    for phase in ("student", "audit", "split"):
        finish(jobs(phase, run_id=run_id))


def adapter(run_id: str) -> dict:
    store = store_for(run_id)
    return load(store.read("train", "adapter/adapter_model.safetensors"))


def test_killed_training_resumes_to_the_same_adapter(store_env):
    prepare("resume-a")
    finish(jobs("train", run_id="resume-a"))
    uninterrupted = adapter("resume-a")
    assert store_for("resume-a").require("train")["metrics"]["resumed_from"] == 0

    prepare("resume-b")
    store = store_for("resume-b")
    index = store.key("train", "checkpoints.jsonl")
    process = jobs("train", run_id="resume-b")
    deadline = time.time() + 300
    while not store.exists(index):
        assert process.poll() is None and time.time() < deadline, "train ended before its first checkpoint"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert store.manifest("train") is None, "a killed phase must not leave a manifest"

    finish(jobs("train", run_id="resume-b"))
    metrics = store.require("train")["metrics"]
    assert 2 <= metrics["resumed_from"] < 8
    assert metrics["checkpoints"] == [2, 4, 6, 8]
    resumed = adapter("resume-b")
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in resumed if not (resumed[name] == uninterrupted[name]).all()]
    assert not different, f"{len(different)} tensors differ after resuming"
