"""Shared fixtures: the tiny test model (`tiny_model.py`), a real S3 API server (rclone serve s3) and the Tinker
stand-in on loopback for the whole session; process helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_model import SETTINGS, tiny_model

from jobs.config import load_pipeline_config
from jobs.phases.base import PhaseConfig
from jobs.store import ArtifactStore, StoreSettings
from workflows.local.s3 import LocalS3

REPO = Path(__file__).resolve().parents[1]


def pytest_terminal_summary(terminalreporter):
    """The CPU under the durations: the same tests take 2-3x longer on some machines of one kind."""
    from jobs.backends.precision import describe_cpu

    terminalreporter.write_line(describe_cpu())


# the files that take longest (their end-to-end runs and servers), longest first: queued first, they do not leave
# one pytest-xdist worker running one of them alone at the end (`make test`: --no-loadscope-reorder keeps this order)
LONGEST_FIRST = ("test_pipeline.py", "test_verify.py", "test_train_resume.py", "test_bad_input.py",
                 "test_tinker_server.py", "test_benchmarks.py", "test_tinker_standin.py", "test_lease.py",
                 "test_tinker_cookbook.py", "test_rubric_judge.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def tiny_model_built():
    """The tiny random SmolLM2 in the model cache before any test: the tests (and the runner's steps) load it by
    name."""
    return tiny_model()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = LocalS3(tmp_path_factory.mktemp("s3") / "s3").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tinker_server(tmp_path_factory):
    """The local stand-in for the Tinker API (`workflows.local.tinker`), fault-free, in float32 like the ci profile,
    for the whole session."""
    from workflows.local.tinker import TinkerServer

    with TinkerServer(tmp_path_factory.mktemp("tinker"), dtype="float32") as server:
        yield server


@pytest.fixture
def store_env(s3_server, monkeypatch):
    """The S3 server's variables in this process's environment (and so in subprocesses)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def phase_config(run_id: str, *overrides: str, profile: str = "ci") -> PhaseConfig:
    """A phase's config on `profile` and the tiny model's settings (tiny_model.SETTINGS; an override wins)."""
    return PhaseConfig(run_id=run_id, pipeline=load_pipeline_config(profile, overrides=[*SETTINGS, *overrides]),
                       store_settings=StoreSettings.from_env())


def store_for(run_id: str) -> ArtifactStore:
    return ArtifactStore(StoreSettings.from_env(), run_id)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def descendants(pid: int) -> set[int]:
    table, found, frontier = processes(), set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    table = processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}
