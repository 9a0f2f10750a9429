"""The records the stand-in keeps: futures, training jobs, models and sampling jobs."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, TypedDict

from workflows.local.tinker.wire import Targets


class Stats(TypedDict):
    requests: int
    faults: dict[str, int]  # by status, "429" and "500"
    faults_by_route: dict[str, int]
    sample_batches: int
    sample_rows: int
    largest_sample_batch: int
    cancelled: int  # sampling requests dropped or stopped because their clients went away


@dataclasses.dataclass
class Future:
    request_id: str
    ready_at: float
    session: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    payload: Any = None  # bytes (protobuf) or a JSON-able dict
    error: str | None = None
    category: str = "server"
    watchers: int = 0  # retrieve_future requests waiting on it now
    left_at: float | None = None  # when the last of them found its connection closed (time.monotonic)

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
    alpha: int = 32
    engine: Any = None
    next_seq: int = 1
    last_request: float = dataclasses.field(default_factory=time.time)
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
    stop_ids: frozenset[int] = frozenset()  # stops besides the end-of-turn token
    stop_strings: tuple[str, ...] = ()

    @property
    def scores(self) -> bool:
        """Whether the prompt is scored per position (top-k, targets, a suffix), not just its log-probabilities."""
        return bool(self.topk or self.targets or self.last_n)


def session_of(model_or_sampler_id: str) -> str:
    return model_or_sampler_id.split(":", 1)[0]
