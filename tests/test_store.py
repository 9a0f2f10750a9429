"""The artifact store against a real S3 server: manifests last, refusal without one, hash checks, write ids, sizes
and streamed digests, checked cache entries."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from conftest import store_for
from structlog.testing import capture_logs

from jobs.errors import InputError, TransientError
from jobs.store import (
    CACHE_DIGEST,
    MANIFEST,
    OPERATION_ATTEMPTS,
    REQUEST_ATTEMPTS,
    ArtifactStore,
    StoreSettings,
    sha256_bytes,
)
from workflows.local.fault_proxy import FaultPlan
from workflows.local.s3 import LocalS3


def test_outputs_then_manifest_with_hashes_and_rows(store_env):
    store = store_for("store-1")
    with store.writing("split", "fp-1", {"audit": "fp-0"}) as out:
        out.write_jsonl("train.jsonl", [{"a": 1}, {"a": 2}])
        out.metrics["train"] = 2
    manifest = store.require("split")
    assert manifest["outputs"]["train.jsonl"]["rows"] == 2
    assert manifest["inputs"] == {"audit": "fp-0"} and manifest["metrics"] == {"train": 2}
    assert store.read_jsonl("split", "train.jsonl") == [{"a": 1}, {"a": 2}]
    assert store.complete("split", "fp-1") and store.complete("split", "other") is None


def test_failed_writer_leaves_no_manifest(store_env):
    store = store_for("store-2")
    with store.writing("audit", "fp-1") as out:
        out.write_bytes("a.txt", b"first")
    with pytest.raises(RuntimeError), store.writing("audit", "fp-2") as out:
        out.write_bytes("a.txt", b"half")
        raise RuntimeError("crash mid-phase")
    # the stale manifest was removed before the new outputs were written, and no new one was written
    assert store.manifest("audit") is None
    with pytest.raises(InputError, match=r"has no _SUCCESS\.json"):
        store.read("audit", "a.txt")


def test_tampered_output_is_refused(store_env):
    store = store_for("store-3")
    with store.writing("student", "fp") as out:
        out.write_bytes("conversations.jsonl", b'{"x": 1}\n')
    store.put_bytes(store.key("student", "conversations.jsonl"), b'{"x": 2}\n')
    with pytest.raises(InputError, match=r"does not match its _SUCCESS\.json"):
        store.read("student", "conversations.jsonl")


def test_keys_follow_the_run_layout(store_env):
    store = store_for("store-4")
    assert store.key("teacher/shard-00003", "replies.jsonl") == "runs/store-4/teacher/shard-00003/replies.jsonl"
    assert store.key("train", MANIFEST) == "runs/store-4/train/_SUCCESS.json"
    with pytest.raises(InputError):
        ArtifactStore(StoreSettings.from_env(), "../escape")


def test_unreachable_endpoint_is_transient_and_bad_credentials_are_one_line(store_env, monkeypatch):
    dead = ArtifactStore(StoreSettings("distill", "http://127.0.0.1:9", "us-east-1"), "r")
    with pytest.raises(TransientError, match="S3 endpoint unreachable"):  # a blip or a typo: retried, exit 75
        dead.check_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-123")
    with pytest.raises(InputError, match="access denied") as caught:
        store_for("r").check_bucket()
    assert "wrong-secret-123" not in str(caught.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store_env.secret_key)
    with pytest.raises(InputError, match="bucket missing"):
        ArtifactStore(StoreSettings("no-such-bucket", store_env.endpoint, "us-east-1"), "r").check_bucket()


@contextmanager
def behind_faults(tmp_path, monkeypatch, plan: FaultPlan):
    """A second rclone server, reached through the fault proxy."""
    server = LocalS3(tmp_path / "s3", faults=plan).start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server
    finally:
        server.stop()


def test_faults_are_retried_and_contents_survive(tmp_path, monkeypatch):
    with behind_faults(tmp_path, monkeypatch, FaultPlan(share=0.3, kinds=("500", "503", "drop"), seed=7)) as s3:
        store = store_for("faults-1")
        blobs = {f"k{i}": bytes([i]) * (1000 + 997 * i) for i in range(12)}
        for name, data in blobs.items():
            store.put_bytes(store.key("u", name), data)
        assert {name: store.get_bytes(store.key("u", name)) for name in blobs} == blobs
        stats = s3.proxy.stats
    assert sum(stats["faults"].values()) >= 3 and stats["requests"] > 24, stats


def test_a_lasting_fault_is_transient_after_every_attempt(tmp_path, monkeypatch):
    with behind_faults(tmp_path, monkeypatch, FaultPlan(share=1.0, kinds=("503",))) as s3:
        with pytest.raises(TransientError, match=r"S3 runs/faults-2/u/x: 503 SlowDown .* \(3 x 3 attempts\)"):
            store_for("faults-2").get_bytes("runs/faults-2/u/x")
        assert s3.proxy.stats["requests"] == OPERATION_ATTEMPTS * REQUEST_ATTEMPTS


def test_a_manifest_records_a_new_write_id_each_time_and_the_inputs_write_ids(store_env):
    store = store_for("store-5")
    with store.writing("audit", "fp", {"student": "fp-s"}, input_writes={"student": "w-1"}, record={"extra": 1}):
        pass
    first = store.require("audit")
    assert first["input_writes"] == {"student": "w-1"} and first["extra"] == 1 and len(first["write_id"]) == 32
    with store.writing("audit", "fp"):
        pass
    assert store.require("audit")["write_id"] != first["write_id"]


def test_sizes_come_from_the_listing_and_digests_from_a_streamed_read(store_env):
    store = store_for("store-6")
    data = bytes(range(256)) * 9000  # over one 1 MiB block
    store.put_bytes(store.key("u", "a.bin"), data)
    store.put_bytes(store.key("u", "b/c.txt"), b"x")
    assert store.sizes(store.key("u") + "/") == {store.key("u", "a.bin"): len(data), store.key("u", "b/c.txt"): 1}
    assert store.digest_object(store.key("u", "a.bin")) == (sha256_bytes(data), len(data))


def test_a_cache_entry_is_reused_only_while_it_matches_its_record(store_env):
    store = store_for("store-7")
    key = store.cache_key("teacher", "k1", "replies.jsonl")
    assert store.read_cached(key) is None  # absent: a plain miss, nothing logged
    store.write_cached(key, b'{"reply": "Ja."}\n')
    assert store.read_cached(key) == b'{"reply": "Ja."}\n'
    store.put_bytes(key, b'{"reply": "No."}\n')  # same size, another reply
    with capture_logs() as logged:
        assert store.read_cached(key) is None
    assert [entry["event"] for entry in logged] == ["cache entry mismatch"] and logged[0]["key"] == key
    assert logged[0]["expected_sha256"] == sha256_bytes(b'{"reply": "Ja."}\n')
    assert logged[0]["actual_sha256"] == sha256_bytes(b'{"reply": "No."}\n')
    store.delete(key + CACHE_DIGEST)  # a writer that died between entry and record, or an entry from before records
    store.write_cached(key, b"fresh\n")
    store.delete(key + CACHE_DIGEST)
    assert store.read_cached(key) is None


def test_rclone_answers_a_conditional_put_on_an_existing_key_by_overwriting(store_env):
    """Why a lease is read back after it is written (jobs.lease): the local server ignores If-None-Match."""
    store = store_for("store-8")
    assert store.put_new(store.key("u", "lease"), b"first") is True
    assert store.put_new(store.key("u", "lease"), b"second") is True
    assert store.get_bytes(store.key("u", "lease")) == b"second"
