"""Evaluate: how close the student comes to the teacher, and what dropping the card saves.

On held-out prompts: the student (no card), the base model (no card) and the teacher (the base model with the
card: its replies from the split, and a second sample). Each figure is declared in `jobs.metrics` with its unit
and direction:
- embedding similarity of each reply to the teacher's, next to the second teacher sample's (the teacher's own
  spread: a greedy student can land above it);
- similarity to the character (its name and topics, short enough for the embedding model) and the share of
  replies out of character (the audit's phrases, e.g. "as an AI"), which show the persona;
- an in-character judge: a logistic regression over sentence embeddings, fitted on the teacher's replies in
  training conversations (every turn) against the base model's replies after the same conversations (sampled as
  the teacher samples, without the card), applied to each role's eval replies; and a second judge on word and
  letter n-grams, fitted on the same replies: the embeddings see a reply's topic, the n-grams its voice;
- per-token KL(teacher with card || model) at the positions of the teacher's replies, for student and base
  (`jobs.distill`), and the share of the base's KL the student removed;
- mean per-token NLL of the teacher's sampled replies under student, base and teacher;
- prompt tokens per request with and without the card, and the cost at `evaluate.prices`;
- latency per request and per prefill, with and without the card, on the same model.
metrics.json holds the figures; replies.jsonl each prompt's replies with their similarity and NLL.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from jobs import distill, metrics
from jobs.backends.base import Metered, SamplingParams, TopK
from jobs.backends.renderer import Renderer
from jobs.card import CharacterCard
from jobs.config import PricesConfig
from jobs.errors import InputError
from jobs.log import Progress
from jobs.metrics import (
    COST_PER_REQUEST,
    COST_RATIO,
    IN_CHARACTER,
    IN_CHARACTER_LATER,
    IN_CHARACTER_LEXICAL,
    IN_CHARACTER_TURN_1,
    JUDGE_ACCURACY,
    KL,
    KL_CLOSED,
    LATENCY,
    LATENCY_RATIO,
    LEXICAL_JUDGE_ACCURACY,
    NLL,
    OUT_OF_CHARACTER,
    PERSONA_SIMILARITY,
    PREFILL,
    PREFILL_RATIO,
    PROMPT_COST_RATIO,
    PROMPT_TOKENS,
    REPLY_TOKENS,
    SIMILARITY,
    TOKEN_REDUCTION,
)
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.store import UnitWriter


@dataclass(frozen=True)
class Prompts:
    """The held-out prompts as tokens, with and without the card, and the teacher's replies to them; `pairs` are
    the conversations as teacher and student see them (`jobs.distill`)."""

    system: str
    with_card: list[list[int]]
    without_card: list[list[int]]
    teacher_replies: list[list[int]]
    pairs: list[distill.Paired]

    @classmethod
    def render(cls, renderer: Renderer, rows: list[dict], system: str) -> Prompts:
        return cls(system=system, with_card=[renderer.prompt(r["prompt"], system=system) for r in rows],
                   without_card=[renderer.prompt(r["prompt"]) for r in rows],
                   teacher_replies=[renderer.reply(r["reply"]) for r in rows],
                   pairs=[distill.pair(renderer, r["messages"], system) for r in rows])


@dataclass
class Measured:
    """What the models gave, filled one model at a time: each role's replies, the per-reply NLL of the teacher's
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
    latency: dict[str, float] = field(default_factory=dict)
    usage: Counter[str] = field(default_factory=Counter)


def sample_replies(client: Metered, prompts: list[list[int]], params: SamplingParams) -> list[str]:
    return [client.renderer.decode(tokens) for tokens in client.sample(prompts, params)]


def reply_nll(client: Metered, prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
    """Mean NLL per reply token of each reply after its prompt."""
    logprobs = client.compute_logprobs([p + r for p, r in zip(prompts, replies, strict=True)])
    return [-sum(lp[-len(r):]) / len(r) for lp, r in zip(logprobs, replies, strict=True)]


def time_requests(client: Metered, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
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
    return statistics.mean(generate), statistics.mean(prefill)


def latency(client: Metered, prompts: Prompts, requests: int, params: SamplingParams) -> dict[str, float]:
    """Seconds per request and per prefill with and without the card, on the first `requests` prompts."""
    request_with, prefill_with = time_requests(client, prompts.with_card[:requests], params)
    request_without, prefill_without = time_requests(client, prompts.without_card[:requests], params)
    return {LATENCY.of("with_card"): request_with, LATENCY.of("without_card"): request_without,
            LATENCY_RATIO.key: request_with / request_without,
            PREFILL.of("with_card"): prefill_with, PREFILL.of("without_card"): prefill_without,
            PREFILL_RATIO.key: prefill_with / prefill_without}


def kl_to_teacher(client: Metered, prompts: Prompts, seen: Measured) -> list[list[float]]:
    """KL(teacher || the client's model) at each position of each teacher reply."""
    model = distill.model_logprobs(client, prompts.pairs, seen.teacher_topk)
    return [distill.kl_per_position(t, m) for t, m in zip(seen.teacher_topk, model, strict=True)]


def measure_base_model(client: Metered, prompts: Prompts, judge_rows: list[dict], conversations: list[list[dict]],
                       config: PhaseConfig, seen: Measured, bar: Progress) -> None:
    """The base model's replies, a second teacher sample, the NLL of the teacher's replies under base and
    teacher (the same model, without and with the card), the teacher's top k and the base's KL to it, the base's
    replies the judge learns from, and latency."""
    ev = config.pipeline.evaluate
    seen.replies["base"] = sample_replies(client, prompts.without_card, SamplingParams.from_config(ev.sampling))
    bar.advance(1, step="base replies")
    seen.nll["base"] = reply_nll(client, prompts.without_card, prompts.teacher_replies)
    seen.nll["teacher"] = reply_nll(client, prompts.with_card, prompts.teacher_replies)
    seen.teacher_topk = distill.teacher_topk(client, prompts.pairs, ev.kl_top_k)
    seen.kl["base"] = kl_to_teacher(client, prompts, seen)
    bar.advance(1, step="base and teacher NLL, KL")
    # sampled as the teacher samples, each after the same conversation the teacher answered (its first question,
    # and for a conversation every later turn too), so that the card is the only difference the judge can learn
    as_teacher = SamplingParams.from_config(config.pipeline.teacher.model_copy(update={"seed": ev.sampling.seed + 2}))
    seen.judge_negatives = [reply for replies in replay(client, [r["messages"] for r in judge_rows], None,
                                                        as_teacher).values() for reply in replies]
    bar.advance(1, step="judge replies")
    seen.latency = latency(client, prompts, ev.latency_requests, SamplingParams.from_config(ev.sampling, batch_size=1))
    bar.advance(1, step="latency")
    # the teacher's own sampling settings with another seed: its spread, the ceiling a student could reach
    resample = SamplingParams.from_config(config.pipeline.teacher.model_copy(update={"seed": ev.sampling.seed + 1}))
    seen.replies["teacher_resampled"] = sample_replies(client, prompts.with_card, resample)
    bar.advance(1, step="teacher resampled")
    seen.turns["base"] = replay(client, conversations, None, SamplingParams.from_config(ev.sampling))
    seen.turns["teacher_resampled"] = replay(client, conversations, prompts.system, resample)
    bar.advance(1, step="conversations replayed")
    seen.usage.update(client.usage)


def measure_student(client: Metered, prompts: Prompts, conversations: list[list[dict]], config: PhaseConfig,
                    seen: Measured, bar: Progress) -> None:
    params = SamplingParams.from_config(config.pipeline.evaluate.sampling)
    seen.turns["student"] = replay(client, conversations, None, params)
    seen.replies["student"] = sample_replies(client, prompts.without_card, params)
    bar.advance(1, step="student replies")
    seen.nll["student"] = reply_nll(client, prompts.without_card, prompts.teacher_replies)
    seen.kl["student"] = kl_to_teacher(client, prompts, seen)
    bar.advance(1, step="student NLL, KL")
    seen.usage.update(client.usage)


def similarity_to_teacher(replies: dict[str, list[str]]) -> dict[str, list[float]]:
    """Each reply's cosine similarity to the teacher's reply to the same prompt, by metric key."""
    from jobs.backends.embeddings import cosine_to_reference

    return {SIMILARITY.of(role): cosine_to_reference(replies[role], replies["teacher"])
            for role in SIMILARITY.variants}


def character(card: CharacterCard) -> str:
    """What persona similarity compares a reply with: the character's name and topics, short enough for the
    embedding model."""
    return f"{card.name}: {', '.join(card.topics)}" if card.topics else card.name


def persona_similarity(replies: dict[str, list[str]], card: CharacterCard) -> dict[str, float]:
    from jobs.backends.embeddings import cosine_to_reference

    return {PERSONA_SIMILARITY.of(role): statistics.mean(cosine_to_reference(replies[role],
                                                                             [character(card)] * len(replies[role])))
            for role in PERSONA_SIMILARITY.variants}


def says_out_of_character(text: str, forbidden: tuple[str, ...]) -> bool:
    """Whether a reply has a phrase the audit forbids."""
    return any(phrase in text.lower() for phrase in forbidden)


def out_of_character(replies: dict[str, list[str]], forbidden: tuple[str, ...]) -> dict[str, float]:
    """Share of replies with a phrase the audit forbids. The teacher's is its second sample's: its first replies
    passed the audit, so none of them is out of character."""
    texts = {"student": replies["student"], "base": replies["base"], "teacher": replies["teacher_resampled"]}
    return {OUT_OF_CHARACTER.of(role): statistics.mean(says_out_of_character(t, forbidden) for t in texts[role])
            for role in OUT_OF_CHARACTER.variants}


def nll(per_reply: dict[str, list[float]], teacher_replies: list[list[int]]) -> dict[str, float]:
    """Mean NLL per token of the teacher's replies under each role (each reply weighted by its tokens)."""
    total = sum(map(len, teacher_replies))
    return {NLL.of(role): sum(v * len(r) for v, r in zip(per_reply[role], teacher_replies, strict=True)) / total
            for role in NLL.variants}


def kl(per_position: dict[str, list[list[float]]]) -> dict[str, float | None]:
    """Mean KL per token of the teacher's replies for student and base, and the share of the base's the student
    removed (at most 1; negative when the student is further from the teacher than the base; None when the base
    is already there)."""
    mean = {role: statistics.mean(v for row in per_position[role] for v in row) for role in KL.variants}
    return {**{KL.of(role): value for role, value in mean.items()},
            KL_CLOSED.key: 1 - mean["student"] / mean["base"] if mean["base"] > 0 else None}


def judge_positives(rows: list[dict]) -> list[str]:
    """The teacher's replies the judge learns from, in `replay`'s order: every first turn, then every second..."""
    turns = max(len(r["messages"]) for r in rows) // 2
    return [r["messages"][2 * t - 1]["content"] for t in range(1, turns + 1) for r in rows
            if len(r["messages"]) >= 2 * t]


class Judge:
    """The in-character judge: a logistic regression of teacher (1) against base (0) replies in training rows, on
    sentence embeddings (what a reply is about) or, `lexical`, on word and letter n-grams (how it is said); and
    its accuracy on held-out folds of them."""

    def __init__(self, teacher_replies: list[str], base_replies: list[str], lexical: bool = False):
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score

        self.lexical = lexical
        labels = [1] * len(teacher_replies) + [0] * len(base_replies)
        if lexical:
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.pipeline import make_pipeline, make_union

            # C 10: many weak features (function words, punctuation), each worth little alone
            self.model = make_pipeline(make_union(TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
                                                                  sublinear_tf=True),
                                                  TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                                       LogisticRegression(max_iter=2000, C=10.0))
        else:
            self.model = LogisticRegression(max_iter=1000)
        # five folds, fewer when a class has fewer replies (the ci profile's few training rows)
        folds = min(5, len(teacher_replies), len(base_replies))
        if folds < 2:
            raise InputError(f"the in-character judge needs at least 2 training rows, there are {folds}")
        features = self.features(teacher_replies + base_replies)
        self.accuracy = float(cross_val_score(self.model, features, labels, cv=folds).mean())
        self.model.fit(features, labels)

    def features(self, replies: list[str]):
        from jobs.backends.embeddings import embed

        return replies if self.lexical else embed(replies)

    def share(self, replies: list[str]) -> float:
        """The share of the replies it calls the teacher's."""
        return float(self.model.predict(self.features(replies)).mean())


def in_character(replies: dict[str, list[str]], judge: Judge, lexical: Judge) -> dict[str, float]:
    return {JUDGE_ACCURACY.key: judge.accuracy,
            **{IN_CHARACTER.of(role): judge.share(replies[role]) for role in IN_CHARACTER.variants},
            LEXICAL_JUDGE_ACCURACY.key: lexical.accuracy,
            **{IN_CHARACTER_LEXICAL.of(role): lexical.share(replies[role]) for role in IN_CHARACTER_LEXICAL.variants}}


def replay(client: Metered, conversations: list[list[dict]], system: str | None,
           params: SamplingParams) -> dict[int, list[str]]:
    """Each held-out conversation answered by the client's model turn by turn, each turn given the recorded
    conversation before it (the visitor's questions and the teacher's replies): by turn, the replies of the
    conversations that reach it."""
    turns: dict[int, list[str]] = {}
    for turn in range(1, max(map(len, conversations), default=0) // 2 + 1):
        before = [messages[:2 * turn - 1] for messages in conversations if len(messages) >= 2 * turn]
        card = [{"role": "system", "content": system}] if system else []
        turns[turn] = sample_replies(client, [client.renderer.chat(card + h) for h in before], params)
    return turns


def replayed(conversations: list[list[dict]], turns: dict[str, dict[int, list[str]]]) -> list[dict]:
    """conversations.jsonl: each held-out conversation as recorded, and each role's reply at each of its turns."""
    rows = []
    for i, messages in enumerate(conversations):
        # turn t's replies are those of the conversations reaching it, in order
        place = {t: sum(len(m) >= 2 * t for m in conversations[:i]) for t in range(1, len(messages) // 2 + 1)}
        rows.append({"messages": messages, **{role: [by_turn[t][place[t]] for t in place]
                                              for role, by_turn in turns.items()}})
    return rows


def turn_rows(turns: dict[str, dict[int, list[str]]], conversations: list[list[dict]], judge: Judge,
              card: CharacterCard, forbidden: tuple[str, ...]) -> list[dict]:
    """turns.jsonl: per turn and role, the in-character figures of its replies and their similarity to the
    recorded teacher replies (the teacher's row is its second sample's)."""
    from jobs.backends.embeddings import cosine_to_reference

    rows = []
    for role, by_turn in turns.items():
        for turn, replies in by_turn.items():
            recorded = [m[2 * turn - 1]["content"] for m in conversations if len(m) >= 2 * turn]
            rows.append({"turn": turn, "role": role, "replies": len(replies),
                         IN_CHARACTER.label: judge.share(replies),
                         PERSONA_SIMILARITY.label: statistics.mean(
                             cosine_to_reference(replies, [character(card)] * len(replies))),
                         OUT_OF_CHARACTER.label: statistics.mean(says_out_of_character(t, forbidden)
                                                                 for t in replies),
                         SIMILARITY.label: statistics.mean(cosine_to_reference(replies, recorded))})
    return rows


def by_turn(turns: dict[str, dict[int, list[str]]], judge: Judge) -> dict[str, float | None]:
    """Judged in character at turn 1 of the held-out conversations and, pooled, at turns 3 and later (None where
    no conversation reaches them)."""
    def share(role: str, first: int, last: int) -> float | None:
        replies = [r for turn, rs in turns.get(role, {}).items() if first <= turn <= last for r in rs]
        return judge.share(replies) if replies else None

    return {**{IN_CHARACTER_TURN_1.of(role): share(role, 1, 1) for role in IN_CHARACTER_TURN_1.variants},
            **{IN_CHARACTER_LATER.of(role): share(role, 3, 10**6) for role in IN_CHARACTER_LATER.variants}}


def tokens_and_cost(prompts: Prompts, prices: PricesConfig) -> dict[str, float]:
    """Prompt tokens and dollars per request with and without the card; both sides get the teacher's reply length."""
    tokens = {"with_card": statistics.mean(map(len, prompts.with_card)),
              "without_card": statistics.mean(map(len, prompts.without_card))}
    reply_tokens = statistics.mean(map(len, prompts.teacher_replies))
    cost = {variant: (prompt * prices.input_per_mtok + reply_tokens * prices.output_per_mtok) / 1e6
            for variant, prompt in tokens.items()}
    return {**{PROMPT_TOKENS.of(variant): value for variant, value in tokens.items()},
            TOKEN_REDUCTION.key: 1 - tokens["without_card"] / tokens["with_card"],
            REPLY_TOKENS.key: reply_tokens,
            **{COST_PER_REQUEST.of(variant): value for variant, value in cost.items()},
            COST_RATIO.key: cost["with_card"] / cost["without_card"],
            PROMPT_COST_RATIO.key: tokens["with_card"] / tokens["without_card"]}


def figures(seen: Measured, similarity: dict[str, list[float]], prompts: Prompts, card: CharacterCard,
            judge: Judge, lexical: Judge, config: PhaseConfig) -> dict[str, float | None]:
    """Every figure of metrics.json, as computed (`metrics.record` rounds them)."""
    return {**{key: statistics.mean(values) for key, values in similarity.items()},
            **persona_similarity(seen.replies, card),
            **out_of_character(seen.replies, config.pipeline.audit.forbidden),
            **in_character(seen.replies, judge, lexical),
            **by_turn(seen.turns, judge),
            **kl(seen.kl),
            **nll(seen.nll, prompts.teacher_replies),
            **tokens_and_cost(prompts, config.pipeline.evaluate.prices),
            **seen.latency}


def reply_rows(rows: list[dict], seen: Measured, similarity: dict[str, list[float]]) -> list[dict]:
    """replies.jsonl: each prompt with every role's reply, their similarity to the teacher's and its NLL."""
    per_reply = {**similarity, **{NLL.of(role): seen.nll[role] for role in NLL.variants},
                 **{KL.of(role): [statistics.mean(row) for row in seen.kl[role]] for role in KL.variants}}
    return [{"id": row["id"], "prompt": row["prompt"],
             **{role: seen.replies[role][i] for role in ("teacher", "student", "base", "teacher_resampled")},
             **{key: values[i] for key, values in per_reply.items()}} for i, row in enumerate(rows)]


def build(config: PhaseConfig, out: UnitWriter) -> None:
    from jobs.phases.train import read_adapter

    store, ev = config.store, config.pipeline.evaluate
    rows = store.read_jsonl("split", "eval.jsonl")
    conversations = [row["messages"] for row in store.read_jsonl("split", "eval_conversations.jsonl")]
    # training prompts only: the eval replies the judge scores are never the ones it learned from
    judge_rows = store.read_jsonl("split", "train.jsonl")[:ev.judge_prompts]
    card = CharacterCard.model_validate(store.read_json("ingest", "card.json"))
    backend = open_backend(config)
    bar = Progress(9, "evaluate")

    base = Metered(backend.sampler())
    prompts = Prompts.render(base.renderer, rows, card.teacher_system_prompt())
    seen = Measured(replies={"teacher": [r["reply"] for r in rows]})
    measure_base_model(base, prompts, judge_rows, conversations, config, seen, bar)
    del base  # one model in memory at a time
    measure_student(Metered(backend.sampler(read_adapter(config).sampling)), prompts, conversations, config, seen,
                    bar)

    similarity = similarity_to_teacher(seen.replies)
    judge = Judge(judge_positives(judge_rows), seen.judge_negatives)
    lexical = Judge(judge_positives(judge_rows), seen.judge_negatives, lexical=True)
    recorded = metrics.record(figures(seen, similarity, prompts, card, judge, lexical, config))
    bar.advance(1, step="similarity, judge")

    out.write_jsonl("replies.jsonl", reply_rows(rows, seen, similarity))
    out.write_jsonl("turns.jsonl", turn_rows(seen.turns, conversations, judge, card, config.pipeline.audit.forbidden))
    out.write_jsonl("conversations.jsonl", replayed(conversations, seen.turns))
    written = {**backend.precision(), "backend": backend.name, "eval_prompts": len(rows),
               "judge_replies": 2 * len(seen.judge_negatives), **recorded,
               "prices_per_mtok": ev.prices.model_dump(), **seen.usage}
    out.write_json("metrics.json", written)
    out.metrics.update({k: v for k, v in written.items() if not isinstance(v, dict)})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "evaluate", lambda out: build(config, out))
