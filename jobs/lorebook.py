"""Lorebooks: a card's `character_book` (Character Card V2/V3 world info), inserted the way front-ends do.

An entry is text with keys. A constant entry is always in the teacher's system message (before or after the card's
text, as its `position` says); it is part of the text every prompt shares, so the engine computes it once. A keyed
entry goes in when one of its keys occurs in the conversation's last `scan_depth` messages, after the card's text
(and the constant entries), in that conversation's system message only: the shared prefix stays the card's, and a
row's own tokens start where its entries do. Once fired, a keyed entry stays for the rest of its conversation
(sticky; only a higher-ranked one that needs its budget pushes it out), so a later turn where no new entry fires
begins with the earlier turn's tokens and reuses the conversation's kept keys and values whole; a front-end that
dropped it would make the teacher re-read the whole conversation. A turn where one fires reuses them up to the
first changed entry. The teacher's records say, per turn, which keyed entries its system message had
(`jobs.records.LOREBOOK_ENTRIES`); `turn_systems` rebuilds those messages, so that every later pass of the teacher
(train's targets and scores) reads each turn with the system message it was sampled with.

Matching, as the V2/V3 specs say: a key is a substring of a scanned message, any case unless `case_sensitive`; a V3
entry with `use_regex` has regular expressions for keys (`/pattern/flags` or a bare pattern); with `selective`, a
key of `secondary_keys` must occur too; `enabled: false` never fires; with the book's `recursive_scanning`, the
content of entries in play is scanned too. Budget: `token_budget` (default `DEFAULT_TOKEN_BUDGET`) in tokens
estimated as ingest estimates them; constant entries take their share first (the shared text may not depend on a
conversation), keyed entries share what is left; when entries do not fit, the lowest `priority` (or, unset, the
lowest `insertion_order`) go first. In the text, entries stand in `insertion_order`, lower first. V3 decorators
(`@@depth 4` lines opening an entry's content) are dropped, not honoured.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.errors import InputError
from jobs.inputs import estimate_tokens
from jobs.records import LOREBOOK_ENTRIES

DEFAULT_SCAN_DEPTH = 2  # messages scanned: SillyTavern's default, the visitor's question and the reply before it
DEFAULT_TOKEN_BUDGET = 512  # estimated tokens of entries in one system message, when the book sets none
MAX_RECURSION = 5  # rounds of recursive scanning: a chain of entries that name each other ends
SEPARATOR = "\n\n"
DECORATOR = re.compile(r"\A(?:[ \t]*@@[^\n]*(?:\n|\Z))+")
REGEX_KEY = re.compile(r"\A/(.+)/([a-z]*)\Z", re.DOTALL)


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, tree: object) -> object:
        """Community cards write `null` for an unset optional field: it means the default."""
        return {k: v for k, v in tree.items() if v is not None} if isinstance(tree, dict) else tree


class Entry(_Tolerant):
    """One `character_book.entries` item; fields the prompt does not use (`id`, `extensions`) are not kept."""

    keys: tuple[str, ...] = ()
    content: str
    enabled: bool = True
    insertion_order: float = 0
    case_sensitive: bool = False
    name: str = ""
    comment: str = ""
    priority: float | None = None
    selective: bool = False
    secondary_keys: tuple[str, ...] = ()
    constant: bool = False
    # unset: after the character's definitions
    position: Literal["before_char", "after_char"] = "after_char"
    use_regex: bool = False  # V3

    @model_validator(mode="after")
    def _usable(self) -> Entry:
        if self.enabled and not self.constant and not any(key.strip() for key in self.keys):
            raise ValueError("an enabled entry that is not constant needs keys")
        for key in (*self.keys, *self.secondary_keys) if self.use_regex else ():
            try:
                _regex(key, self.case_sensitive)
            except re.error as exc:
                raise ValueError(f"key {key!r} is not a regular expression ({exc})") from None
        return self

    @property
    def label(self) -> str:
        """What logs and the report call it: its name, comment or first key."""
        return self.name.strip() or self.comment.strip() or next((k.strip() for k in self.keys if k.strip()), "?")

    @property
    def text(self) -> str:
        return DECORATOR.sub("", self.content).strip()

    @property
    def weight(self) -> float:
        """Its rank when the budget is short: `priority`, else `insertion_order` (the V3 spec's fallback)."""
        return self.insertion_order if self.priority is None else self.priority

    def matches(self, scanned: str) -> bool:
        """Whether `scanned` fires it: a key, and with `selective` a secondary key too."""
        if not self.enabled or self.constant:
            return False
        found = self._any(self.keys, scanned)
        if found and self.selective and any(k.strip() for k in self.secondary_keys):
            return self._any(self.secondary_keys, scanned)
        return found

    def _any(self, keys: Iterable[str], scanned: str) -> bool:
        if self.use_regex:
            return any(_regex(key, self.case_sensitive).search(scanned) for key in keys if key.strip())
        if self.case_sensitive:
            return any(key.strip() in scanned for key in keys if key.strip())
        folded = scanned.casefold()
        return any(key.strip().casefold() in folded for key in keys if key.strip())


def _regex(key: str, case_sensitive: bool) -> re.Pattern:
    """A V3 regex key: `/pattern/flags` (flag i: any case) or a bare pattern."""
    found = REGEX_KEY.match(key.strip())
    pattern, flags = (found.group(1), found.group(2)) if found else (key.strip(), "")
    return re.compile(pattern, re.IGNORECASE if "i" in flags or not case_sensitive else 0)


class Lorebook(_Tolerant):
    """A card's `character_book`: its entries and the book's scanning and budget settings."""

    name: str = ""
    scan_depth: int | None = Field(None, ge=1)
    token_budget: int | None = Field(None, ge=1)
    recursive_scanning: bool = False
    entries: tuple[Entry, ...]

    @property
    def depth(self) -> int:
        return self.scan_depth or DEFAULT_SCAN_DEPTH

    @property
    def budget(self) -> int:
        return self.token_budget or DEFAULT_TOKEN_BUDGET

    def constants(self) -> list[Entry]:
        """The constant entries in the system message every prompt shares, in insertion order."""
        return _within([e for e in self.entries if e.enabled and e.constant and e.text], self.budget)

    def keyed(self) -> list[Entry]:
        return [e for e in self.entries if e.enabled and not e.constant and e.text]

    def keyed_room(self) -> int:
        """The most estimated tokens keyed entries can add to a system message: what the constant entries leave of
        the budget, or all the keyed entries with their separators where that is less; 0 without keyed entries."""
        keyed = self.keyed()
        if not keyed:
            return 0
        left = max(0, self.budget - sum(estimate_tokens(e.text) for e in self.constants()))
        return min(left, sum(estimate_tokens(e.text) for e in keyed)) + estimate_tokens(SEPARATOR * len(keyed))

    def filled(self, fill: Callable[[str], str]) -> Lorebook:
        """The book with `fill` (placeholder substitution) applied to every entry's content."""
        return self.model_copy(update={"entries": tuple(e.model_copy(update={"content": fill(e.content)})
                                                         for e in self.entries)})

    def summary(self) -> str:
        """The book in a few words, for ingest's card mapping."""
        keyed = self.keyed()
        return (f"lorebook: {len(self.constants())} constant entries in the teacher's system prompt, {len(keyed)} "
                f"keyed entries inserted when a key occurs (scan depth {self.depth} messages, budget {self.budget} "
                f"estimated tokens), {len(self.entries) - len(keyed) - len(self.constants())} not used")


def _within(entries: Sequence[Entry], budget: int) -> list[Entry]:
    """`entries` less the lowest-ranked ones until the rest fit `budget`, in insertion order."""
    ranked = sorted(entries, key=lambda e: -e.weight)  # stable: of equal rank, the earlier entry stays
    while ranked and sum(estimate_tokens(e.text) for e in ranked) > budget:
        ranked.pop()
    return sorted(ranked, key=lambda e: (e.position != "before_char", e.insertion_order))


def fired(book: Lorebook, messages: Sequence[str]) -> list[Entry]:
    """The keyed entries whose keys occur in the last `scan_depth` of `messages` (and, with recursive scanning,
    in the content of the entries in play), before the budget."""
    scanned = "\n".join(messages[-book.depth:])
    found: list[Entry] = []
    extra = "\n".join(e.text for e in book.constants()) if book.recursive_scanning else ""
    for _ in range(MAX_RECURSION if book.recursive_scanning else 1):
        new = [e for e in book.keyed() if e not in found and e.matches(f"{scanned}\n{extra}")]
        if not new:
            break
        found += new
        extra += "\n" + "\n".join(e.text for e in new)
    return [e for e in book.keyed() if e in found]  # in the book's order


def active_entries(book: Lorebook, messages: Sequence[str], sticky: Sequence[Entry] = ()) -> list[Entry]:
    """The keyed entries in a teacher prompt whose conversation so far is `messages` (its latest last): those the
    scan fires and those that fired earlier in the conversation (`sticky`), within the budget the constant entries
    leave, in insertion order (before_char ones first)."""
    left = book.budget - sum(estimate_tokens(e.text) for e in book.constants())
    found = fired(book, messages)
    now = [e for e in book.keyed() if e in sticky or e in found]
    return _within(now, max(0, left))


def system_prompt(card_text: str, book: Lorebook | None) -> str:
    """The system message every prompt shares: the card's text between its constant entries."""
    if book is None:
        return card_text
    constants = book.constants()
    before = [e.text for e in constants if e.position == "before_char"]
    after = [e.text for e in constants if e.position == "after_char"]
    return SEPARATOR.join([*before, card_text, *after])


def with_entries(shared: str, entries: Sequence[Entry]) -> str:
    """A conversation's system message: the shared one, then its keyed entries (nothing added without any)."""
    return SEPARATOR.join([shared, *(e.text for e in entries)])


def entry_ids(book: Lorebook, entries: Sequence[Entry]) -> list[int]:
    """`entries` (of `book`, in the order they stand) as their positions in `book.entries`: what a record keeps."""
    position = {id(e): i for i, e in enumerate(book.entries)}
    return [position[id(e)] for e in entries]


def turn_system(shared: str, book: Lorebook | None, ids: Sequence[int]) -> str:
    """A turn's system message from what its record keeps (`entry_ids`): the text `Firing.system` gave the teacher."""
    if not ids:
        return shared
    keyed = book.keyed() if book is not None else []
    entries = [book.entries[i] for i in ids if book is not None and 0 <= i < len(book.entries)]
    if len(entries) != len(ids) or any(e not in keyed for e in entries):
        raise InputError(f"{LOREBOOK_ENTRIES} {list(ids)} names entries that are not keyed entries of the card's "
                         "lorebook: the records are of another card")
    return with_entries(shared, entries)


def turn_systems(shared: str, book: Lorebook | None, record: dict) -> list[str]:
    """Per assistant turn of a conversation record (`jobs.records`), the system message the teacher sampled it with:
    `shared` and the keyed entries the record names. A record without the field: `shared` every turn, which is
    right only where the card has no keyed entries."""
    found = record.get(LOREBOOK_ENTRIES)
    if found is None:
        if book is not None and book.keyed():
            raise InputError(f"record {record.get('id')!r} has no `{LOREBOOK_ENTRIES}` but the card has keyed lorebook "
                             "entries: its teacher records predate them; start a new run id to regenerate them")
        return [shared] * (len(record["messages"]) // 2)
    return [turn_system(shared, book, ids) for ids in found]


class Firing:
    """Which keyed entries each conversation has in play, turn by turn, and how many teacher prompts each was in.

    `system` is called once per teacher prompt, in turn order within a conversation; replaying a shard's records
    (`replay`) gives the same figures as generating them did."""

    def __init__(self, book: Lorebook | None):
        self.book = book
        self.active: dict[str, tuple[Entry, ...]] = {}
        self.counts: Counter[str] = Counter()

    def system(self, shared: str, conversation: str, messages: Sequence[str]) -> tuple[str, list[Entry]]:
        """The system message for this prompt of `conversation`, and the keyed entries in it."""
        if self.book is None:
            return shared, []
        entries = active_entries(self.book, messages, self.active.get(conversation, ()))
        self.active[conversation] = tuple(entries)
        self.counts.update(e.label for e in entries)
        return with_entries(shared, entries), entries

    def replay(self, rows: Iterable[dict]) -> Counter[str]:
        """Each entry's count over teacher records (`jobs.records`): every assistant turn was one teacher prompt."""
        for row in rows:
            texts = [m["content"] for m in row["messages"]]
            for turn in range(1, row["turns"] + 1):
                self.system("", str(row["id"]), texts[:2 * turn - 1])
        return self.counts


def topics(book: Lorebook, limit: int) -> list[str]:
    """What a lorebook says the character talks about, highest-ranked entries first: each keyed entry's first plain
    key (a regular expression is no topic)."""
    ranked = sorted(book.keyed(), key=lambda e: -e.weight)
    keys = [next((k.strip() for k in e.keys if k.strip()), "") for e in ranked if not e.use_regex]
    return list(dict.fromkeys(k for k in keys if k))[:limit]
