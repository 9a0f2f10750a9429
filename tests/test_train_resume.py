"""SIGKILL the train phase mid-run, run it again: it resumes from the last checkpoint and ends with the same
adapter as an uninterrupted run, on the local engine and on the Tinker backend (against the local stand-in,
whose checkpoints are `tinker://` paths)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, phase_config, store_for
from safetensors.torch import load_file
from tiny_model import ARGS

from jobs.store import parse_jsonl

# steps 8, checkpoints every 2: the kill lands after the first checkpoint with steps still to go; the tiny test model
TRAIN = ("--set", "train.steps=8", "--set", "train.checkpoint_every=2", "--set", "train.val_every=4", *ARGS)


def backend_env(backend: str, tinker_server) -> dict[str, str]:
    """What a process needs in its environment to reach `backend` (tinker: the session's stand-in)."""
    return tinker_server.env() if backend == "tinker" else {}


# on Tinker (the stand-in) these are long runs (marker slow, `make test-slow`): `make test` resumes Tinker training
# from its state in test_tinker_server.py and tinker-cookbook's loop from its checkpoint in test_tinker_cookbook.py
@pytest.fixture(scope="module", params=["local", pytest.param("tinker", marks=pytest.mark.slow)])
def trained(request, s3_server, tinker_server, tmp_path_factory) -> dict:
    """The phases up to train run once, uninterrupted, on the backend `request.param`: the resume test's
    reference, and (tinker) the faults test's fault-free run."""
    backend = request.param
    with pytest.MonkeyPatch.context() as patch:
        for key, value in backend_env(backend, tinker_server).items():
            patch.setenv(key, value)
        run_id = f"trained-{backend}"
        prepare(run_id, backend)
        finish(jobs("train", run_id=run_id, backend=backend))
        return {"backend": backend, "run_id": run_id, "replies": teacher_replies(run_id),
                "adapter": adapter(run_id, backend, tmp_path_factory.mktemp(run_id))}


@pytest.fixture
def backend(trained, tinker_server, monkeypatch) -> str:
    """The backend of `trained`, reachable from this process (and so from its subprocesses) during the test."""
    for key, value in backend_env(trained["backend"], tinker_server).items():
        monkeypatch.setenv(key, value)
    return trained["backend"]


def jobs(*args: str, run_id: str, backend: str, threads: int = 0) -> subprocess.Popen:
    """`python -m jobs`; `threads` > 0 caps its torch threads (DISTILL_THREADS), as the runner does for steps
    that run side by side."""
    env = {**os.environ, "DISTILL_THREADS": str(threads)} if threads else None
    return subprocess.Popen([sys.executable, "-m", "jobs", *args, "--profile", "ci", "--run-id", run_id, *TRAIN,
                             "--backend", backend],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]


def prepare(run_id: str, backend: str) -> None:
    finish(jobs("ingest", run_id=run_id, backend=backend))
    # two processes with a thread per core each would spin against each other (2-10x slower on 2 cores)
    threads = max(1, (os.cpu_count() or 2) // 2)
    shards = [jobs("teacher", "--shard", str(i), run_id=run_id, backend=backend, threads=threads) for i in (0, 1)]
    for process in shards:
        finish(process)
    for phase in ("audit", "split"):
        finish(jobs(phase, run_id=run_id, backend=backend))


def adapter(run_id: str, backend: str, folder) -> dict:
    """The trained adapter's tensors, fetched the way export fetches them (through the backend)."""
    from jobs.phases.base import open_backend
    from jobs.trained import read_adapter

    config = phase_config(run_id, f"model.backend={backend}", *(item for item in TRAIN if item != "--set"))
    files = open_backend(config).adapter_files(read_adapter(config.store), folder)
    return load_file(files / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_same_adapter(trained, backend, tmp_path):
    run_id = trained["run_id"]
    store = store_for(run_id)
    assert store.require("train")["metrics"]["resumed_from"] == 0

    # the same training again on the same data, from nothing (its checkpoints gone too), killed this time
    for key in store.list_keys(store.key("train") + "/"):
        store.delete(key)
    index = store.key("train", "checkpoints.jsonl")
    process = jobs("train", run_id=run_id, backend=backend)
    deadline = time.time() + 300
    while not store.exists(index):
        assert process.poll() is None and time.time() < deadline, "train ended before its first checkpoint"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert store.manifest("train") is None, "a killed phase must not leave a manifest"

    finish(jobs("train", run_id=run_id, backend=backend))
    metrics = store.require("train")["metrics"]
    assert 2 <= metrics["resumed_from"] < 8
    assert metrics["checkpoints"] == [2, 4, 6, 8]
    locations = [row["location"] for row in parse_jsonl(store.get_bytes(index), index)]
    assert all(loc.startswith("tinker://" if backend == "tinker" else "runs/") for loc in locations), locations
    resumed, uninterrupted = adapter(run_id, backend, tmp_path), trained["adapter"]
    assert resumed.keys() == uninterrupted.keys()
    different = [name for name in resumed if not (resumed[name] == uninterrupted[name]).all()]
    assert not different, f"{len(different)} tensors differ after resuming"


def teacher_replies(run_id: str) -> dict[str, str]:
    store = store_for(run_id)  # each teacher record's first reply, every shard
    return {row["id"]: row["messages"][1]["content"] for shard in (0, 1)
            for row in store.read_jsonl(f"teacher/shard-{shard:05d}", "conversations.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["tinker"], indirect=True)
def test_tinker_one_request_in_ten_failing_changes_no_output(trained, store_env, monkeypatch, tmp_path):
    """The same phases as `trained`'s (fault-free) against a stand-in answering 10% of its requests 429 or 500
    before doing any work: the SDK retries, and the teacher's replies and the trained adapter come out bit for bit
    the same."""
    from workflows.local.tinker import TinkerServer

    with TinkerServer(tmp_path / "faulty", fault_rate=0.1, fault_seed=7, dtype="float32") as faulty:
        for key, value in faulty.env().items():
            monkeypatch.setenv(key, value)
        run_id = "faults-tinker"
        prepare(run_id, "tinker")
        finish(jobs("train", run_id=run_id, backend="tinker"))
        replies, trained_adapter = teacher_replies(run_id), adapter(run_id, "tinker", tmp_path / "adapter")
        faults = faulty.stats()
    assert sum(faults["faults"].values()) > 0, faults
    assert replies == trained["replies"]
    assert trained_adapter.keys() == trained["adapter"].keys()
    assert all((trained_adapter[k] == trained["adapter"][k]).all() for k in trained_adapter)
