"""What evaluate asks of a model: replies, log-probabilities, the teacher's top k and timings, on the held-out
prompts and conversations. `on_batch(n)` callbacks report progress as rows finish."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import distill
from jobs.backends.base import Metered, SamplingParams, TopK
from jobs.backends.renderer import Renderer
from jobs.evaluation.teacher_card import Card, system_messages
from jobs.lorebook import Lorebook, turn_systems
from jobs.metrics import LATENCY, LATENCY_RATIO, PREFILL, PREFILL_RATIO
from jobs.records import first_reply

OnBatch = Callable[[int], object] | None


@dataclass(frozen=True)
class Prompts:
    """The held-out prompts as tokens, with and without the card, and the teacher's replies to them; `pairs` are
    the conversations as teacher and student see them (`jobs.distill`), `runs` the teacher's side per run of turns
    under one system message (`distill.pair_runs`). With the card: the system message each turn had in its record,
    a lorebook's keyed entries included (`system` is the text every prompt shares)."""

    system: str
    with_card: list[list[int]]
    without_card: list[list[int]]
    teacher_replies: list[list[int]]
    pairs: list[distill.Paired]
    runs: list[list[distill.Paired]] = field(default_factory=list)

    @classmethod
    def render(cls, renderer: Renderer, rows: list[dict], system: str, book: Lorebook | None = None) -> Prompts:
        systems = [turn_systems(system, book, r) for r in rows]
        runs = [distill.pair_runs(renderer, r["messages"], s) for r, s in zip(rows, systems, strict=True)]
        return cls(system=system, with_card=[renderer.prompt(r["prompt"], system=s[0])
                                             for r, s in zip(rows, systems, strict=True)],
                   without_card=[renderer.prompt(r["prompt"]) for r in rows],
                   teacher_replies=[renderer.reply(first_reply(r)) for r in rows],
                   pairs=[distill.whole(renderer, r["messages"], run, s[-1])
                          for r, s, run in zip(rows, systems, runs, strict=True)],
                   runs=runs)


@dataclass
class Measured:
    """What the models gave, filled one part at a time: each role's replies, the per-reply NLL of the teacher's
    replies under each role, the latency figures and the tokens sent (as Tinker bills them)."""

    replies: dict[str, list[str]]
    nll: dict[str, list[float]] = field(default_factory=dict)
    # the teacher's top k at each position of its replies, and each model's KL to it there
    teacher_topk: list[TopK] = field(default_factory=list)
    kl: dict[str, list[list[float]]] = field(default_factory=dict)
    # the judge's training replies that are not the teacher's: the base model's, to training prompts
    judge_negatives: list[str] = field(default_factory=list)
    # the held-out conversations replayed: by role, by turn, the replies
    turns: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    # each role's replies to the persona checks' prompts (`jobs.evaluation.persona`), in their order
    persona: dict[str, list[str]] = field(default_factory=dict)
    # the held-out conversations held by each role itself, by turn; and its three replies in each consistency
    # conversation (`jobs.evaluation.consistency`)
    own_turns: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    repeated: dict[str, list[list[str]]] = field(default_factory=dict)
    # the rubric judge's answers (`jobs.evaluation.rubric`): by role, its grade text for each held-out reply
    rubric: dict[str, list[str]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    usage: Counter[str] = field(default_factory=Counter)

    def merge(self, found: dict) -> None:
        """A part's results (`jobs.phases.evaluate.Part`): a field's dict is updated, any other field set."""
        for name, value in found.items():
            if isinstance(getattr(self, name), dict):
                getattr(self, name).update(value)
            else:
                setattr(self, name, value)


def sample_replies(client: Metered, prompts: list[list[int]], params: SamplingParams,
                   on_batch: OnBatch = None) -> list[str]:
    return [client.renderer.decode(tokens) for tokens in client.sample(prompts, params, on_batch=on_batch)]


def reply_nll(client: Metered, prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
    """Mean NLL per reply token of each reply after its prompt."""
    logprobs = client.compute_logprobs([p + r for p, r in zip(prompts, replies, strict=True)])
    return [-sum(lp[-len(r):]) / len(r) for lp, r in zip(logprobs, replies, strict=True)]


def time_requests(client: Metered, prompts: list[list[int]], params: SamplingParams,
                  on_batch: OnBatch = None) -> tuple[float, float]:
    """Mean seconds per single request (generation) and per prompt forward pass (prefill), after a warm-up."""
    client.sample(prompts[:1], params)
    generate, prefill = [], []
    for prompt in prompts:
        started = time.perf_counter()
        client.sample([prompt], params)
        generate.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.compute_logprobs([prompt])
        prefill.append(time.perf_counter() - started)
        if on_batch:
            on_batch(1)
    return statistics.mean(generate), statistics.mean(prefill)


def latency(client: Metered, prompts: Prompts, requests: int, params: SamplingParams,
            on_batch: OnBatch = None) -> dict[str, float]:
    """Seconds per request and per prefill with and without the card, on the first `requests` prompts."""
    request_with, prefill_with = time_requests(client, prompts.with_card[:requests], params, on_batch)
    request_without, prefill_without = time_requests(client, prompts.without_card[:requests], params, on_batch)
    return {LATENCY.of("with_card"): request_with, LATENCY.of("without_card"): request_without,
            LATENCY_RATIO.key: request_with / request_without,
            PREFILL.of("with_card"): prefill_with, PREFILL.of("without_card"): prefill_without,
            PREFILL_RATIO.key: prefill_with / prefill_without}


def kl_to_teacher(client: Metered, prompts: Prompts, teacher_topk: list[TopK]) -> list[list[float]]:
    """KL(teacher || the client's model) at each position of each teacher reply."""
    model = distill.model_logprobs(client, prompts.pairs, teacher_topk)
    return [distill.kl_per_position(t, m) for t, m in zip(teacher_topk, model, strict=True)]


def replies_in(conversations: list[list[dict]]) -> int:
    """How many replies a replay of the conversations samples (one per assistant turn)."""
    return sum(len(messages) // 2 for messages in conversations)


def replay(client: Metered, conversations: list[list[dict]], system: Card, params: SamplingParams,
           on_batch: OnBatch = None) -> dict[int, list[str]]:
    """Each held-out conversation answered by the client's model turn by turn, each turn given the recorded
    conversation before it (the visitor's questions and the teacher's replies): by turn, the replies of the
    conversations that reach it."""
    turns: dict[int, list[str]] = {}
    for turn in range(1, max(map(len, conversations), default=0) // 2 + 1):
        before = [(i, messages[:2 * turn - 1]) for i, messages in enumerate(conversations)
                  if len(messages) >= 2 * turn]
        chats = [client.renderer.chat(system_messages(system, i, history) + history) for i, history in before]
        turns[turn] = sample_replies(client, chats, params, on_batch)
    return turns
