"""SIGKILL the train phase mid-run, run it again: it resumes from the last checkpoint and ends with the same
adapter as an uninterrupted run, on the local engine and on the Tinker backend (against the local stand-in,
whose checkpoints are `tinker://` paths)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, phase_config, store_for
from jobs.store import parse_jsonl

pytestmark = pytest.mark.slow
# steps 8, checkpoints every 2: the kill lands after the first checkpoint with steps still to go
TRAIN = ("--set", "train.steps=8", "--set", "train.checkpoint_every=2", "--set", "train.val_every=4")


@pytest.fixture(params=["local", "tinker"])
def backend(request, store_env, monkeypatch) -> str:
    """The backend every phase of the test runs on (through `--backend`); tinker talks to the local stand-in."""
    if request.param == "tinker":
        for key, value in request.getfixturevalue("tinker_server").env().items():
            monkeypatch.setenv(key, value)
    return request.param


def jobs(*args: str, run_id: str, backend: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs", *args, "--profile", "ci", "--run-id", run_id, *TRAIN,
                             "--backend", backend], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]


def prepare(run_id: str, backend: str) -> None:
    finish(jobs("ingest", run_id=run_id, backend=backend))
    shards = [jobs("teacher", "--shard", str(i), run_id=run_id, backend=backend) for i in (0, 1)]
    for process in shards:
        finish(process)
    for phase in ("student", "audit", "split"):
        finish(jobs(phase, run_id=run_id, backend=backend))


def adapter(run_id: str, backend: str, folder) -> dict:
    """The trained adapter's tensors, fetched the way export fetches them (through the backend)."""
    from jobs.phases.base import open_backend
    from jobs.phases.train import read_adapter

    config = phase_config(run_id, f"model.backend={backend}", *(item for item in TRAIN if item != "--set"))
    return load_file(open_backend(config).adapter_files(read_adapter(config), folder) / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_same_adapter(backend, tmp_path):
    prepare(f"resume-a-{backend}", backend)
    finish(jobs("train", run_id=f"resume-a-{backend}", backend=backend))
    uninterrupted = adapter(f"resume-a-{backend}", backend, tmp_path / "a")
    assert store_for(f"resume-a-{backend}").require("train")["metrics"]["resumed_from"] == 0

    prepare(f"resume-b-{backend}", backend)
    store = store_for(f"resume-b-{backend}")
    index = store.key("train", "checkpoints.jsonl")
    process = jobs("train", run_id=f"resume-b-{backend}", backend=backend)
    deadline = time.time() + 300
    while not store.exists(index):
        assert process.poll() is None and time.time() < deadline, "train ended before its first checkpoint"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert store.manifest("train") is None, "a killed phase must not leave a manifest"

    finish(jobs("train", run_id=f"resume-b-{backend}", backend=backend))
    metrics = store.require("train")["metrics"]
    assert 2 <= metrics["resumed_from"] < 8
    assert metrics["checkpoints"] == [2, 4, 6, 8]
    locations = [row["location"] for row in parse_jsonl(store.get_bytes(index), index)]
    assert all(loc.startswith("tinker://" if backend == "tinker" else "runs/") for loc in locations), locations
    resumed = adapter(f"resume-b-{backend}", backend, tmp_path / "b")
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in resumed if not (resumed[name] == uninterrupted[name]).all()]
    assert not different, f"{len(different)} tensors differ after resuming"
