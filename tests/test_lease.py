"""One writer per unit (jobs.lease) against the real local S3 server: a lease names its holder, is renewed while held,
is taken over when its holder died, and a writer that lost it writes no manifest. Then `run_unit` with trivial
units: a second writer of a unit waits and reuses the first one's output; writers of different units (two runs with
different cards) run side by side."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import phase_config, store_for
from structlog.testing import capture_logs

from jobs.errors import TransientError
from jobs.lease import Lease, LeaseHeld
from jobs.phases.base import run_unit
from jobs.store import ArtifactStore, StoreSettings
from workflows.local.runner import Runner
from workflows.local.s3 import LocalS3
from workflows.local.steps import Step

# a TTL short enough for expiry to happen within a test. Only lower bounds are asserted on times: a niced test on a
# busy 2-core machine stalls for seconds (a holder seen expired after a stall is then taken over, which is right)
FAST = {"ttl_s": 6.0, "poll_s": 0.2, "settle_s": 0.2}
# a holder that stays alive through any stall of the test process
STEADY = {"ttl_s": 120.0, "poll_s": 0.2, "settle_s": 0.2}


def put_lease(store: ArtifactStore, unit: str, **fields) -> None:
    body = {"owner": "other-owner", "host": "other-host", "pid": 1, "run_id": store.run_id, "unit": unit,
            "expires_at": time.time() + 3600, "ttl_s": FAST["ttl_s"], **fields}
    store.put_bytes(store.lease_key(unit), json.dumps(body).encode())


def test_a_lease_names_its_holder_and_goes_when_released(store_env):
    store = store_for("lease-1")
    with Lease(store, "split", **FAST) as lease:
        held = json.loads(store.get_bytes(store.lease_key("split")))
        assert held["owner"] == lease.owner and held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        assert held["run_id"] == "lease-1" and held["unit"] == "split" and held["expires_at"] > time.time()
        assert store.lease_key("split") == "leases/lease-1/split.json"  # outside runs/: no unit listing sees it
    assert not store.exists(store.lease_key("split"))


def test_a_second_writer_gives_up_naming_the_holder(store_env):
    store = store_for("lease-2")
    with Lease(store, "train", **STEADY) as holder:
        with pytest.raises(LeaseHeld) as caught, Lease(store, "train", **STEADY, wait_s=1.0):
            pass
        assert holder.read()["owner"] == holder.owner
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, TransientError)
    assert message.startswith("runs/lease-2/train is being written by ")
    assert f"{socket.gethostname()} pid {os.getpid()} (run lease-2, owner {holder.owner[:8]})" in message


def test_a_held_lease_is_renewed_and_a_renewed_lease_is_not_taken_over(store_env):
    store = store_for("lease-2b")
    with Lease(store, "train", ttl_s=2.0, poll_s=0.2, settle_s=0.2) as holder:
        first = holder.read()
        deadline = time.monotonic() + 60
        while holder.renewals < 2:
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.2)
        now = holder.read()
        assert now["owner"] == holder.owner and now["renewals"] >= 1 and now["expires_at"] > first["expires_at"]
    # a waiter's view: a lease that changed since it was seen is alive however near its expiry
    waiter = Lease(store, "train", **FAST)
    alive = {"owner": "x", "host": "other-host", "pid": 1, "expires_at": time.time() + 1, "ttl_s": 6.0}
    assert waiter.dead(alive, unchanged_s=1.0) is None
    assert waiter.dead(alive, unchanged_s=7.0) == "not renewed for 7s"
    assert waiter.dead({**alive, "expires_at": time.time() - 7}, unchanged_s=0.0).startswith("expired ")


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(store_env):
    store = store_for("lease-3")
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    put_lease(store, "student", host=socket.gethostname(), pid=gone, ttl_s=3600.0)
    started = time.monotonic()
    with Lease(store, "student", **FAST) as lease:
        assert time.monotonic() - started < FAST["ttl_s"] * 10  # no waiting for a TTL (beyond stalls)
        assert lease.took_over is not None and lease.took_over["owner"] == "other-owner"
        assert lease.read()["owner"] == lease.owner


def test_a_lease_from_another_host_is_taken_over_when_it_expired_or_stopped_being_renewed(store_env):
    store = store_for("lease-4")
    put_lease(store, "audit", expires_at=time.time() - 60)  # expired by more than its TTL: at once
    started = time.monotonic()
    with Lease(store, "audit", **FAST) as lease:
        assert lease.took_over is not None and lease.took_over["host"] == "other-host"
    # its own clock says an hour to go, but it never changes: after a TTL by the waiter's clock
    put_lease(store, "audit")
    started = time.monotonic()
    with Lease(store, "audit", **FAST) as lease:
        waited = time.monotonic() - started
        assert lease.took_over is not None and waited > FAST["ttl_s"]


def test_a_writer_that_lost_its_lease_writes_no_manifest(store_env):
    store = store_for("lease-5")
    with Lease(store, "audit", **FAST) as lease:
        put_lease(store, "audit")  # another writer took it (a stall past the TTL)
        lost = r"runs/lease-5/audit: lost its lease to other-host pid 1"
        writing = store.writing("audit", "fp", before_manifest=lease.confirm)
        with pytest.raises(TransientError, match=lost), writing as out:
            out.write_bytes("kept.jsonl", b"{}\n")
    assert store.manifest("audit") is None
    assert json.loads(store.get_bytes(store.lease_key("audit")))["owner"] == "other-owner"  # not released: not its


def test_rclone_ignores_conditional_writes_so_two_writers_through_two_servers_rely_on_the_re_read(tmp_path,
                                                                                                   monkeypatch):
    """Two runs start two servers over one folder; writers racing through them never both hold the lease."""
    monkeypatch.setenv("DISTILL_S3_ACCESS_KEY", "local-race")
    monkeypatch.setenv("DISTILL_S3_SECRET_KEY", "race-secret-0123456789")
    servers = [LocalS3(tmp_path / "s3").start() for _ in range(2)]
    try:
        for key, value in servers[0].env().items():
            monkeypatch.setenv(key, value)
        stores = [ArtifactStore(StoreSettings("distill", s.endpoint), "race") for s in servers]
        key = stores[0].lease_key("split")
        stores[0].put_bytes(key, b"{}")
        assert stores[1].put_new(key, b'{"owner": "x"}') is True  # If-None-Match: * on an existing key: overwritten
        assert json.loads(stores[0].get_bytes(key)) == {"owner": "x"}  # and the other server sees it at once
        holders = []
        for _ in range(3):
            stores[0].delete(key)
            # the settle delay must outlast the skew between the two writes landing: seconds on a busy machine
            leases = [Lease(store, "split", settle_s=3.0) for store in stores]
            barrier = threading.Barrier(2)

            def attempt(lease: Lease, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                return lease.try_acquire()

            with ThreadPoolExecutor(2) as pool:
                won = list(pool.map(attempt, leases))
            assert sum(won) <= 1, "two writers held one unit"
            holders.append(sum(won))
        assert sum(holders) >= 1
    finally:
        for server in servers:
            server.stop()


def test_a_second_writer_of_a_unit_waits_for_the_first_and_reuses_its_output(store_env):
    computed = []
    first_started = threading.Event()

    def body(out) -> None:
        computed.append(threading.current_thread().name)
        first_started.set()
        time.sleep(3.0)
        out.write_json("checks.json", {"writer": threading.current_thread().name})
        out.metrics["writer"] = threading.current_thread().name

    with capture_logs() as logged, ThreadPoolExecutor(1, thread_name_prefix="first-run") as pool:
        first = pool.submit(run_unit, phase_config("lease-unit"), "preflight", body)
        assert first_started.wait(60)
        second = run_unit(phase_config("lease-unit"), "preflight", body)  # another run of the same card
        assert first.result() == second
    assert len(computed) == 1 and computed[0].startswith("first-run") and second["writer"] == computed[0]
    events = [entry["event"] for entry in logged]
    assert events.count("started") == 1 and events.count("skipped: another run wrote it") == 1
    waiting = [entry for entry in logged if entry["event"] == "waiting for lease"]
    assert waiting and waiting[0]["holder"].startswith(f"{socket.gethostname()} pid {os.getpid()} (run lease-unit")
    assert not store_for("lease-unit").exists(store_for("lease-unit").lease_key("preflight"))


def test_writers_of_different_units_run_side_by_side(store_env):
    """Two runs with different cards share no unit: neither waits for the other."""
    together = threading.Barrier(2, timeout=30)  # broken unless both bodies run at once

    def body(out) -> None:
        together.wait()
        out.write_json("checks.json", {"ok": True})

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_unit, phase_config(run_id), "preflight", body) for run_id in ("card-a", "card-b")]
        for run in runs:
            run.result()
    assert store_for("card-a").manifest("preflight") and store_for("card-b").manifest("preflight")


def test_the_runner_shows_what_steps_log_about_reuse_and_leases(tmp_path):
    """One line each, as `make run` prints them, from the steps' structured lines."""
    said: list[str] = []
    doc = {"spec": {"entrypoint": "main", "templates": [{"name": "main", "dag": {"tasks": []}}]}}
    runner = Runner(doc, {}, executor=None, logs=tmp_path, echo=said.append)
    step = Step("train", {}, None, {})
    for event in ({"event": "output mismatch", "file": "runs/r/split/train.jsonl", "expected_sha256": "aa",
                   "actual_sha256": "bb", "expected_bytes": 10, "actual_bytes": 10},
                  {"event": "redo: inputs were written again since", "inputs": ["ingest", "split"]},
                  {"event": "waiting for lease", "holder": "vm pid 7 (run r, owner 1234abcd)", "waited_s": 30},
                  {"event": "skipped: another run wrote it", "waited_s": 41.5}):
        runner.on_line(step, json.dumps(event))
    assert said == [
        "  train: runs/r/split/train.jsonl does not match its manifest (sha256 bb, 10 bytes; expected aa, 10 bytes): "
        "redoing it",
        "  train: redoing it: ingest, split written again since it ran",
        "  train: waiting for vm pid 7 (run r, owner 1234abcd), which is writing it (waited 30s)",
        "  train: reused (another run wrote it while this one waited)"]
