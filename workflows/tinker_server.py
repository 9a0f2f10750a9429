"""A Tinker-compatible API server on loopback, backed by the local engine: a stand-in for the hosted Tinker
service, so that the unchanged `tinker` SDK (0.38) can be driven end to end without it. Only
`TINKER_BASE_URL` and a placeholder key (`tml-...`) differ from production.

    python -m workflows.tinker_server --data-dir DIR [--host 127.0.0.1] [--port 0] [--latency S]
        [--fault-rate R] [--fault-seed N] [--dtype auto|float32|bfloat16] [--max-batch 64]

prints `tinker-server listening on http://127.0.0.1:PORT` and logs structured lines to stderr; SIGTERM or
SIGINT stops it. `TinkerServer` runs it as a subprocess for tests and the runner.

What it implements (the /api/v1 routes the SDK's service, training, sampling and REST clients use) and the
semantics it chose, since the hosted service's are not observable offline:
- models: `create_model` makes one `LocalEngine.for_training(ModelConfig(base), TrainConfig(lora_rank=rank,
  lora_alpha=32, seed=lora seed))` on the CPU (dtype: the project's `model.dtype=auto` rule, or `--dtype`).
  Base models resolve through `model_files.model_dir`, so only models available offline work. A model id is
  `<session>:train:<n>`, as the SDK itself assumes for create-from-state;
- training: Tinker's losses are weighted *sums* (not means), mapped onto `LocalEngine.forward_backward(...,
  reduction="sum", loss_fn=...)`:
  - `cross_entropy` with 1-D `target_tokens` and `weights` (N,): -sum(w * logp); the targets must be
    `model_input` shifted by one (next-token training);
  - `cross_entropy` with 2-D (N, K) `target_tokens` and `weights` (top-k distillation): -sum_{i,j} w_ij *
    log p(t_ij) at position i, the engine's soft targets (`Datum(candidates=t_i, probs=w_i)`, weight 1 on the
    rows with any non-zero w); all datums of a request 1-D or all 2-D;
  - `importance_sampling` with `target_tokens` (model_input shifted by one), `logprobs` (the sampler's) and
    `advantages`, all (N,), and nothing else: -sum(exp(logp - logprobs) * advantages)
    (`Datum(sampled_logprobs=..., advantages=...)`); positions with advantage 0 add nothing and are skipped.
  A loss_fn_inputs tensor may be dense or sparse CSR (cells it leaves out are 0, the pad the SDK uses when it
  sends a 2-D tensor sparse). Other losses (ppo, cispo, dro, custom, ...) are refused. Gradients accumulate over
  forward_backward requests (the SDK splits big batches into chunks) until `optim_step`, which is torch's
  AdamW with the request's lr, betas, eps, weight decay and global-norm clipping (0: none). Requests of one
  model are applied in seq_id order whatever order they arrive in; a repeated seq_id (a retry) gets the
  first one's future. Outputs: `loss_fn_outputs[i]["logprobs"]` (float32, the targets' log-probabilities: (N,),
  or (N, K) for 2-D targets, where the position is weighted (has a non-zero advantage) and 0.0 elsewhere, whose
  logits are never computed; all positions for `forward`) and metrics `{"loss:sum": ...}`;
- checkpoints live in `--data-dir` and survive clients and server restarts: `save_state(name)` writes
  `models/<model_id>/weights/<name>/` (adapter, optimizer and RNG state, meta.json) =
  `tinker://<model_id>/weights/<name>`; `create_training_client_from_state[_with_optimizer](path)` restores
  one into a new model; `save_weights_for_sampler(name)` writes `.../sampler_weights/<name>/` (adapter only),
  which `create_sampling_client(model_path=...)` samples with; `save_weights_external(name)` writes a PEFT
  adapter folder `.../external_weights/<name>/` whose files `RestClient.get_external_weights_urls` lists as
  URLs served by this server (GET /files/..., no key needed: the stand-in for signed URLs);
- sampling: concurrent `asample` requests are batched: the worker takes what is pending (at most
  `--max-batch` rows, after waiting `--batch-window` seconds for company), groups them by model and identical
  sampling parameters, and calls the engine once per group. Each sample draws from its own generator seeded
  by the request's seed (sample j of a request: seed + j * 2**32; no seed: a random one), so a reply depends
  only on prompt, parameters and seed, never on the batch it shared. Stop: the end-of-turn token only (None,
  or a stop list of the eos id or its text); the returned tokens end with it when `stop_reason == "stop"`.
  `top_k`, per-token sample logprobs (sequences carry none), `topk_sample_logprobs` and `prompt_alt_tokens_k` are
  not supported. `compute_logprobs` (prompt_logprobs) returns [None, logp(t1|t0), ...] from
  `LocalEngine.compute_logprobs`, one prompt a pass;
- scoring prompts (with the sample; max_tokens=1 makes a request a prefill), from a
  `LocalEngine.position_logprobs` pass over each prompt alone (packed with others, a prompt's log-probabilities
  would depend in the last bits on what arrived beside it), the pass `topk_logprobs` and `target_logprobs` make:
  `prompt_logprobs_last_n=n` scores only the last n positions (prompt_logprobs NaN before them: None to the
  SDK); `topk_prompt_logprobs=k` answers a TopkLogprobs of `length` = len(prompt) rows, row i for prompt position
  i as prompt_logprobs (row 0 and the rows before the last n: the SDK's sentinel, token 0 and -99999.0, read back
  as None), k = min(k, vocabulary) columns, most likely first; `target_prompt_logprobs` ([len(prompt) - 1, K]
  int64 token ids, row i for position i + 1, dense or sparse CSR; -1 and unlisted cells ask nothing) answers
  float32 log-probabilities in the same shape and layout, 0.0 where nothing was asked. An id outside the
  vocabulary fails the request (category user);
- faults and latency: `--latency S` makes each result available no sooner than S after its request arrived
  (requests in flight overlap; training still applies in order). `--fault-rate R` answers that share of the
  mutating and polling requests (forward_backward, optim_step, save/load weights, asample, retrieve_future)
  with 429 or 500 before doing any work, so the SDK's retry is safe; counts are in
  `<data-dir>/tinker-server-stats.json` and at GET /_local/stats;
- auth: every /api/v1 request needs an `X-API-Key` starting with `tml-` (else 401). The key is never logged.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict

from workflows.loopback import free_port, stop_process, wait_until_answering

API = "/api/v1"
LORA_ALPHA = 32
POLL_WAIT_S = 20.0  # a retrieve_future waits this long for its result before answering 408 (poll again)
FAULTY = {"forward_backward", "optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external",
          "load_weights", "asample", "retrieve_future"}
STATS_FILE = "tinker-server-stats.json"
SAMPLER_CACHE = 4  # sampling engines kept loaded


class UserError(Exception):
    """A request this server cannot serve: its future fails with category "user" (the SDK does not retry)."""


def _log():
    from jobs.log import get_logger

    return get_logger("tinker-server")


# -- futures ----------------------------------------------------------------------------------------------------
class Stats(TypedDict):
    requests: int
    faults: dict[str, int]  # by status, "429" and "500"
    faults_by_route: dict[str, int]
    sample_batches: int
    sample_rows: int
    largest_sample_batch: int


@dataclasses.dataclass
class Future:
    request_id: str
    ready_at: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    payload: Any = None  # bytes (protobuf) or a JSON-able dict
    error: str | None = None
    category: str = "server"

    def resolve(self, payload: Any) -> None:
        self.payload = payload
        self.done.set()

    def fail(self, error: str, category: str) -> None:
        self.error, self.category = error, category
        self.done.set()


@dataclasses.dataclass
class Job:
    kind: str
    body: Any
    future: Future
    arrived: float
    model_id: str


@dataclasses.dataclass
class TrainModel:
    model_id: str
    base_model: str
    rank: int
    seed: int
    engine: Any = None
    next_seq: int = 1
    pending: dict[int, Job] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SampleJob:
    future: Future
    key: tuple  # (base_model, adapter dir or None)
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seeds: list[int]
    prompt_logprobs: bool
    arrived: float
    topk: int = 0  # topk_prompt_logprobs
    last_n: int | None = None  # prompt_logprobs_last_n: score only the prompt's last n tokens
    targets: Targets | None = None  # target_prompt_logprobs

    @property
    def scores(self) -> bool:
        """Whether the prompt is scored per position (top-k, targets, a suffix), not just its log-probabilities."""
        return bool(self.topk or self.targets or self.last_n)


@dataclasses.dataclass
class Targets:
    """A request's target_prompt_logprobs: the token ids to score at each prompt position 1..len-1 (row i =
    position i + 1; -1 and unlisted cells ask nothing), and the layout the answer keeps: dense (rows, width) or
    the request's own sparse CSR indices."""

    cells: list[list[tuple[int, int]]]  # per row: (column, token id) of the cells that ask
    shape: tuple[int, int]
    crow: list[int] | None = None
    col: list[int] | None = None

    @property
    def first_row(self) -> int:
        return next(i for i, row in enumerate(self.cells) if row)


# -- the server's state and its one compute worker ---------------------------------------------------------------
class Backend:
    def __init__(self, data_dir: Path, latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0,
                 dtype: str = "auto", max_batch: int = 64, engine_batch: int = 16, batch_window: float = 0.02):
        self.data_dir = data_dir
        self.latency, self.fault_rate, self.dtype = latency, fault_rate, dtype
        self.max_batch, self.engine_batch, self.batch_window = max_batch, engine_batch, batch_window
        self._fault_rng = random.Random(fault_seed)
        self._seed_rng = random.Random()
        self.lock = threading.Condition()
        self.futures: dict[str, Future] = {}
        self.by_seq: dict[tuple[str, int], str] = {}  # (model or sampling session, seq_id) -> request id
        self.models: dict[str, TrainModel] = {}
        self.samplers: dict[str, dict] = {}  # sampling session id -> {base_model, model_path, adapter}
        self.ready: collections.deque[Job] = collections.deque()  # training jobs whose turn has come
        self.samples: list[SampleJob] = []
        self.engines: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.stats: Stats = {"requests": 0, "faults": {"429": 0, "500": 0}, "faults_by_route": {}, "sample_batches": 0,
                             "sample_rows": 0, "largest_sample_batch": 0}
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="engine", daemon=True)

    def start(self) -> Backend:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_stats()
        self._worker.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        self._worker.join(timeout=30)

    # -- bookkeeping
    def new_future(self, arrived: float) -> Future:
        future = Future(uuid.uuid4().hex, ready_at=arrived + self.latency)
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
            self._write_stats()
            return status

    def _write_stats(self) -> None:
        target = self.data_dir / STATS_FILE
        staging = target.with_suffix(".partial")
        staging.write_text(json.dumps(self.stats, sort_keys=True))
        staging.replace(target)

    def snapshot(self) -> dict:
        with self.lock:
            return json.loads(json.dumps(self.stats))

    # -- paths
    def model_root(self, model_id: str) -> Path:
        if not model_id or "/" in model_id or model_id.startswith("."):
            raise UserError(f"bad model id {model_id!r}")
        return self.data_dir / "models" / model_id

    def resolve(self, path: str, kinds: tuple[str, ...]) -> Path:
        match = re.fullmatch(r"tinker://([^/]+)/([a-z_]+)/([^/]+)", path or "")
        if not match or match.group(2) not in kinds or match.group(3).startswith("."):
            raise UserError(f"not a tinker://<model_id>/{'|'.join(kinds)}/<name> path: {path!r}")
        folder = self.model_root(match.group(1)) / match.group(2) / match.group(3)
        if not (folder / "meta.json").is_file():
            raise UserError(f"no checkpoint at {path}")
        return folder

    # -- submission (from the HTTP threads)
    def submit_training(self, kind: str, model_id: str, seq_id: int | None, body: Any, arrived: float) -> Future:
        with self.lock:
            if seq_id is not None and (model_id, seq_id) in self.by_seq:
                return self.futures[self.by_seq[(model_id, seq_id)]]  # a retry: the same request again
            model = self.models.get(model_id)
            if model is None:
                raise KeyError(model_id)
            future = self.new_future(arrived)
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
            future = self.new_future(arrived)
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
            self.lock.notify_all()

    # -- the worker: training jobs in order, sampling in batches, oldest first
    def _work(self) -> None:
        while True:
            with self.lock:
                while not self._stopping and not self.ready and not self.samples:
                    self.lock.wait()
                if self._stopping:
                    return
                train_first = bool(self.ready) and (not self.samples
                                                    or self.ready[0].arrived <= self.samples[0].arrived)
                job = self.ready.popleft() if train_first else None
            if job is not None:
                self._run(job.future, self._train, job)
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
            self._sample_batch(batch)

    @staticmethod
    def _run(future: Future, fn, *args) -> None:
        try:
            future.resolve(fn(*args))
        except UserError as error:
            future.fail(str(error), "user")
        except Exception as error:
            _log().exception("request failed", error=str(error))
            future.fail(f"{type(error).__name__}: {error}", "server")

    # -- engines
    def _model_config(self, base: str):
        from jobs.config import ModelConfig

        return ModelConfig(base=base, dtype=self.dtype, device="cpu")

    def _check_base(self, base: str) -> None:
        from jobs.backends.model_files import model_dir

        try:
            model_dir(base)
        except Exception as error:
            raise UserError(f"base model {base!r} is not available offline: {error}") from error

    def _new_trainer(self, base: str, rank: int, seed: int):
        from jobs.backends.local import LocalEngine
        from jobs.config import TrainConfig

        self._check_base(base)
        return LocalEngine.for_training(self._model_config(base), TrainConfig(lora_rank=rank, lora_alpha=LORA_ALPHA,
                                                                              seed=seed))

    def _sampler(self, key: tuple):
        from jobs.backends.local import LocalEngine

        if key in self.engines:
            self.engines.move_to_end(key)
            return self.engines[key]
        base, adapter = key
        self._check_base(base)
        engine = LocalEngine.for_sampling(self._model_config(base), Path(adapter) if adapter else None)
        self.engines[key] = engine
        while len(self.engines) > SAMPLER_CACHE:
            self.engines.popitem(last=False)
        return engine

    # -- training jobs
    def _train(self, job: Job):
        body, model = job.body, self.models[job.model_id]
        if job.kind == "create_model":
            return self._create_model(model, body)
        if job.kind == "load_new":
            return self._load_new(model, body)
        if job.kind == "release":
            model.engine = None
            return {}
        if model.engine is None:
            raise UserError(f"model {model.model_id} failed to load, or its session has finished")
        return getattr(self, "_" + job.kind)(model, body)

    def _create_model(self, model: TrainModel, body: dict) -> dict:
        lora = body.get("lora_config") or {}
        model.engine = self._new_trainer(model.base_model, model.rank, model.seed)
        _log().info("model created", model_id=model.model_id, base_model=model.base_model, rank=model.rank,
                    lora_seed=model.seed, train_unembed=lora.get("train_unembed", True))
        return {"model_id": model.model_id, "type": "create_model"}

    def _load_new(self, model: TrainModel, body: dict) -> dict:
        folder = self.resolve(body["path"], ("weights", "sampler_weights"))
        meta = json.loads((folder / "meta.json").read_text())
        model.base_model, model.rank, model.seed = meta["base_model"], meta["rank"], meta["seed"]
        model.engine = self._new_trainer(model.base_model, model.rank, model.seed)
        self._restore(model, folder, bool(body.get("optimizer")))
        _log().info("model created from checkpoint", model_id=model.model_id, path=body["path"],
                    optimizer=bool(body.get("optimizer")))
        return {"path": body["path"], "model_id": model.model_id, "type": "load_weights"}

    def _load_weights(self, model: TrainModel, body: dict) -> dict:
        folder = self.resolve(body["path"], ("weights", "sampler_weights"))
        self._restore(model, folder, bool(body.get("optimizer")))
        return {"path": body["path"], "model_id": model.model_id, "type": "load_weights"}

    @staticmethod
    def _restore(model: TrainModel, folder: Path, optimizer: bool) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from jobs.backends.base import ADAPTER_WEIGHTS

        if optimizer:
            if not (folder / "trainer_state.pt").is_file():
                raise UserError(f"{folder.name} has no optimizer state (a sampler checkpoint?)")
            model.engine.load_state(folder)
        else:
            set_peft_model_state_dict(model.engine.model, load_file(folder / ADAPTER_WEIGHTS))

    def _forward_backward(self, model: TrainModel, body: dict) -> bytes:
        from jobs.backends.base import Datum

        loss_fn, forward_only, data = body["loss_fn"], body["forward_only"], body["data"]
        if not data:
            raise UserError("no data")
        engine = model.engine
        vocab = int(engine.model.config.vocab_size)
        if any(not 0 <= t < vocab for d in data for row in [d["tokens"], *(d.get("candidates") or [])] for t in row):
            raise UserError(f"a token id outside the vocabulary (0..{vocab - 1})")
        datums = [Datum(d["tokens"], d["weights"], candidates=d.get("candidates"), probs=d.get("probs"),
                        sampled_logprobs=d.get("sampled_logprobs"), advantages=d.get("advantages")) for d in data]
        soft = data[0]["width"] is not None
        if forward_only:
            logprobs, loss = self._forward(engine, loss_fn, datums, soft)
        else:
            engine.model.train()
            result = engine.forward_backward(datums, reduction="sum", logprobs=True, loss_fn=loss_fn)
            logprobs, loss = result["candidate_logprobs" if soft else "logprobs"], result["loss"]
        return forward_backward_output(logprobs, {"loss:sum": loss})

    @staticmethod
    def _forward(engine, loss_fn: str, datums: list, soft: bool) -> tuple[list, float]:
        """forward(): the loss and the target log-probabilities at every position, no gradient."""
        import math

        from jobs.backends.base import TopK

        if soft:  # row j of a datum: the distribution of its token j + 1, scored at its K targets
            logprobs: list = engine.target_logprobs([d.tokens for d in datums],
                                                    [TopK(1, (d.candidates or [])[1:], []) for d in datums])
            loss = -sum(w * lp for d, rows in zip(datums, logprobs, strict=True)
                        for weights, row in zip((d.probs or [])[1:], rows, strict=True)
                        for w, lp in zip(weights, row, strict=True))
            return logprobs, loss
        logprobs = engine.compute_logprobs([d.tokens for d in datums])
        if loss_fn == "importance_sampling":
            loss = -sum(math.exp(lp - s) * a for d, row in zip(datums, logprobs, strict=True)
                        for lp, s, a in zip(row, (d.sampled_logprobs or [])[1:], (d.advantages or [])[1:], strict=True)
                        if a)
        else:
            loss = -sum(w * lp for d, row in zip(datums, logprobs, strict=True)
                        for w, lp in zip(d.weights[1:], row, strict=True))
        return logprobs, loss

    def _optim_step(self, model: TrainModel, body: dict) -> dict:
        adam = body.get("adam_params")
        if adam is None:
            raise UserError("only Adam is supported here")
        model.engine.optim_step(float(adam.get("learning_rate", 1e-4)), beta1=float(adam.get("beta1", 0.9)),
                                beta2=float(adam.get("beta2", 0.95)), eps=float(adam.get("eps", 1e-12)),
                                weight_decay=float(adam.get("weight_decay", 0.0)),
                                grad_clip_norm=float(adam.get("grad_clip_norm", 0.0)))
        return {"metrics": {}}

    def _write_checkpoint(self, model: TrainModel, kind: str, name: str, state: bool) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"bad checkpoint name {name!r}")
        folder = self.model_root(model.model_id) / kind / name
        staging = folder.with_name(f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        if state:
            model.engine.save_state(staging)  # adapter + optimizer + RNG
        else:
            model.engine.model.save_pretrained(staging)  # a PEFT adapter folder
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub: not part of the weights
        (staging / "meta.json").write_text(json.dumps({"base_model": model.base_model, "rank": model.rank,
                                                       "alpha": LORA_ALPHA, "seed": model.seed,
                                                       "model_id": model.model_id, "kind": kind}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder

    def _save_weights(self, model: TrainModel, body: dict) -> dict:
        self._write_checkpoint(model, "weights", body["path"], state=True)
        return {"path": f"tinker://{model.model_id}/weights/{body['path']}", "type": "save_weights"}

    def _save_weights_for_sampler(self, model: TrainModel, body: dict) -> dict:
        name = body.get("path")
        if name:
            self._write_checkpoint(model, "sampler_weights", name, state=False)
            return {"path": f"tinker://{model.model_id}/sampler_weights/{name}", "type": "save_weights_for_sampler"}
        session = model.model_id.split(":train:")[0]
        sampling_id = f"{session}:sample:{body.get('sampling_session_seq_id')}"
        folder = self._write_checkpoint(model, "sampler_weights", f"_session-{uuid.uuid4().hex[:8]}", state=False)
        with self.lock:
            self.samplers[sampling_id] = {"base_model": model.base_model, "model_path": None,
                                          "adapter": str(folder)}
        return {"sampling_session_id": sampling_id, "type": "save_weights_for_sampler"}

    def _save_weights_external(self, model: TrainModel, body: dict) -> dict:
        folder = self._write_checkpoint(model, "external_weights", body["path"], state=False)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name != "meta.json")
        return {"path": f"tinker://{model.model_id}/external_weights/{body['path']}", "size_bytes": size,
                "type": "save_weights_external"}

    # -- sampling
    def _sample_batch(self, batch: list[SampleJob]) -> None:
        from jobs.backends.base import SamplingParams

        with self.lock:
            self.stats["sample_batches"] += 1
            self.stats["sample_rows"] += sum(len(j.seeds) for j in batch)
            self.stats["largest_sample_batch"] = max(self.stats["largest_sample_batch"],
                                                     sum(len(j.seeds) for j in batch))
            self._write_stats()
        groups: dict[tuple, list[SampleJob]] = {}
        for job in batch:
            groups.setdefault((job.key, job.max_tokens, job.temperature, job.top_p), []).append(job)
        for (key, max_tokens, temperature, top_p), jobs in groups.items():
            try:
                engine = self._sampler(key)
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        repetition_penalty=1.0, seed=0, batch_size=self.engine_batch)
                prompts = [job.prompt for job in jobs for _ in job.seeds]
                replies = engine.sample(prompts, params, seeds=[seed for job in jobs for seed in job.seeds])
                # one prompt per pass: packed with others, its log-probabilities would change in the last bits
                # with whatever arrived beside it, and an answer must not depend on timing (or on a retry)
                logprobs = {id(job): engine.compute_logprobs([job.prompt])[0]
                            for job in jobs if job.prompt_logprobs and not job.scores}
                scores = self._score(engine, [job for job in jobs if job.scores])
            except Exception as error:
                for job in jobs:
                    self._run(job.future, _raise, error)
                continue
            end = engine.renderer.end_of_turn
            for job in jobs:
                mine, replies = replies[:len(job.seeds)], replies[len(job.seeds):]
                sequences = [(reply + [end], "stop") if len(reply) < max_tokens else (reply, "length")
                             for reply in mine]
                scored = scores.get(id(job), {})
                if isinstance(scored, Exception):
                    self._run(job.future, _raise, scored)
                else:
                    self._run(job.future, sample_response, sequences,
                              scored.pop("prompt_logprobs", logprobs.get(id(job))), scored.get("topk"),
                              scored.get("targets"))

    @staticmethod
    def _score(engine, jobs: list[SampleJob]) -> dict[int, dict | Exception]:
        """Per job (by id) the sample_response arguments for its prompt_logprobs, top-k and target log-probabilities,
        from a `LocalEngine.position_logprobs` pass over the job's prompt alone (from the first position it needs;
        alone for the reason `_sample_batch` gives); a job that names a token outside the vocabulary gets its
        UserError instead."""
        import torch

        found: dict[int, dict | Exception] = {}
        vocab = int(engine.model.config.vocab_size)
        valid = []
        for job in jobs:
            if job.targets and any(token >= vocab for row in job.targets.cells for _, token in row):
                found[id(job)] = UserError(f"target_prompt_logprobs names a token id outside the vocabulary "
                                           f"(0..{vocab - 1})")
            else:
                valid.append(job)
        # prompt log-probabilities and the top-k cover the last `last_n` positions (all but the first by default);
        # targets, row i for position i + 1, from the first row that names one
        scored_from = [len(job.prompt) - job.last_n if job.last_n else 1 for job in valid]
        starts = [min(first if job.prompt_logprobs or job.topk else len(job.prompt),
                      job.targets.first_row + 1 if job.targets else len(job.prompt))
                  for job, first in zip(valid, scored_from, strict=True)]
        for job, first, start in zip(valid, scored_from, starts, strict=True):
            [(_, rows)] = engine.position_logprobs([job.prompt], [start])
            mine = rows[first - start:] if job.prompt_logprobs or job.topk else rows[:0]  # start <= first then
            scored: dict = {}
            if job.prompt_logprobs:
                actual = torch.tensor(job.prompt[first:], device=mine.device)
                scored["prompt_logprobs"] = [None] * (first - 1) + mine.gather(1, actual[:, None]).squeeze(1).tolist()
            if job.topk:
                values, ids = mine.topk(min(job.topk, mine.shape[-1]), dim=-1)
                scored["topk"] = (len(job.prompt), ids.shape[-1], ids.tolist(), values.tolist())
            if job.targets:
                answers: list[dict[int, float]] = []
                for row, cells in enumerate(job.targets.cells):  # row i: position i + 1
                    if cells:
                        values = rows[row + 1 - start][[token for _, token in cells]].tolist()
                        answers.append({column: value for (column, _), value in zip(cells, values, strict=True)})
                    else:
                        answers.append({})
                scored["targets"] = targets_tensor(job.targets, answers)
            found[id(job)] = scored
        return found


def _raise(error: Exception):
    raise error


# -- protobuf ----------------------------------------------------------------------------------------------------
LOSS_INPUTS = {"cross_entropy": ("target_tokens", "weights"),
               "importance_sampling": ("target_tokens", "logprobs", "advantages")}


def parse_forward_backward(raw: bytes) -> tuple[str, int, dict]:
    """(model_id, seq_id, {loss_fn, forward_only, data}) from the SDK's protobuf body. Each datum is a dict in the
    engine's `Datum` convention (tokens = model_input + its last target, index 0 of every per-token list a
    placeholder) with "width": None for 1-D targets, K for 2-D (N, K) ones:
    - cross_entropy, 1-D: tokens, weights;
    - cross_entropy, 2-D: tokens, weights (1 where a row has any non-zero weight), candidates (the row's K
      target ids) and probs (the row's K weights), so the engine's soft-target loss -sum_j w_j log p(t_j) is
      Tinker's -sum_{i,j} w_ij log p(t_ij);
    - importance_sampling: tokens, weights (1 where the advantage is non-zero: the others add nothing),
      sampled_logprobs, advantages."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(raw)
    loss_fn = msg.loss_fn
    if loss_fn not in LOSS_INPUTS:
        raise UserError(f"loss_fn {loss_fn!r} is not supported here (only {', '.join(LOSS_INPUTS)})")
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if not chunk.HasField("encoded_text"):
                raise UserError("only token (encoded_text) inputs are supported here")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        inputs = {name: _tensor(t) for name, t in datum.loss_fn_inputs.items()}
        if "target_tokens" not in inputs:
            raise UserError(f"{loss_fn} needs loss_fn_inputs['target_tokens']")
        if loss_fn == "importance_sampling":
            data.append(_importance_sampling_datum(i, tokens, inputs))
        elif inputs["target_tokens"].ndim == 2:
            data.append(_soft_datum(i, tokens, inputs))
        else:
            if "weights" in inputs and inputs["weights"].ndim != 1:
                raise UserError(f"datum {i}: 1-D target_tokens need 1-D weights")
            targets = inputs["target_tokens"].astype(np.int64).tolist()
            weights = inputs["weights"].tolist() if "weights" in inputs else [1.0] * len(targets)
            if not tokens or len(targets) != len(tokens) or len(weights) != len(tokens):
                raise UserError(f"datum {i}: model_input, target_tokens and weights must have the same length")
            _check_shifted(i, tokens, targets)
            data.append({"tokens": tokens + targets[-1:], "weights": [0.0] + weights, "width": None})
    if len({d["width"] is None for d in data}) > 1:
        raise UserError("a request's datums must all have 1-D target_tokens or all 2-D (N, K) ones")
    return msg.model_id, msg.seq_id, {"loss_fn": loss_fn, "forward_only": msg.forward_only, "data": data}


def _check_shifted(i: int, tokens: list[int], targets: list[int]) -> None:
    if targets[:-1] != tokens[1:]:
        raise UserError(f"datum {i}: target_tokens must be model_input shifted by one (next-token targets)")


def _soft_datum(i: int, tokens: list[int], inputs: dict) -> dict:
    import numpy as np

    targets, weights = inputs["target_tokens"].astype(np.int64), inputs.get("weights")
    if weights is None or weights.shape != targets.shape:
        raise UserError(f"datum {i}: 2-D target_tokens {list(targets.shape)} need weights of the same shape")
    if not tokens or targets.shape[0] != len(tokens) or targets.shape[1] < 1:
        raise UserError(f"datum {i}: 2-D target_tokens must have one row per model_input token and K >= 1 columns")
    asks = (weights != 0).any(axis=1).tolist()
    return {"tokens": tokens + [int(targets[-1, 0])], "weights": [0.0] + [1.0 if a else 0.0 for a in asks],
            "candidates": [[]] + targets.tolist(), "probs": [[]] + weights.astype(np.float64).tolist(),
            "width": int(targets.shape[1])}


def _importance_sampling_datum(i: int, tokens: list[int], inputs: dict) -> dict:
    import numpy as np

    unknown = sorted(set(inputs) - set(LOSS_INPUTS["importance_sampling"]))
    missing = [name for name in LOSS_INPUTS["importance_sampling"] if name not in inputs]
    if unknown or missing:
        raise UserError(f"datum {i}: importance_sampling takes loss_fn_inputs target_tokens, logprobs and advantages"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; not {', '.join(unknown)}" if unknown else ""))
    targets = inputs["target_tokens"].astype(np.int64)
    sampled, advantages = inputs["logprobs"].astype(np.float64), inputs["advantages"].astype(np.float64)
    if not tokens or any(a.ndim != 1 or len(a) != len(tokens) for a in (targets, sampled, advantages)):
        raise UserError(f"datum {i}: model_input, target_tokens, logprobs and advantages must have the same length")
    _check_shifted(i, tokens, targets.tolist())
    return {"tokens": tokens + [int(targets[-1])], "weights": [0.0] + (advantages != 0).astype(float).tolist(),
            "sampled_logprobs": [0.0] + sampled.tolist(), "advantages": [0.0] + advantages.tolist(), "width": None}


def _tensor(msg):
    """A loss_fn_inputs tensor as a numpy array of its shape (1-D when none is given); a sparse CSR one is
    densified with 0 in the cells it leaves out (the pad the SDK uses when it makes one from a 2-D tensor)."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}.get(msg.dtype)
    if dtype is None:
        raise UserError(f"unsupported tensor dtype {msg.dtype}")
    shape = [int(n) for n in msg.shape]
    if msg.HasField("sparse_csr"):
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values) or crow[0] != 0 \
                or crow[-1] != len(col) or (np.diff(crow) < 0).any() or ((col < 0) | (col >= shape[1])).any():
            raise UserError(f"a sparse CSR tensor of shape {shape} with malformed indices")
        dense = np.zeros(shape, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
        return dense
    array = np.frombuffer(msg.dense, dtype=dtype)
    if shape and int(np.prod(shape)) != array.size:
        raise UserError(f"a tensor of shape {shape} with {array.size} values")
    return array.reshape(shape) if shape else array


def forward_backward_output(logprobs: list, metrics: dict[str, float]) -> bytes:
    """Per datum its "logprobs": a list of floats (1-D targets) or of rows of K floats (2-D (N, K) targets). Runs
    of datums with the same trailing shape go out as one ArrayRecord each, as the SDK reads ragged outputs."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    arrays = [np.asarray(row, dtype=np.float32) for row in logprobs]
    runs: list[list[np.ndarray]] = []
    for array in arrays:
        if runs and runs[-1][0].shape[1:] == array.shape[1:]:
            runs[-1].append(array)
        else:
            runs.append([array])
    for run in runs or [[]]:
        record = out.loss_fn_outputs.add()
        record.num_datums = len(run)
        field = record.fields["logprobs"]
        field.data = b"".join(a.tobytes() for a in run)
        field.offsets = np.cumsum([0] + [a.nbytes for a in run], dtype=np.int64).tobytes()
        field.dtype = pb.DTYPE_FLOAT32
        if run and run[0].ndim == 2:
            field.trailing_shape.extend(run[0].shape[1:])
    for name, value in metrics.items():
        out.metrics[name] = float(value)
    return out.SerializeToString()


def parse_targets(raw: dict, length: int) -> Targets:
    """A sample request's target_prompt_logprobs (the JSON TensorData: int64, shape [len(prompt) - 1, K], dense
    or sparse CSR) as `Targets`; -1 and the cells a sparse tensor leaves out ask nothing."""
    if not isinstance(raw, dict) or raw.get("dtype") != "int64":
        raise UserError("target_prompt_logprobs must be an int64 tensor of token ids")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or shape[0] != length - 1 or int(shape[1]) < 1:
        raise UserError(f"target_prompt_logprobs must have shape [len(prompt) - 1, K] = [{length - 1}, K], "
                        f"not {shape}")
    rows, width = int(shape[0]), int(shape[1])
    data = [int(x) for x in raw.get("data") or []]
    raw_crow, raw_col = raw.get("sparse_crow_indices"), raw.get("sparse_col_indices")
    if (raw_crow is None) != (raw_col is None):
        raise UserError("target_prompt_logprobs: sparse_crow_indices and sparse_col_indices come together")
    crow: list[int] | None = None
    col: list[int] | None = None
    if raw_crow is None or raw_col is None:
        if len(data) != rows * width:
            raise UserError(f"target_prompt_logprobs: {len(data)} values for shape {shape}")
        cells = [[(j, data[i * width + j]) for j in range(width) if data[i * width + j] != -1] for i in range(rows)]
    else:
        crow, col = [int(x) for x in raw_crow], [int(x) for x in raw_col]
        if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(col) or len(col) != len(data) \
                or any(b < a for a, b in itertools.pairwise(crow)) or any(not 0 <= c < width for c in col):
            raise UserError("target_prompt_logprobs: malformed sparse CSR indices")
        cells = [[(col[k], data[k]) for k in range(crow[i], crow[i + 1]) if data[k] != -1] for i in range(rows)]
    if any(token < 0 for row in cells for _, token in row):
        raise UserError("target_prompt_logprobs: a token id is negative (-1 asks nothing; others are not ids)")
    if not any(cells):
        raise UserError("target_prompt_logprobs names no token id")
    return Targets(cells, (rows, width), crow, col)


def targets_tensor(targets: Targets, found: list[dict[int, float]]):
    """The answer to `targets` (found[i]: column -> log-probability in row i) in the request's layout: float32,
    0.0 where nothing was asked."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.Tensor()
    msg.dtype = pb.DTYPE_FLOAT32
    msg.shape.extend(targets.shape)
    if targets.crow is not None and targets.col is not None:
        values = [found[i].get(targets.col[k], 0.0) for i in range(targets.shape[0])
                  for k in range(targets.crow[i], targets.crow[i + 1])]
        msg.sparse_csr.values = np.asarray(values, dtype=np.float32).tobytes()
        msg.sparse_csr.crow_indices = np.asarray(targets.crow, dtype=np.int64).tobytes()
        msg.sparse_csr.col_indices = np.asarray(targets.col, dtype=np.int64).tobytes()
    else:
        dense = np.zeros(targets.shape, dtype=np.float32)
        for i, row in enumerate(found):
            for j, value in row.items():
                dense[i, j] = value
        msg.dense = dense.tobytes()
    return msg


TOPK_MASK = (0, -99999.0)  # the SDK's sentinel for a position with no top-k (tinker.types.topk_logprobs)


def sample_response(sequences: list[tuple[list[int], str]], prompt_logprobs: list[float | None] | None,
                    topk: tuple[int, int, list[list[int]], list[list[float]]] | None = None,
                    targets=None) -> bytes:
    """`prompt_logprobs`: positions 1.. of the prompt (None: not scored; NaN on the wire); `topk`: (prompt length,
    k, ids, log-probabilities) of the last len(ids) positions, the rows before them the SDK's sentinel; `targets`:
    a `targets_tensor`."""
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    out = pb.SampleResponse()
    for tokens, stop_reason in sequences:
        seq = out.sequences.add()
        seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
        seq.stop_reason = pb.STOP_REASON_STOP if stop_reason == "stop" else pb.STOP_REASON_LENGTH
    if prompt_logprobs is not None:  # NaN reads back as None: the first token has no context
        out.prompt_logprobs = np.asarray([float("nan")] + [float("nan") if x is None else x for x in prompt_logprobs],
                                         dtype=np.float32).tobytes()
    if topk is not None:
        length, k, ids, logprobs = topk
        token_ids = np.full((length, k), TOPK_MASK[0], dtype=np.int32)
        values = np.full((length, k), TOPK_MASK[1], dtype=np.float32)
        if ids:
            token_ids[length - len(ids):] = ids
            values[length - len(ids):] = logprobs
        out.topk_prompt_logprobs.token_ids = token_ids.tobytes()
        out.topk_prompt_logprobs.logprobs = values.tobytes()
        out.topk_prompt_logprobs.k = k
        out.topk_prompt_logprobs.length = length
    if targets is not None:
        out.target_prompt_logprobs.CopyFrom(targets)
    return out.SerializeToString()


# -- HTTP --------------------------------------------------------------------------------------------------------
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "proto_compress_fwdbwd": False,
                 "sample_use_retrieve_futures": False, "sample_join_sampling_session": False,
                 "custom_loss_server_side": False, "parallel_fwdbwd_chunks": True}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format, *args):
        pass

    # -- plumbing
    def _send(self, status: int, payload: Any = None, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps({} if payload is None else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding", "").lower() == "zstd":
            import zstandard

            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        return raw

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        arrived = time.time()
        path = urllib.parse.urlsplit(self.path).path
        raw = self._body() if method != "GET" else b""
        status = 500
        try:
            if path.startswith("/files/"):
                status, payload, content_type = self._file(path)
                return self._send(status, payload, content_type)
            if path == "/_local/stats":
                status = 200
                return self._send(200, self.server.backend.snapshot())
            if not path.startswith(API + "/"):
                return self._send(404, {"detail": "not found"})
            key = self.headers.get("X-API-Key") or ""
            if not key.startswith("tml-"):
                status = 401
                return self._send(401, {"detail": "invalid API key: it must start with 'tml-'"})
            route = path[len(API) + 1:]
            fault = self.server.backend.inject_fault(route)
            if fault is not None:
                status = fault
                _log().info("fault injected", route=route, status=fault)
                return self._send(fault, {"detail": f"injected fault ({fault})"})
            status, payload, content_type = self._route(method, route, raw, arrived)
            self._send(status, payload, content_type)
        except (UserError, KeyError, ValueError, TypeError) as error:  # a request of the wrong shape: not retried
            status = 400
            self._send(400, {"detail": f"bad request: {error}"})
        except Exception as error:
            _log().exception("handler failed", path=path)
            self._send(500, {"detail": f"{type(error).__name__}: {error}"})
        finally:
            if not path.endswith(("retrieve_future", "session_heartbeat", "telemetry")) or status >= 400:
                _log().info("request", method=method, path=path, status=status,
                            ms=round((time.time() - arrived) * 1000, 1))

    def _file(self, path: str) -> tuple[int, Any, str]:
        parts = [urllib.parse.unquote(p) for p in path.split("/")[2:]]
        if len(parts) != 4 or parts[1] != "external_weights" or any(p in ("", ".", "..") or "/" in p for p in parts):
            return 404, {"detail": "not found"}, "application/json"
        target = self.server.backend.model_root(parts[0]) / parts[1] / parts[2] / parts[3]
        if not target.is_file() or target.name == "meta.json":
            return 404, {"detail": "not found"}, "application/json"
        return 200, target.read_bytes(), "application/octet-stream"

    # -- the API
    def _route(self, method: str, route: str, raw: bytes, arrived: float) -> tuple[int, Any, str]:
        backend = self.server.backend
        body = json.loads(raw) if raw and self.headers.get("Content-Type", "").startswith("application/json") else {}
        if route == "client/config":
            return 200, CLIENT_CONFIG, "application/json"
        if route == "client/dynamic_config":
            return 200, {}, "application/json"
        if route == "healthz":
            return 200, {"status": "ok"}, "application/json"
        if route == "telemetry":
            return 200, {"status": "accepted"}, "application/json"
        if route == "get_server_capabilities":
            from jobs.backends.model_files import PACKAGED_GGUF

            models = [{"model_name": name, "trainable": True, "sampleable": True} for name in PACKAGED_GGUF]
            return 200, {"supported_models": models}, "application/json"
        if route == "create_session":
            return 200, {"session_id": uuid.uuid4().hex[:16], "type": "create_session"}, "application/json"
        if route == "session_heartbeat":
            return 200, {"type": "session_heartbeat"}, "application/json"
        if match := re.fullmatch(r"sessions/([^/]+)/finish", route):
            backend.finish_session(match.group(1))
            return 200, {}, "application/json"
        if route == "cancel_future":
            return 200, {}, "application/json"
        if route == "create_model":
            return self._create_model(body, arrived)
        if route == "get_info":
            return self._get_info(body)
        if route == "forward_backward":
            model_id, seq_id, parsed = parse_forward_backward(raw)
            return self._training("forward_backward", model_id, seq_id, parsed, arrived)
        if route in ("optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external"):
            return self._training(route, body.get("model_id"), body.get("seq_id"), body, arrived)
        if route == "load_weights":
            return self._load_weights(body, arrived)
        if route == "create_sampling_session":
            return self._create_sampling_session(body)
        if match := re.fullmatch(r"samplers/([^/]+)", route):
            sampler = backend.samplers.get(match.group(1))
            if sampler is None:
                return 404, {"detail": "no such sampler"}, "application/json"
            return 200, {"sampler_id": match.group(1), "base_model": sampler["base_model"],
                         "model_path": sampler["model_path"]}, "application/json"
        if route == "asample":
            return self._asample(body, arrived)
        if route == "retrieve_future":
            return self._retrieve(body)
        if match := re.fullmatch(r"training_runs/([^/]+)/checkpoints/(.+)/external_weights_urls", route):
            return self._external_urls(urllib.parse.unquote(match.group(1)), urllib.parse.unquote(match.group(2)))
        return 404, {"detail": f"{method} /{route} is not implemented by this stand-in"}, "application/json"

    @staticmethod
    def _future(future: Future, **extra) -> tuple[int, Any, str]:
        return 200, {"request_id": future.request_id, **extra}, "application/json"

    def _create_model(self, body: dict, arrived: float):
        backend = self.server.backend
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        lora = body.get("lora_config") or {}
        with backend.lock:
            if model_id not in backend.models:
                backend.models[model_id] = TrainModel(model_id, body["base_model"], int(lora.get("rank", 32)),
                                                      int(lora.get("seed") or 0))
        return self._future(backend.submit_new_model("create_model", model_id, body, arrived), model_id=model_id)

    def _load_weights(self, body: dict, arrived: float):
        backend = self.server.backend
        if body.get("session_id") is not None:  # create-via-load: the new model's first request, no model_id
            model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
            with backend.lock:
                if model_id not in backend.models:
                    backend.models[model_id] = TrainModel(model_id, body.get("base_model") or "", 0, 0)
            return self._future(backend.submit_new_model("load_new", model_id, body, arrived), model_id=model_id)
        return self._training("load_weights", body.get("model_id"), body.get("seq_id"), body, arrived)

    def _training(self, kind: str, model_id: str | None, seq_id: int | None, body: Any, arrived: float):
        try:
            future = self.server.backend.submit_training(kind, model_id or "", seq_id, body, arrived)
        except KeyError:
            return 404, {"detail": f"no model {model_id!r}"}, "application/json"
        return self._future(future, model_id=model_id)

    def _get_info(self, body: dict):
        from jobs.backends.model_files import model_dir

        model = self.server.backend.models.get(body.get("model_id", ""))
        if model is None or model.engine is None:
            return 404, {"detail": f"no model {body.get('model_id')!r}"}, "application/json"
        return 200, {"type": "get_info", "model_id": model.model_id, "is_lora": True, "lora_rank": model.rank,
                     "model_name": model.base_model,
                     "model_data": {"arch": "llama", "model_name": model.base_model,
                                    "tokenizer_id": str(model_dir(model.base_model))}}, "application/json"

    def _create_sampling_session(self, body: dict):
        backend = self.server.backend
        sampling_id = f"{body['session_id']}:sample:{body['sampling_session_seq_id']}"
        path, base = body.get("model_path"), body.get("base_model")
        if path:
            folder = backend.resolve(path, ("sampler_weights", "weights"))
            meta = json.loads((folder / "meta.json").read_text())
            entry = {"base_model": base or meta["base_model"], "model_path": path, "adapter": str(folder)}
        elif base:
            backend._check_base(base)
            entry = {"base_model": base, "model_path": None, "adapter": None}
        else:
            raise UserError("create_sampling_session needs model_path or base_model")
        with backend.lock:
            backend.samplers[sampling_id] = entry
        return 200, {"sampling_session_id": sampling_id, "type": "create_sampling_session"}, "application/json"

    def _asample(self, body: dict, arrived: float):
        backend = self.server.backend
        session = body.get("sampling_session_id")
        if session:
            entry = backend.samplers.get(session)
            if entry is None:
                return 404, {"detail": f"no sampling session {session!r}"}, "application/json"
        elif body.get("model_path"):
            folder = backend.resolve(body["model_path"], ("sampler_weights", "weights"))
            entry = {"base_model": json.loads((folder / "meta.json").read_text())["base_model"],
                     "adapter": str(folder)}
        elif body.get("base_model"):
            entry = {"base_model": body["base_model"], "adapter": None}
        else:
            raise UserError("asample needs a sampling session, a model_path or a base_model")
        num = int(body.get("num_samples") or 1)
        params = body.get("sampling_params") or {}
        future = backend.new_future(arrived)
        ids = [f"{future.request_id}:{i}" for i in range(num)]
        try:
            prompt = [t for chunk in body["prompt"]["chunks"] for t in _chunk_tokens(chunk)]
            if body.get("topk_sample_logprobs") or body.get("prompt_alt_tokens_k"):
                raise UserError("top-k logprobs of sampled tokens (topk_sample_logprobs) and alternative prompt tokens "
                                "(prompt_alt_tokens_k) are not supported here")
            if int(params.get("top_k", -1)) not in (-1, 0):
                raise UserError("top_k is not supported here")
            _check_stop(params.get("stop"), entry["base_model"])
            if not prompt or num < 1:
                raise UserError("an empty prompt or num_samples < 1")
            topk = int(body.get("topk_prompt_logprobs") or 0)
            if topk < 0:
                raise UserError(f"topk_prompt_logprobs must be 0 or greater, not {topk}")
            last_n = body.get("prompt_logprobs_last_n")
            if last_n is not None:
                last_n = int(last_n)
                if not body.get("prompt_logprobs"):
                    raise UserError("prompt_logprobs_last_n needs prompt_logprobs")
                if not 1 <= last_n <= len(prompt) - 1:
                    raise UserError(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = "
                                    f"{len(prompt) - 1}, not {last_n}")
            targets = None
            if body.get("target_prompt_logprobs") is not None:
                targets = parse_targets(body["target_prompt_logprobs"], len(prompt))
            seed = params.get("seed")
            if seed is None:
                seed = backend._seed_rng.randrange(2**31)
            seeds = [(int(seed) + j * 2**32) % 2**63 for j in range(num)]
            job = SampleJob(future, (entry["base_model"], entry.get("adapter")), prompt,
                            int(params.get("max_tokens") or 16), float(params.get("temperature", 1.0)),
                            float(params.get("top_p", 1.0)), seeds, bool(body.get("prompt_logprobs")), arrived,
                            topk=topk, last_n=last_n, targets=targets)
        except UserError as error:
            backend.futures[future.request_id] = future
            future.fail(str(error), "user")
            return self._future(future, sample_sequence_ids=ids)
        seq = body.get("seq_id")
        future = backend.submit_sample((session, seq) if session and seq is not None else None, job)
        return self._future(future, sample_sequence_ids=[f"{future.request_id}:{i}" for i in range(num)])

    def _retrieve(self, body: dict):
        future = self.server.backend.futures.get(body.get("request_id", ""))
        if future is None:  # gone (a server restart): the SDK re-submits what it can
            return 410, {"detail": "unknown or expired request"}, "application/json"
        deadline = time.time() + POLL_WAIT_S
        if not future.done.wait(max(0.0, deadline - time.time())) or future.ready_at > deadline:
            return 408, {"type": "try_again", "request_id": future.request_id, "queue_state": "active"}, \
                "application/json"
        time.sleep(max(0.0, future.ready_at - time.time()))
        if future.error is not None:
            return 200, {"error": future.error, "category": future.category}, "application/json"
        if isinstance(future.payload, bytes):
            return 200, future.payload, "application/x-protobuf"
        return 200, future.payload, "application/json"

    def _external_urls(self, model_id: str, checkpoint_id: str):
        backend = self.server.backend
        folder = backend.resolve(f"tinker://{model_id}/{checkpoint_id}", ("external_weights",))
        base = f"{self.server.url}/files"
        urls = {f.name: f"{base}/{urllib.parse.quote(model_id)}/external_weights/{urllib.parse.quote(folder.name)}/"
                        f"{urllib.parse.quote(f.name)}"
                for f in sorted(folder.iterdir()) if f.is_file() and f.name != "meta.json"}
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        return 200, {"urls": urls, "expires": expires.isoformat()}, "application/json"


def _chunk_tokens(chunk: dict) -> list[int]:
    if chunk.get("type", "encoded_text") != "encoded_text":
        raise UserError("only token (encoded_text) prompts are supported here")
    return [int(t) for t in chunk["tokens"]]


_EOS: dict[str, tuple[int, str]] = {}
_EOS_LOCK = threading.Lock()  # the first concurrent requests would otherwise import transformers at once, which fails


def _check_stop(stop, base_model: str) -> None:
    """Only the end-of-turn token stops the engine: None, or a stop list of just its id or text."""
    if stop is None:
        return
    with _EOS_LOCK:
        if base_model not in _EOS:
            from transformers import AutoTokenizer

            from jobs.backends.model_files import model_dir

            tokenizer = AutoTokenizer.from_pretrained(model_dir(base_model))
            _EOS[base_model] = (tokenizer.eos_token_id, tokenizer.eos_token)
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not stops or any(s not in _EOS[base_model] for s in stops):
        raise UserError(f"stop={stop!r}: this server stops only at the end-of-turn token "
                        f"{_EOS[base_model][0]} ({_EOS[base_model][1]!r})")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], backend: Backend):
        super().__init__(address, Handler)
        self.backend = backend

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        assert isinstance(host, str), "an AF_INET server's address is (host: str, port)"
        return f"http://{host}:{port}"


# -- the process -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.tinker_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="checkpoints and stats live here")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "localhost"],
                        help="loopback only")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each result is available")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of requests answered 429/500")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--max-batch", type=int, default=64, help="sample rows per engine call, at most")
    parser.add_argument("--engine-batch", type=int, default=16, help="the engine's own decoding batch")
    parser.add_argument("--batch-window", type=float, default=0.02,
                        help="seconds the worker waits for more sample requests before a batch")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fault_rate < 1.0:
        parser.error("--fault-rate must be in [0, 1)")
    backend = Backend(args.data_dir.resolve(), latency=args.latency, fault_rate=args.fault_rate,
                      fault_seed=args.fault_seed, dtype=args.dtype, max_batch=args.max_batch,
                      engine_batch=args.engine_batch, batch_window=args.batch_window).start()
    server = Server(("127.0.0.1", args.port), backend)

    def stop(signum, _frame):
        _log().info("stopping", signal=signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"tinker-server listening on {server.url}", flush=True)
    _log().info("tinker-server started", url=server.url, data_dir=str(backend.data_dir), latency=args.latency,
                fault_rate=args.fault_rate, fault_seed=args.fault_seed, dtype=args.dtype, max_batch=args.max_batch)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        backend.stop()
        _log().info("tinker-server stopped")
    return 0


class TinkerServer:
    """The server as a subprocess (so stopping or killing a client never stops it), for tests and the runner:

        with TinkerServer(data_dir, latency=0, fault_rate=0).start() as server:
            env = server.env()  # TINKER_BASE_URL, TINKER_API_KEY (a placeholder tml- key), TINKER_TELEMETRY=0

    Its output goes to `<data_dir>/tinker-server.log`; `stats()` reads the request and fault counts."""

    def __init__(self, data_dir: Path, latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0,
                 dtype: str = "auto", max_batch: int = 64, port: int | None = None,
                 extra_args: list[str] | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.args = ["--latency", str(latency), "--fault-rate", str(fault_rate), "--fault-seed", str(fault_seed),
                     "--dtype", dtype, "--max-batch", str(max_batch), *(extra_args or [])]
        self.api_key = "tml-local-" + uuid.uuid4().hex[:12]
        self._process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "tinker-server.log"

    def env(self) -> dict[str, str]:
        return {"TINKER_BASE_URL": self.base_url, "TINKER_API_KEY": self.api_key, "TINKER_TELEMETRY": "0"}

    def start(self, timeout: float = 60.0) -> TinkerServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "ab") as sink:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workflows.tinker_server", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), *self.args],
                stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, env=env, cwd=repo, start_new_session=True)
        try:
            wait_until_answering(self._process, f"{self.base_url}/_local/stats", timeout, "tinker server",
                                 self.log_path)
            return self
        except BaseException:
            self.stop()
            raise

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/_local/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self._process, grace=30)

    def __enter__(self) -> TinkerServer:
        return self if self._process else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
