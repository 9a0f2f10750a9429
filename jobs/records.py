"""A conversation record: the one shape the teacher writes, the audit keeps and the split files carry.

    {"id": "bthv-0007", "prompt": "Who taught you?",
     "messages": [{"role": "user", "content": "Who taught you?"},
                  {"role": "assistant", "content": "Haydn, though I learned little from him."},
                  {"role": "user", "content": "Why so little?"},
                  {"role": "assistant", "content": "He was busy with his London symphonies."}],
     "turns": 2, "reply_tokens": [14, 11], "finished": [true, true],
     "prompt_tokens_with_card": 412, "prompt_tokens_without_card": 31}

`messages` is the chat as the student sees it: no system message (no card), user and assistant alternating from
the ingest prompt (`prompt`) to an assistant reply; training and evaluation read it (the format TRL's SFTTrainer
and tinker-cookbook read). `turns` counts the assistant turns; `reply_tokens` (tokens the teacher sampled) and
`finished` (the reply ended before the token limit) hold one entry per assistant turn; the prompt tokens are turn
1's. A card with a lorebook (`jobs.lorebook`) adds `lorebook_entries`, also one entry per assistant turn: the
keyed entries in that turn's system message, as their positions (from 0) in the card's `character_book.entries`,
in the order they stand in it (`lorebook.turn_system` rebuilds the message); a card without one writes no such
field. The audit adds `trimmed` (the turns it cut to whole sentences, when any) and, to a conversation it cut
short, `cut_at` (the first turn it lost) and `cut_reason`.
"""

from __future__ import annotations

import re

from jobs.errors import InputError

TEACHER_FILE = "conversations.jsonl"  # where each teacher shard writes its records, and the audit reads them
PER_TURN = ("reply_tokens", "finished")  # one entry per assistant turn
LOREBOOK_ENTRIES = "lorebook_entries"  # one entry per assistant turn, written for a card with a lorebook only
OPTIONAL_PER_TURN = (LOREBOOK_ENTRIES,)
ROLES = ("user", "assistant")
SENTENCE_END = re.compile(r"[.!?…](?=[\"')\]]?(\s|$))")


def trim_to_sentence(text: str) -> str:
    """A reply cut off by the token limit as the audit keeps it: its whole sentences ("" when it has none)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else ""


def exchange(question: str, reply: str) -> list[dict]:
    """A question and its reply as chat messages."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def opened(id_: object, prompt: str, reply: str, reply_tokens: int, finished: bool,
           lorebook_entries: list[int] | None = None, **fields: object) -> dict:
    """A record of one turn: the ingest prompt and the teacher's reply (`fields`: its prompt tokens;
    `lorebook_entries`: the keyed entries in its system message, None for a card without a lorebook)."""
    record = {"id": id_, "prompt": prompt, "messages": exchange(prompt, reply), "turns": 1,
              "reply_tokens": [reply_tokens], "finished": [finished], **fields}
    return record if lorebook_entries is None else {**record, LOREBOOK_ENTRIES: [lorebook_entries]}


def add_turn(record: dict, question: str, reply: str, reply_tokens: int, finished: bool,
             lorebook_entries: list[int] | None = None) -> None:
    """Appends a turn, the visitor's question and the teacher's reply, to `record` in place (`lorebook_entries`
    where the record carries them)."""
    if (lorebook_entries is None) != (LOREBOOK_ENTRIES not in record):
        raise ValueError("a turn's lorebook entries go with a record that carries them, and only there")
    record["messages"] += exchange(question, reply)
    record["turns"] += 1
    record["reply_tokens"].append(reply_tokens)
    record["finished"].append(finished)
    if lorebook_entries is not None:
        record[LOREBOOK_ENTRIES].append(lorebook_entries)


def per_turn(record: dict) -> tuple[str, ...]:
    """The record's fields that hold one entry per assistant turn."""
    return (*PER_TURN, *(key for key in OPTIONAL_PER_TURN if key in record))


def replies(record: dict) -> list[str]:
    """The assistant replies, turn by turn."""
    return [message["content"] for message in record["messages"][1::2]]


def first_reply(record: dict) -> str:
    return record["messages"][1]["content"]


def turn(record: dict, number: int) -> dict:
    """Turn `number` (from 1) alone: `{"turn", "question", "reply", "reply_tokens", "finished"}` (and
    `lorebook_entries` where the record carries them)."""
    question, reply = record["messages"][2 * number - 2:2 * number]
    return {"turn": number, "question": question["content"], "reply": reply["content"],
            **{key: record[key][number - 1] for key in per_turn(record)}}


def with_reply(record: dict, number: int, reply: str) -> dict:
    """A copy of `record` whose turn `number` replies `reply`."""
    messages = list(record["messages"])
    messages[2 * number - 1] = {"role": "assistant", "content": reply}
    return {**record, "messages": messages}


def cut(record: dict, turns: int) -> dict:
    """A copy of `record` with its first `turns` turns: messages, per-turn entries and `trimmed` agree."""
    kept = {**record, "messages": record["messages"][:2 * turns], "turns": turns,
            **{key: record[key][:turns] for key in per_turn(record)}}
    trimmed = [number for number in record.get("trimmed", ()) if number <= turns]
    kept.pop("trimmed", None)
    return {**kept, "trimmed": trimmed} if trimmed else kept


def first_turn(record: dict) -> dict:
    """A conversation as a single-turn record: its prompt and first reply (no longer cut by the audit)."""
    return {key: value for key, value in cut(record, 1).items() if key not in ("cut_at", "cut_reason")}


def problem(record: dict) -> str | None:
    """What makes `record` not a conversation record, or None."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) % 2:
        return "`messages` must be a non-empty list of user and assistant messages, a reply last"
    roles = [message.get("role") if isinstance(message, dict) else None for message in messages]
    if roles != [ROLES[i % 2] for i in range(len(messages))]:
        return f"`messages` must alternate user and assistant from a user message, not {roles}"
    if not all(isinstance(message.get("content"), str) for message in messages):
        return "every message needs a string `content`"
    turns = len(messages) // 2
    if record.get("turns") != turns:
        return f"`turns` is {record.get('turns')!r}, `messages` holds {turns} assistant turns"
    for key in per_turn(record):
        if not isinstance(record.get(key), list) or len(record[key]) != turns:
            return f"`{key}` must hold one entry per assistant turn ({turns})"
    entries = record.get(LOREBOOK_ENTRIES, [])
    if not all(isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids) for ids in entries):
        return f"`{LOREBOOK_ENTRIES}` must hold, per turn, a list of entry positions (whole numbers from 0)"
    if "id" not in record or record.get("prompt") != messages[0]["content"]:
        return "needs an `id` and the `prompt` its first message asks"
    return None


def checked(record: dict, where: str) -> dict:
    """`record` if it is a conversation record; else a one-line error naming `where` (a file and line)."""
    found = problem(record)
    if found:
        raise InputError(f"{where}: not a conversation record: {found}")
    return record
