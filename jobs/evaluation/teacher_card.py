"""The teacher's system message in evaluate's passes: the card's shared text (its constant lorebook entries
included) and, for a card with a lorebook, the keyed entries (`jobs.lorebook`) the teacher phase gave it, so that
evaluate's teacher is the teacher that wrote the data.

- Over a record's own turns (the held-out prompts' top k and NLL, the replay of the held-out conversations), each
  turn's system message is rebuilt from the record (`lorebook.turn_systems`), as train's passes do.
- Where the teacher samples talk that has no record (the persona checks, its own conversations, the consistency
  talks), keyed entries fire on the keys of that conversation so far (`lorebook.Firing`, a new one per pass), as in
  the teacher phase.

A card without a lorebook gives the shared text everywhere, the one string it gave before there were lorebooks: the
same prompts and figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jobs.lorebook import Firing, Lorebook, turn_systems

# a sampling pass's system message: none (the student, the base), one text for every prompt, or per conversation
# (its index in the pass) and history (the messages up to the question the reply answers) its own text
Card = str | Callable[[int, list[dict]], str] | None


def system_text(card: Card, conversation: int, history: list[dict]) -> str | None:
    return card(conversation, history) if callable(card) else card


def system_messages(card: Card, conversation: int, history: list[dict]) -> list[dict]:
    """What goes before `history` in the chat: the system message, where there is one."""
    text = system_text(card, conversation, history)
    return [{"role": "system", "content": text}] if text else []


class Fired:
    """One pass's keyed entries firing on its conversations' keys, turn by turn as the teacher phase fired them. A
    conversation whose earlier turns the pass did not ask for (own conversations take turn 1 from the replay) has
    them fired first, so that an entry an earlier question fired stays as it would have."""

    def __init__(self, shared: str, book: Lorebook):
        self.shared, self.firing = shared, Firing(book)
        self.turns: dict[int, int] = {}  # per conversation, the last turn fired

    def __call__(self, conversation: int, history: list[dict]) -> str:
        texts = [message["content"] for message in history]
        turn = (len(texts) + 1) // 2
        for earlier in range(self.turns.get(conversation, 0) + 1, turn):
            self.firing.system(self.shared, str(conversation), texts[:2 * earlier - 1])
        self.turns[conversation] = turn
        return self.firing.system(self.shared, str(conversation), texts)[0]


@dataclass(frozen=True)
class TeacherCard:
    """The card as the teacher reads it: `shared`, the text every prompt shares; `book`, the card's lorebook;
    `talks`, per held-out conversation each turn's system message from its record."""

    shared: str
    book: Lorebook | None = None
    talks: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def read(cls, shared: str, book: Lorebook | None, conversations: list[dict]) -> TeacherCard:
        """From the card and the held-out conversations' records (eval_conversations.jsonl)."""
        if book is None:
            return cls(shared)
        return cls(shared, book, tuple(tuple(turn_systems(shared, book, row)) for row in conversations))

    def systems(self, row: dict) -> list[str]:
        """Per assistant turn of a record, the system message the teacher sampled it with."""
        return turn_systems(self.shared, self.book, row)

    def recorded(self) -> Card:
        """The held-out conversations' system messages, turn by turn, as their records say (the replay's)."""
        if self.book is None:
            return self.shared
        talks = self.talks
        return lambda conversation, history: talks[conversation][len(history) // 2]

    def firing(self) -> Card:
        """For one pass over talk without a record: keyed entries fire on its keys (a new `Fired` each pass)."""
        return self.shared if self.book is None else Fired(self.shared, self.book)
