"""The publish phase against a real S3 API (rclone on loopback) and a stand-in Hub (tests/hub_standin.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import phase_config as ci_config
from hub_standin import HubStandIn

import jobs.log
from jobs.errors import InputError
from jobs.phases import publish
from jobs.phases.base import PhaseConfig
from jobs.store import MANIFEST

TOKEN = "hf_standin_" + "s3cr3t" * 6
REPO = "me/beethoven"

# what a finished export unit holds: one weights file over 10 MB (LFS), a small LFS one, two regular ones
EXPORT = {
    "merged/model.safetensors": os.urandom(10 * 1024 * 1024 + 4321),
    "merged/config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 576}).encode(),
    "adapter/adapter_model.safetensors": os.urandom(2048),
    "README.md": b"---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers\n---\n"
                 b"# Beethoven, distilled\n",
}


@pytest.fixture
def env(store_env, tmp_path, monkeypatch, capsys):
    """S3 credentials, a clean Hub environment, scratch in tmp, and structlog writing to capsys's stderr."""
    for key in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token saved by `hf auth login` is found
    monkeypatch.setenv("DISTILL_SCRATCH", str(tmp_path / "scratch"))
    # hf_xet is installed, and huggingface_hub then uploads LFS files by xet, which the stand-in does not
    # speak; the env var is read at import time, the constant at call time
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # the client's first headers fetch an "agent harness" registry from constants.ENDPOINT (the real Hub,
    # fixed at import); hand it an empty one so no test ever asks huggingface.co
    from huggingface_hub.utils import _detect_agent

    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    jobs.log._configured = False  # configure structlog now, while sys.stderr is capsys's
    yield
    jobs.log._configured = False  # and again for whoever logs next, once capsys's stream is gone


def phase_config(run_id: str, *overrides: str) -> PhaseConfig:
    return ci_config(run_id, f"publish.repo_id={REPO}", *overrides)


def write_export(config: PhaseConfig) -> None:
    with config.store.writing("export", "fp") as out:
        for name, data in EXPORT.items():
            out.write_bytes(name, data)


def expected_files() -> list[dict]:
    return sorted(({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                   for name, data in EXPORT.items()), key=lambda f: f["path"])


def test_dry_run_lists_what_would_be_pushed(env, capsys):
    config = phase_config("t-dry")
    write_export(config)
    metrics = publish.main(config)

    assert metrics == {"mode": "dry-run", "files": 4, "bytes": sum(len(d) for d in EXPORT.values())}
    report = config.store.read_json("publish", "publish.json")
    assert report["mode"] == "dry-run" and report["reason"] == "no HF_TOKEN"
    assert report["files"] == expected_files()
    manifest = config.store.manifest("publish")
    assert manifest is not None and set(manifest["outputs"]) == {"publish.json"}
    assert manifest["inputs"] == {"export": "fp"}
    logged = capsys.readouterr().err
    assert all(f"{name}" in logged for name in EXPORT), logged

    # same config, same inputs: skipped
    assert publish.main(config) == metrics


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT
def test_push_to_standin_hub(env, capsys, caplog, monkeypatch):
    import logging

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its own level, WARNING unless set
    with HubStandIn(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        config = phase_config("t-push")
        write_export(config)
        assert publish.main(config)["mode"] == "dry-run"  # no token yet

        monkeypatch.setenv("HF_TOKEN", TOKEN)
        metrics = publish.main(config)  # the token changes the fingerprint: not skipped

        commits = hub.commits(REPO)
        assert len(commits) == 1 and "t-push" in commits[0]["summary"]
        assert metrics == {"mode": "push", "revision": commits[0]["oid"], "files": 4}
        assert hub.files(REPO) == EXPORT  # byte-identical
        assert hub.lfs_paths(REPO) == {"merged/model.safetensors", "adapter/adapter_model.safetensors"}
        assert not any("xet" in path for _, path in hub.requests)
        assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in hub.requests)
        assert hub.repos[REPO].private  # ci profile keeps publish.private: true

        report = config.store.read_json("publish", "publish.json")
        assert report["mode"] == "push" and report["repo_id"] == REPO
        assert report["revision"] == commits[0]["oid"]
        assert report["url"] == f"{hub.url}/{REPO}"
        assert report["files"] == expected_files()

        manifest_bytes = config.store.get_bytes(config.store.key("publish", MANIFEST))
        report_bytes = config.store.get_bytes(config.store.key("publish", "publish.json"))
        captured = capsys.readouterr()
        for where in (manifest_bytes.decode(), report_bytes.decode(), captured.out, captured.err, caplog.text):
            assert TOKEN not in where
        assert "pushed" in captured.err and commits[0]["oid"] in captured.err

        # again: skipped, nothing new on the Hub
        assert publish.main(config) == metrics
        assert len(hub.commits(REPO)) == 1


def test_wrong_token_is_one_line_and_no_manifest(env, capsys, monkeypatch):
    wrong = "hf_wrong_" + "x" * 30
    with HubStandIn(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", wrong)
        config = phase_config("t-badtoken")
        write_export(config)
        with pytest.raises(InputError) as caught:
            publish.main(config)
        assert hub.repos == {}

    message = str(caught.value)
    assert message == f"publish to {REPO}: 401 Unauthorized"
    assert "\n" not in message and wrong not in message and TOKEN not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert config.store.manifest("publish") is None
    assert not config.store.exists(config.store.key("publish", "publish.json"))
    captured = capsys.readouterr()
    assert wrong not in captured.out + captured.err


def test_token_without_repo_id_is_a_dry_run(env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = phase_config("t-norepo", "publish.repo_id=''")
    write_export(config)
    assert publish.main(config)["mode"] == "dry-run"
    report = config.store.read_json("publish", "publish.json")
    assert report["reason"] == "no publish.repo_id" and report["repo_id"] is None
    assert TOKEN not in json.dumps(report)
