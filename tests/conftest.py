"""Shared fixtures: a real S3 API server (rclone serve s3) on loopback for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.config import load_pipeline_config
from jobs.phases.base import PhaseConfig
from jobs.store import ArtifactStore, StoreSettings
from workflows.local_s3 import LocalS3

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def store_env(s3_server, monkeypatch):
    """The S3 server's variables in this process's environment (and so in subprocesses)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def phase_config(run_id: str, *overrides: str, profile: str = "ci") -> PhaseConfig:
    return PhaseConfig(run_id=run_id, pipeline=load_pipeline_config(profile, overrides=list(overrides)),
                       store_settings=StoreSettings.from_env())


def store_for(run_id: str) -> ArtifactStore:
    return ArtifactStore(StoreSettings.from_env(), run_id)
