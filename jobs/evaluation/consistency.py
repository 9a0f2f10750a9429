"""Evaluate's conversations in each model's own words, and whether a model contradicts itself across turns.

The replay of the held-out conversations (`measure.replay`) gives each turn the teacher's recorded replies as
history, and with them in context the base model catches up. Here each model holds the conversation itself: turn
t's history is the visitor's recorded questions and the model's own earlier replies (turn 1 is the replay's: the
same first question). The visitor's later questions were asked after the teacher's replies, not the model's: every
role gets the same questions, which keeps the roles comparable, though a question may refer to what only the
teacher said.

Contradiction: short conversations of the model's own (checks.yaml's `consistency`) ask a fact about the character
at turn 1 ("In which town were you born?"), something else at turn 2 (`between`), and the fact again at turn 3.
From each answer its facts are taken: its numbers, and its capitalized words that are not common words (jobs.card's
stopwords and a few interjections), words of the character's name or of either question. The later answer
contradicts the first when both state numbers and share none, or both state names and share none ("Bonn", then
"Vienna"); a pair where neither kind is stated in both answers is not compared. The figure is the share of the
compared pairs without a contradiction, and n the number compared.
"""

from __future__ import annotations

import re

from jobs.backends.base import Metered, SamplingParams
from jobs.card import STOPWORDS
from jobs.evaluation.figures import Judge
from jobs.evaluation.measure import OnBatch, sample_replies
from jobs.evaluation.persona import Checks
from jobs.evaluation.teacher_card import Card, system_messages
from jobs.metrics import CONSISTENCY_PAIRS, CONSISTENT, IN_CHARACTER_OWN_LATER, LATER_TURN

Facts = tuple[frozenset[str], frozenset[str]]  # numbers, names
# capitalized at the start of a reply without naming anything
INTERJECTIONS = frozenset("ah oh yes no well sir madam dear alas indeed hello hmm ha bah pah nonsense".split())


def own_history(messages: list[dict], own: list[str], turn: int) -> list[dict]:
    """The conversation before `turn` with the model's own replies in place of the recorded ones."""
    history = []
    for t in range(1, turn):
        history += [messages[2 * t - 2], {"role": "assistant", "content": own[t - 1]}]
    return history + [messages[2 * turn - 2]]


def own_replay(client: Metered, conversations: list[list[dict]], system: Card, params: SamplingParams,
               first: list[str], on_batch: OnBatch = None) -> dict[int, list[str]]:
    """Each conversation held by the client's model, its own replies as history; `first` is the replay's turn 1.
    By turn, the replies of the conversations that reach it (`measure.replay`'s shape)."""
    if not conversations:
        return {}
    own = [[reply] for reply in first]
    turns = {1: list(first)}
    for turn in range(2, max(map(len, conversations)) // 2 + 1):
        going = [i for i, messages in enumerate(conversations) if len(messages) >= 2 * turn]
        histories = [own_history(conversations[i], own[i], turn) for i in going]
        chats = [client.renderer.chat(system_messages(system, i, history) + history)
                 for i, history in zip(going, histories, strict=True)]
        turns[turn] = sample_replies(client, chats, params, on_batch)
        for i, reply in zip(going, turns[turn], strict=True):
            own[i].append(reply)
    return turns


def recorded_turns(conversations: list[list[dict]]) -> dict[int, list[str]]:
    """The teacher's own conversations: the recorded held-out ones, its own replies as history and the visitor's
    questions asked after them (what `own_replay` gives any other model, nearer still), never learned from. By
    turn, `own_replay`'s shape."""
    return {turn: [m[2 * turn - 1]["content"] for m in conversations if len(m) >= 2 * turn]
            for turn in range(1, max(map(len, conversations), default=0) // 2 + 1)}


def own_steps(conversations: list[list[dict]], checks: Checks) -> int:
    """The replies `own_replay` and `ask_twice` sample: every turn after the first, three a consistency talk."""
    return sum(len(m) // 2 - 1 for m in conversations) + ask_steps(checks)


def ask_steps(checks: Checks) -> int:
    return 3 * len(checks.consistency)


def ask_twice(client: Metered, talks: tuple[tuple[str, str, str], ...], system: Card, params: SamplingParams,
              on_batch: OnBatch = None) -> list[list[str]]:
    """Each consistency conversation's three replies, turn by turn (one batch a turn), the model's own as history."""
    replies: list[list[str]] = [[] for _ in talks]
    for turn in range(3 if talks else 0):
        chats = []
        for i, (questions, own) in enumerate(zip(talks, replies, strict=True)):
            history = [m for q, r in zip(questions[:turn], own, strict=True)
                       for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
            history.append({"role": "user", "content": questions[turn]})
            chats.append(client.renderer.chat(system_messages(system, i, history) + history))
        for own, reply in zip(replies, sample_replies(client, chats, params, on_batch), strict=True):
            own.append(reply)
    return replies


def facts(text: str, ignored: set[str]) -> Facts:
    """A reply's numbers and its capitalized words that name something (not common, not in `ignored`)."""
    names = {w.lower() for w in re.findall(r"\b[A-Z][A-Za-z-]*", text)}  # "Vienna's": "vienna"
    return (frozenset(re.findall(r"\b\d+\b", text)),
            frozenset(names - STOPWORDS - INTERJECTIONS - ignored - {"i"}))


def contradicts(first: str, again: str, questions: tuple[str, ...], checks: Checks) -> bool | None:
    """Whether the later answer contradicts the first (the module's rule); None when they state nothing to compare."""
    ignored = {w.lower() for text in (*questions, *checks.name_parts) for w in re.findall(r"[\w'-]+", text)}
    said, said_again = facts(first, ignored), facts(again, ignored)
    compared = [(a, b) for a, b in zip(said, said_again, strict=True) if a and b]
    return any(not a & b for a, b in compared) if compared else None


def verdicts(checks: Checks, replies: list[list[str]]) -> list[bool | None]:
    return [contradicts(own[0], own[2], talk, checks) for talk, own in zip(checks.consistency, replies, strict=True)]


def figures(own_turns: dict[str, dict[int, list[str]]], repeated: dict[str, list[list[str]]], checks: Checks,
            judge: Judge) -> dict[str, float | int | None]:
    """Judged in character at turns 3+ of each role's own conversations (None where none reaches them), and the
    share of compared facts not contradicted, with n."""
    found: dict[str, float | int | None] = {}
    for role in IN_CHARACTER_OWN_LATER.variants:
        later = [r for turn, replies in own_turns.get(role, {}).items() if turn >= LATER_TURN for r in replies]
        found[IN_CHARACTER_OWN_LATER.of(role)] = judge.share(later) if later else None
        compared = [v for v in verdicts(checks, repeated[role]) if v is not None]
        found[CONSISTENT.of(role)] = 1 - sum(compared) / len(compared) if compared else None
        found[CONSISTENCY_PAIRS.of(role)] = len(compared)
    return found


def rows(checks: Checks, repeated: dict[str, list[list[str]]]) -> list[dict]:
    """consistency.jsonl: each consistency conversation's questions, and each role's replies and verdict."""
    found = {role: verdicts(checks, replies) for role, replies in repeated.items()}
    return [{"questions": list(talk), **{role: {"replies": repeated[role][i], "contradicts": found[role][i]}
                                         for role in repeated}}
            for i, talk in enumerate(checks.consistency)]
