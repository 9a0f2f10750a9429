"""One writer per unit: a lease object in the store, held while a unit is computed.

`leases/<run-id>/<unit>.json` names its holder (a random owner id, host, pid, run) and when it expires; a thread
renews it every TTL/4 while the unit runs. A second writer reaching the unit waits, logging who holds it, until the
lease is released, then finds the holder's manifest and reuses it (`jobs.phases.base.run_unit`), or gives up after
`wait_s` with a one-line error naming the holder. A lease whose holder died is taken over: at once when the holder
ran on this host and its pid is gone, else once its expiry has passed by a TTL (room for clocks that disagree) or it
has not changed for a TTL by the waiter's own clock.

Creating a lease sends `If-None-Match: *`, which makes it atomic where the server honours it (AWS S3, MinIO). rclone
serve s3, the local store, ignores the header and overwrites (v1.75.2 answers 200 on an existing key), so every
acquisition is also checked the best-effort way: write, wait `settle_s`, re-read, and keep the lease only if it
still names this writer. Two writers that both found no lease and wrote within the settle delay read the same last
write, so only one proceeds. Past that, the renewer re-reads before it renews, and the manifest is written only if
the lease is still this writer's (`confirm`): a writer that lost its lease anyway ends with a transient error (the
retry reuses the other's output) rather than leave two manifests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from types import FrameType
from typing import Any

from jobs.errors import TransientError
from jobs.log import get_logger
from jobs.store import ArtifactStore

TTL_S = 60.0
# how often a waiter looks again, and how often it says it is still waiting
POLL_S = 2.0
WAIT_LOG_EVERY_S = 30.0
# after writing a lease, before reading it back (rclone: long past any request's latency on loopback)
SETTLE_S = 0.5
# a waiter gives up after this long with a live holder: longer than any unit of the full profile takes
WAIT_S = 6 * 3600.0


class LeaseHeld(TransientError):
    """Another writer held the unit for longer than the waiter would wait: a retry later may find it done."""


def describe(lease: dict[str, Any] | None) -> str:
    if not lease:
        return "nobody"
    owner = str(lease.get("owner"))[:8]
    return f"{lease.get('host')} pid {lease.get('pid')} (run {lease.get('run_id')}, owner {owner})"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """`with Lease(store, unit):` holds the unit's lease for the block, waiting for another holder first."""

    def __init__(self, store: ArtifactStore, unit: str, *, ttl_s: float = TTL_S, wait_s: float = WAIT_S,
                 poll_s: float = POLL_S, settle_s: float = SETTLE_S):
        self.store, self.unit, self.key = store, unit, store.lease_key(unit)
        self.ttl_s, self.wait_s, self.poll_s, self.settle_s = ttl_s, wait_s, poll_s, settle_s
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.acquired_at = 0.0
        self.renewals = 0
        self.waited_s = 0.0
        self.took_over: dict[str, Any] | None = None  # the dead holder's lease, when this writer replaced it
        self.lost: dict[str, Any] | None = None  # set by the renewer when another writer's lease replaced this one
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._previous_handlers: dict[int, Any] = {}
        self.log = get_logger().bind(unit=unit, run_id=store.run_id)

    # -- the lease object
    def body(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "run_id": self.store.run_id,
                "unit": self.unit, "acquired_at": self.acquired_at or now, "renewed_at": now,
                "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s, "renewals": self.renewals}

    def read(self) -> dict[str, Any] | None:
        """The lease as stored; None when there is none (an unreadable one is treated as expired)."""
        try:
            found = json.loads(self.store.get_bytes(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": None, "expires_at": 0, "ttl_s": 0}
        return found if isinstance(found, dict) else {"owner": None, "expires_at": 0, "ttl_s": 0}

    def mine(self, lease: dict[str, Any] | None) -> bool:
        return bool(lease) and lease.get("owner") == self.owner  # type: ignore[union-attr]

    # -- acquiring
    def try_acquire(self) -> bool:
        """One attempt: create the lease if there is none, then confirm it after the settle delay."""
        self.acquired_at = time.time()
        if not self.store.put_new(self.key, json.dumps(self.body()).encode()):
            return False
        time.sleep(self.settle_s)
        return self.mine(self.read())

    def dead(self, lease: dict[str, Any], unchanged_s: float) -> str | None:
        """Why the holder of `lease` is gone, or None while it may be alive."""
        ttl = float(lease.get("ttl_s") or self.ttl_s)
        if lease.get("owner") is None:
            return "unreadable lease"
        if lease.get("host") == self.host and isinstance(lease.get("pid"), int) and not pid_alive(lease["pid"]):
            return f"its process {lease['pid']} on this host is gone"
        if time.time() > float(lease.get("expires_at", 0)) + ttl:
            return f"expired {time.time() - float(lease.get('expires_at', 0)):.0f}s ago"
        if unchanged_s > ttl + self.settle_s:
            return f"not renewed for {unchanged_s:.0f}s"
        return None

    def acquire(self) -> None:
        started = time.monotonic()
        seen: dict[str, Any] | None = None
        seen_since = last_said = started
        said = False
        while True:
            current = self.read()
            if current is None:
                if self.try_acquire():
                    break
                continue  # another writer was first: look at its lease
            if current != seen:
                seen, seen_since = current, time.monotonic()
            reason = self.dead(current, time.monotonic() - seen_since)
            if reason is not None:
                if self.read() == current:  # still the dead one: a live writer's fresh lease is never deleted
                    self.log.warning("lease taken over", holder=describe(current), reason=reason)
                    self.took_over = current
                    self.store.delete(self.key)
                continue
            waited = time.monotonic() - started
            if waited > self.wait_s:
                raise LeaseHeld(f"{self.store.key(self.unit)} is being written by {describe(current)}: waited "
                                f"{waited:.0f}s for it (its lease {self.key} is renewed while it runs)")
            if not said or time.monotonic() - last_said >= WAIT_LOG_EVERY_S:
                self.log.info("waiting for lease", holder=describe(current), waited_s=round(waited),
                              expires_in_s=round(float(current.get("expires_at", 0)) - time.time()))
                said, last_said = True, time.monotonic()
            time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - started
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.unit}", daemon=True)
        self._renewer.start()

    # -- while held
    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self.read()
                if not self.mine(current):
                    self.lost = current or {}
                    self.log.warning("lease lost", holder=describe(current))
                    return
                self.renewals += 1
                self.store.put_bytes(self.key, json.dumps(self.body()).encode())
                renewed = time.monotonic()
            except Exception as exc:  # a missed renewal is retried at the next tick
                self.log.warning("lease renewal failed", error=str(exc)[:200])
                if time.monotonic() - renewed > self.ttl_s:  # another writer may hold it by now
                    self.lost = {}
                    self.log.warning("lease lost", holder="unknown: not renewed for a TTL")
                    return

    def confirm(self) -> None:
        """Raises unless the lease is still this writer's: called just before the manifest is written."""
        current = self.read()
        if self.lost is not None or not self.mine(current):
            raise TransientError(f"{self.store.key(self.unit)}: lost its lease to {describe(current)} while "
                                 "writing; not finishing it (a retry reuses or redoes the unit)")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        try:
            if self.mine(self.read()):
                self.store.delete(self.key)
        except Exception as exc:  # an unreleased lease expires on its own
            self.log.warning("lease not released", error=str(exc)[:200])

    # -- a signal ends the holder with its lease released (else a restart would wait for it to expire)
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def __enter__(self) -> Lease:
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            self.acquire()
        except BaseException:
            self._restore_handlers()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
