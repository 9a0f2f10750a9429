"""Evaluate's figures from what the models gave (`measure.Measured`): no model runs here but the sentence embeddings
and the in-character judges. Each figure is declared in `jobs.metrics` with its unit and direction."""

from __future__ import annotations

import statistics

from jobs import records
from jobs.backends.embeddings import cosine_to_reference, embed
from jobs.card import CharacterCard
from jobs.config import PricesConfig
from jobs.errors import InputError
from jobs.evaluation.measure import Measured, Prompts
from jobs.metrics import (
    COST_PER_REQUEST,
    COST_RATIO,
    IN_CHARACTER,
    IN_CHARACTER_LATER,
    IN_CHARACTER_LEXICAL,
    IN_CHARACTER_TURN_1,
    JUDGE_ACCURACY,
    JUDGE_ACCURACY_BY_TURN,
    KL,
    KL_CLOSED,
    LATER_TURN,
    LEXICAL_JUDGE_ACCURACY,
    NLL,
    OUT_OF_CHARACTER,
    PERSONA_SIMILARITY,
    PROMPT_COST_RATIO,
    PROMPT_TOKENS,
    REPLY_TOKENS,
    SIMILARITY,
    TOKEN_REDUCTION,
)


def character(card: CharacterCard) -> str:
    """What persona similarity compares a reply with: the character's name and topics, short enough for the
    embedding model."""
    return f"{card.name}: {', '.join(card.topics)}" if card.topics else card.name


def persona_similarity(replies: dict[str, list[str]], card: CharacterCard) -> dict[str, float]:
    return {PERSONA_SIMILARITY.of(role): statistics.mean(to_character(replies[role], card))
            for role in PERSONA_SIMILARITY.variants}


def to_character(replies: list[str], card: CharacterCard) -> list[float]:
    """Each reply's similarity to the character (the character is not trimmed: it is no sentence)."""
    return cosine_to_reference([as_judged(r) for r in replies], [character(card)] * len(replies))


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
    return [r["messages"][2 * t - 1]["content"] for t, r in replay_order(rows)]


def judge_turns(rows: list[dict]) -> list[int]:
    """The turn of each reply `judge_positives` gives (the base's, `replay`'s, come in the same order)."""
    return [t for t, _ in replay_order(rows)]


def replay_order(rows: list[dict]) -> list[tuple[int, dict]]:
    turns = max(len(r["messages"]) for r in rows) // 2
    return [(t, r) for t in range(1, turns + 1) for r in rows if len(r["messages"]) >= 2 * t]


def as_judged(reply: str) -> str:
    """A reply as both judges read it: its whole sentences, as the audit keeps the teacher's training replies. The
    teacher's replies cut off by the token limit reach the judges trimmed, everyone else's would reach them cut off
    mid-sentence: a tell of who wrote a reply that says nothing of the character. A reply with no whole sentence is
    read as it is."""
    return records.trim_to_sentence(reply) or reply.strip()


def similarity(replies: list[str], references: list[str]) -> list[float]:
    """Each reply's cosine similarity to the reference at its index, both read as the judges read them
    (`as_judged`): a cut-off tail would set the teacher's trimmed replies apart from everyone else's."""
    return cosine_to_reference([as_judged(r) for r in replies], [as_judged(r) for r in references])


def similarity_to_teacher(replies: dict[str, list[str]]) -> dict[str, list[float]]:
    """Each reply's cosine similarity to the teacher's reply to the same prompt, by metric key."""
    return {SIMILARITY.of(role): similarity(replies[role], replies["teacher"]) for role in SIMILARITY.variants}


class Judge:
    """The in-character judge: a logistic regression of teacher (1) against base (0) replies in training rows, on
    sentence embeddings (what a reply is about) or, `lexical`, on word and letter n-grams (how it is said); and
    its accuracy on held-out folds of them, overall and, given each teacher reply's conversation turn (`turns`, the
    base's in the same order), at turn 1 and at turns 3+: after the same history the base catches up, so a share
    judged in character at later turns can only be read against how well the judge tells them apart there."""

    def __init__(self, teacher_replies: list[str], base_replies: list[str], lexical: bool = False,
                 turns: list[int] | None = None):
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_predict, cross_val_score

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
        self.accuracy_by_turn: dict[str, float | None] = {}
        if turns is not None:
            right = cross_val_predict(self.model, features, labels, cv=folds) == labels
            turn_of = turns + turns
            for variant, first, last in (("turn_1", 1, 1), ("turn_3_on", LATER_TURN, 10**6)):
                at = [ok for ok, t in zip(right, turn_of, strict=True) if first <= t <= last]
                self.accuracy_by_turn[JUDGE_ACCURACY_BY_TURN.of(variant)] = float(sum(at) / len(at)) if at else None
        self.model.fit(features, labels)

    def features(self, replies: list[str]):
        kept = [as_judged(reply) for reply in replies]
        return kept if self.lexical else embed(kept)

    def share(self, replies: list[str]) -> float:
        """The share of the replies it calls the teacher's."""
        return float(self.model.predict(self.features(replies)).mean())

    def says(self, replies: list[str]) -> list[bool]:
        """For each reply, whether it calls it the teacher's (the rubric judge is compared with it reply by reply)."""
        return [bool(label) for label in self.model.predict(self.features(replies))]


def in_character(replies: dict[str, list[str]], judge: Judge, lexical: Judge) -> dict[str, float]:
    return {JUDGE_ACCURACY.key: judge.accuracy, **judge.accuracy_by_turn,
            **{IN_CHARACTER.of(role): judge.share(replies[role]) for role in IN_CHARACTER.variants},
            LEXICAL_JUDGE_ACCURACY.key: lexical.accuracy,
            **{IN_CHARACTER_LEXICAL.of(role): lexical.share(replies[role]) for role in IN_CHARACTER_LEXICAL.variants}}


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
    rows = []
    for role, by_turn in turns.items():
        for turn, replies in by_turn.items():
            recorded = [m[2 * turn - 1]["content"] for m in conversations if len(m) >= 2 * turn]
            rows.append({"turn": turn, "role": role, "replies": len(replies),
                         IN_CHARACTER.label: judge.share(replies),
                         PERSONA_SIMILARITY.label: statistics.mean(to_character(replies, card)),
                         OUT_OF_CHARACTER.label: statistics.mean(says_out_of_character(t, forbidden)
                                                                 for t in replies),
                         SIMILARITY.label: statistics.mean(similarity(replies, recorded))})
    return rows


def by_turn(turns: dict[str, dict[int, list[str]]], judge: Judge) -> dict[str, float | None]:
    """Judged in character at turn 1 of the held-out conversations and, pooled, at turns 3 and later (None where
    no conversation reaches them)."""
    def share(role: str, first: int, last: int) -> float | None:
        replies = [r for turn, rs in turns.get(role, {}).items() if first <= turn <= last for r in rs]
        return judge.share(replies) if replies else None

    return {**{IN_CHARACTER_TURN_1.of(role): share(role, 1, 1) for role in IN_CHARACTER_TURN_1.variants},
            **{IN_CHARACTER_LATER.of(role): share(role, LATER_TURN, 10**6) for role in IN_CHARACTER_LATER.variants}}


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
            judge: Judge, lexical: Judge, forbidden: tuple[str, ...], prices: PricesConfig) -> dict[str, float | None]:
    """Every figure of metrics.json, as computed (`metrics.record` rounds them)."""
    return {**{key: statistics.mean(values) for key, values in similarity.items()},
            **persona_similarity(seen.replies, card),
            **out_of_character(seen.replies, forbidden),
            **in_character(seen.replies, judge, lexical),
            **by_turn(seen.turns, judge),
            **kl(seen.kl),
            **nll(seen.nll, prompts.teacher_replies),
            **tokens_and_cost(prompts, prices),
            **seen.latency}


def reply_rows(rows: list[dict], seen: Measured, similarity: dict[str, list[float]]) -> list[dict]:
    """replies.jsonl: each prompt with every role's reply, their similarity to the teacher's and its NLL."""
    per_reply = {**similarity, **{NLL.of(role): seen.nll[role] for role in NLL.variants},
                 **{KL.of(role): [statistics.mean(row) for row in seen.kl[role]] for role in KL.variants}}
    return [{"id": row["id"], "prompt": row["prompt"],
             **{role: seen.replies[role][i] for role in ("teacher", "student", "base", "teacher_resampled")},
             **{key: values[i] for key, values in per_reply.items()}} for i, row in enumerate(rows)]
