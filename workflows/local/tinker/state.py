"""The stand-in's state: futures, models, sessions, and the one worker thread that runs every engine call (training
jobs in seq_id order, sampling in batches, oldest first).

A sampling request is abandoned when its client went away: the last connection polling its future closed and
nobody polled again within GONE_S, or its session, which was heartbeating (the SDK beats every 10 s), has not for
SESSION_LAPSE_S (a client killed between two polls). A live SDK never closes a poll early (its timeout is 45 s,
the long-poll 20 s), so neither happens to a client that is still there. Abandoned requests still queued are
dropped; a batch whose requests are all abandoned stops at its next forward pass (`Engines`' hook). Training jobs
are never dropped (a model's later requests depend on them); SIGTERM stops those too, between two forward passes.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from workflows.local.tinker import sampling, training
from workflows.local.tinker.checkpoints import Checkpoints
from workflows.local.tinker.common import Cancelled, UserError, log
from workflows.local.tinker.engines import Engines
from workflows.local.tinker.records import Future, Job, SampleJob, Stats, TrainModel, session_of

GONE_S = 2.0
SESSION_LAPSE_S = 120.0
SWEEP_S = 60.0  # expired checkpoints are deleted at least this often
FAULTY = {"forward_backward", "optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external",
          "load_weights", "asample", "retrieve_future"}
STATS_FILE = "tinker-server-stats.json"


class Backend:
    def __init__(self, data_dir: Path, latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0,
                 dtype: str = "auto", max_batch: int = 64, engine_batch: int = 16, batch_window: float = 0.02,
                 local_models: dict[str, Path] | None = None):
        self.data_dir = data_dir
        self.latency, self.fault_rate = latency, fault_rate
        self.max_batch, self.engine_batch, self.batch_window = max_batch, engine_batch, batch_window
        self.checkpoints = Checkpoints(data_dir)
        self.engines = Engines(dtype, self._should_stop, local_models)
        self._fault_rng = random.Random(fault_seed)
        self.seed_rng = random.Random()
        self.lock = threading.Condition()
        self.futures: dict[str, Future] = {}
        self.by_seq: dict[tuple[str, int], str] = {}  # (model or sampling session, seq_id) -> request id
        self.models: dict[str, TrainModel] = {}
        self.samplers: dict[str, dict] = {}  # sampling session id -> {base_model, model_path, adapter}
        self.sessions: dict[str, float] = {}  # session id -> its last heartbeat (time.monotonic), once it beats
        self.ready: collections.deque[Job] = collections.deque()  # training jobs whose turn has come
        self.samples: list[SampleJob] = []
        self.current: list[Future] = []  # the sampling requests the engine works for now
        self.stats: Stats = {"requests": 0, "faults": {"429": 0, "500": 0}, "faults_by_route": {}, "sample_batches": 0,
                             "sample_rows": 0, "largest_sample_batch": 0, "cancelled": 0}
        self.stopping = False
        self._worker = threading.Thread(target=self._work, name="engine", daemon=True)

    def start(self) -> Backend:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints.sweep()
        self.write_stats()
        self._worker.start()
        return self

    def stop(self, wait: float = 5.0) -> None:
        """Stops the worker at its next forward pass (or at once when idle)."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self._worker.join(timeout=wait)

    # -- clients that went away
    def touch_session(self, session_id: str) -> None:
        self.sessions[session_id] = time.monotonic()

    def abandoned(self, future: Future, now: float) -> bool:
        if future.done.is_set() or future.watchers:
            return False
        if future.left_at is not None and now - future.left_at > GONE_S:
            return True
        beat = self.sessions.get(future.session or "")
        return beat is not None and now - beat > SESSION_LAPSE_S

    def _should_stop(self) -> bool:
        if self.stopping:
            return True
        current, now = self.current, time.monotonic()
        return bool(current) and all(self.abandoned(future, now) for future in current)

    def maybe_sweep(self) -> None:
        if time.time() - self.checkpoints.last_sweep > SWEEP_S:
            self.checkpoints.sweep()

    # -- bookkeeping
    def new_future(self, arrived: float, session: str | None = None) -> Future:
        future = Future(uuid.uuid4().hex, ready_at=arrived + self.latency, session=session)
        self.futures[future.request_id] = future
        return future

    def inject_fault(self, route: str) -> int | None:
        """429 or 500 for a share of the mutating and polling requests, decided before any work is done."""
        with self.lock:
            self.stats["requests"] += 1
            if route not in FAULTY or self.fault_rate <= 0 or self._fault_rng.random() >= self.fault_rate:
                return None
            status = self._fault_rng.choice((429, 500))
            self.stats["faults"][str(status)] += 1
            self.stats["faults_by_route"][route] = self.stats["faults_by_route"].get(route, 0) + 1
            self.write_stats()
            return status

    def write_stats(self) -> None:
        target = self.data_dir / STATS_FILE
        staging = target.with_suffix(".partial")
        staging.write_text(json.dumps(self.stats, sort_keys=True))
        staging.replace(target)

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.stats))

    # -- submission (from the HTTP threads)
    def submit_training(self, kind: str, model_id: str, seq_id: int | None, body: Any, arrived: float) -> Future:
        with self.lock:
            if seq_id is not None and (model_id, seq_id) in self.by_seq:
                return self.futures[self.by_seq[(model_id, seq_id)]]  # a retry: the same request again
            model = self.models.get(model_id)
            if model is None:
                raise KeyError(model_id)
            model.last_request = time.time()
            future = self.new_future(arrived, session_of(model_id))
            job = Job(kind, body, future, arrived, model_id)
            if seq_id is None:
                self.ready.append(job)
            else:
                self.by_seq[(model_id, seq_id)] = future.request_id
                if seq_id < model.next_seq:
                    future.fail(f"seq_id {seq_id} of {model_id} is behind the model's next ({model.next_seq})", "user")
                    return future
                model.pending[seq_id] = job
                while model.next_seq in model.pending:
                    self.ready.append(model.pending.pop(model.next_seq))
                    model.next_seq += 1
            self.lock.notify_all()
            return future

    def submit_new_model(self, kind: str, model_id: str, body: dict, arrived: float) -> Future:
        """create_model, or load_weights as a model's first request: the job that makes the model."""
        key = (model_id, -1)
        with self.lock:
            if key in self.by_seq:
                return self.futures[self.by_seq[key]]
            future = self.new_future(arrived, session_of(model_id))
            self.by_seq[key] = future.request_id
            self.ready.append(Job(kind, body, future, arrived, model_id))
            self.lock.notify_all()
            return future

    def submit_sample(self, session_key: tuple[str, int] | None, job: SampleJob) -> Future:
        with self.lock:
            if session_key is not None and session_key in self.by_seq:
                return self.futures[self.by_seq[session_key]]
            self.futures[job.future.request_id] = job.future
            if session_key is not None:
                self.by_seq[session_key] = job.future.request_id
            self.samples.append(job)
            self.lock.notify_all()
            return job.future

    def finish_session(self, session_id: str) -> None:
        """A finished session's training models free their engines, after the requests already queued."""
        with self.lock:
            for model_id in [m for m in self.models if m.startswith(f"{session_id}:train:")]:
                self.ready.append(Job("release", None, Future("release", 0.0), time.time(), model_id))
            self.sessions.pop(session_id, None)
            self.lock.notify_all()

    # -- the worker: training jobs in order, sampling in batches, oldest first
    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.ready and not self.samples:
                    self.lock.wait(SWEEP_S)
                    self.maybe_sweep()
                if self.stopping:
                    return
                train_first = bool(self.ready) and (not self.samples
                                                    or self.ready[0].arrived <= self.samples[0].arrived)
                job = self.ready.popleft() if train_first else None
            if job is not None:
                self.run(job.future, training.run, self, job)
                continue
            if self.batch_window > 0:
                deadline = time.monotonic() + self.batch_window
                with self.lock:  # let company arrive: the SDK sends concurrent samples a few ms apart
                    while len(self.samples) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self.lock.wait(left)
            with self.lock:
                batch: list[SampleJob] = []
                rows = 0
                while self.samples and (not batch or rows + len(self.samples[0].seeds) <= self.max_batch):
                    rows += len(self.samples[0].seeds)
                    batch.append(self.samples.pop(0))
            now = time.monotonic()
            gone = [job for job in batch if self.abandoned(job.future, now)]
            if gone:
                self.cancel([job.future for job in gone], "before it started")
            sampling.sample_batch(self, [job for job in batch if job not in gone])

    def cancel(self, futures: list[Future], when: str) -> None:
        for future in futures:
            future.fail(f"cancelled {when}: its client went away", "user")
        with self.lock:
            self.stats["cancelled"] += len(futures)
        log().info("sampling cancelled: the clients went away", requests=len(futures), when=when)

    def run(self, future: Future, fn, *args) -> None:
        try:
            future.resolve(fn(*args))
        except UserError as error:
            future.fail(str(error), "user")
        except Cancelled:
            future.fail("the server is stopping", "server")
        except Exception as error:
            log().exception("request failed", error=str(error))
            future.fail(f"{type(error).__name__}: {error}", "server")
