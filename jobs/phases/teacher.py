"""Teacher: the base model with the card as system prompt answers one shard of prompts.

A share of the prompts (`conversations.share`, chosen by a hash of the prompt id) opens a conversation instead:
after the teacher's reply, a simulated visitor (the same engine *without* the card, told it is a curious visitor
talking with the character) asks a follow-up question about what was just said, the teacher answers it with
the card and the whole conversation before it, and so on for `conversations.turns` assistant turns. Each turn is
one batched call for the visitors and one for the teacher, over every conversation still going. Each prompt gives
one conversation record (`jobs.records`: its `messages` as the student will see them, and per-turn metering),
the shape the audit and the split keep.

A card's lorebook (`jobs.lorebook`): its constant entries are part of the system prompt every prompt shares; its
keyed entries join a conversation's system message, after that shared text, from the turn a key occurs on
(`lorebook.Firing`), each teacher prompt logging the entries it carries; the shard's metrics count, per entry, the
teacher prompts it was in (`lorebook_fired`). Each record keeps, per turn, the keyed entries its system message had
(`records.LOREBOOK_ENTRIES`, only for a card with a lorebook), so that the later passes of the teacher over the
records (train's `logit` targets and `on_policy` scores) rebuild each turn's system message
(`lorebook.turn_systems`) rather than read every turn with the shared text.

Replies are cached across runs under a key of the card, the model, the sampling and conversation settings and the
shard's prompts: a new run that changes only training settings reuses them; a changed card regenerates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from jobs import records
from jobs.backends.base import Metered, SamplingClient, SamplingParams
from jobs.card import CharacterCard
from jobs.config import ConversationsConfig, digest
from jobs.errors import InputError
from jobs.log import Progress, get_logger
from jobs.lorebook import Firing, Lorebook, entry_ids
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.store import UnitWriter, jsonl_bytes, parse_jsonl

# part of the cache key: the cached records' shape; bumped when it changes, so an old entry is a miss, not misread
# (1, unnamed: `reply` and `followups` rows)
CACHE_FORMAT = 2
# part of the cache key of a card with a lorebook only: its records' shape (1: `records.LOREBOOK_ENTRIES` per turn)
LOREBOOK_RECORDS = 1
# part of the fingerprint: a shard written before its output took this shape is redone, not misread
OUTPUT_LAYOUT = 2

VISITOR = "Visitor"  # how the visitor's lines are labelled in the transcript it reads
VISITOR_SYSTEM = ("You are a curious visitor talking with {name}. Read the conversation so far and ask {name} one "
                  "short follow-up question about what {name} just said. Write only the question.")
# the sampler seeds prompt i of a call with `seed + i`; each (turn, role) gets its own block of seeds
SEED_STRIDE = 1 << 20
# labels a visitor's line may open with, besides the character's name
QUOTES = "\"'`*_ \u201c\u201d\u2018\u2019\u00ab\u00bb"  # straight, curly and angle quotes, markdown emphasis
LABELS = ("visitor", "user", "you", "me", "guest", "interviewer", "question", "follow-up question",
          "follow-up", "followup", "q")


def opens_conversation(prompt_id: object, share: float) -> bool:
    """Whether a prompt opens a conversation: a hash of its id alone, so a shard's choice does not depend on
    the other shards (or on which shard the prompt is in)."""
    if share <= 0:
        return False
    value = int.from_bytes(hashlib.sha256(f"conversation:{prompt_id}".encode()).digest()[:8], "big")
    return value / 2**64 < share


def turn_seed(seed: int, turn: int, role: str) -> int:
    """The base seed of a turn's call: turn 1's teacher keeps the section's seed (as a single-turn reply); every
    later turn's visitor and teacher get blocks of their own."""
    slot = 2 * (turn - 1) - (1 if role == "visitor" else 0)
    return seed + SEED_STRIDE * slot


def clean_question(text: str, name: str = "") -> str:
    """The visitor's question from what it wrote: its first line with text (not a heading ending in a colon), without
    speaker labels ("Visitor:", "**Question:**", the character's name), surrounding quotes or anything after the
    first question mark; "" when nothing is left."""
    # a heading the visitor echoed ("The conversation so far:") is not its question
    line = next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().endswith(":")), "")
    names = [*LABELS, *(n.lower() for n in [name, *name.split()] if n)]
    label = re.compile(r"^[*_#>\s-]*(?:" + "|".join(map(re.escape, sorted(set(names), key=len, reverse=True)))
                       + r")[*_\s]*[:\uff1a][*_\s]*", re.IGNORECASE)
    previous = None
    while previous != line:
        previous = line
        line = label.sub("", line).strip()
        line = line.strip(QUOTES).strip()
    if "?" in line:
        line = line[:line.index("?") + 1]
    line = " ".join(line.split())
    return line if re.search(r"\w", line) else ""


def transcript(name: str, messages: list[dict]) -> str:
    """The conversation so far as the visitor reads it (its user message)."""
    lines = [f"{VISITOR if m['role'] == 'user' else name}: {m['content']}" for m in messages if m["role"] != "system"]
    return "\n".join(lines) + f"\n\nWhat do you ask {name} next? One short question."


def generate(config: PhaseConfig, teacher: SamplingClient, system: str, prompts: list[dict], name: str,
             lorebook: Lorebook | None = None) -> list[dict]:
    """The shard's conversation records: every prompt's reply (one batched call), and for the prompts that open a
    conversation the later turns (`converse`). `name` is the character's, as the visitor addresses it; `system` the
    text every prompt's system message starts with, which `lorebook`'s keyed entries follow where they fire."""
    render = teacher.renderer
    lore = Firing(lorebook)
    systems = [lore_system(config, lore, system, p["id"], [p["prompt"]], 1) for p in prompts]
    with_card = [render.prompt(p["prompt"], system=text) for p, (text, _) in zip(prompts, systems, strict=True)]
    params = SamplingParams.from_config(config.pipeline.teacher)
    with Progress(len(prompts), f"teacher shard {config.shard}", turn_stage(config.pipeline.conversations, 1)) as bar:
        replies = teacher.sample(with_card, params, on_batch=bar.advance)
    rows = [records.opened(p["id"], p["prompt"], render.decode(tokens), len(tokens), len(tokens) < params.max_tokens,
                           lorebook_entries=ids, prompt_tokens_with_card=len(full),
                           prompt_tokens_without_card=len(render.prompt(p["prompt"])))
            for p, tokens, full, (_, ids) in zip(prompts, replies, with_card, systems, strict=True)]
    talks = config.pipeline.conversations
    opened = [row for row in rows if opens_conversation(row["id"], talks.share)]
    if opened:
        converse(config, teacher, system, name, opened, talks, lore)
    return rows


def lore_system(config: PhaseConfig, lore: Firing, system: str, conversation: object, messages: list[str],
                turn: int) -> tuple[str, list[int] | None]:
    """A teacher prompt's system message: `system` and the keyed entries in play, which are logged; and those
    entries as the record keeps them (`lorebook.entry_ids`; None for a card without a lorebook)."""
    text, entries = lore.system(system, str(conversation), messages)
    if entries:
        get_logger().info("lorebook entries", shard=config.shard, id=conversation, turn=turn,
                          entries=[entry.label for entry in entries])
    return text, None if lore.book is None else entry_ids(lore.book, entries)


def converse(config: PhaseConfig, teacher: SamplingClient, system: str, name: str, rows: list[dict],
             talks: ConversationsConfig, lore: Firing | None = None) -> None:
    """Adds turns to each record (`jobs.records.add_turn`): turn by turn, the visitors' questions (one batched
    call), then the teacher's answers with the card and the whole conversation (one batched call). A conversation
    ends early when its visitor has no question or its next prompt would not fit the model's context."""
    render = teacher.renderer
    teacher_params = SamplingParams.from_config(config.pipeline.teacher)
    visitor_system = VISITOR_SYSTEM.format(name=name)
    lore = lore or Firing(None)
    going = list(rows)
    for turn in range(2, talks.turns + 1):
        if not going:
            break
        with Progress(2 * len(going), f"teacher shard {config.shard}",
                      stages=[(len(going), turn_stage(talks, turn, "visitor questions")),
                              (len(going), turn_stage(talks, turn))]) as bar:
            asked = []
            for row in going:
                try:
                    asked.append((row, render.chat([{"role": "system", "content": visitor_system},
                                                    {"role": "user", "content": transcript(name, row["messages"])}])))
                except InputError:
                    bar.advance(2)  # the conversation outgrew the context: it ends here
            visitor_params = dataclasses.replace(SamplingParams.from_config(talks.visitor),
                                                 seed=turn_seed(talks.visitor.seed, turn, "visitor"))
            written = sample(teacher, [tokens for _, tokens in asked], visitor_params, bar)
            answering = []
            for (row, _), tokens in zip(asked, written, strict=True):
                question = clean_question(render.decode(tokens), name)
                if not question:
                    bar.advance()
                    continue
                history = [*row["messages"], {"role": "user", "content": question}]
                said = [message["content"] for message in history]
                now, ids = lore_system(config, lore, system, row["id"], said, turn)
                try:
                    answering.append((row, question, ids,
                                      render.chat([{"role": "system", "content": now}, *history])))
                except InputError:
                    bar.advance()
            params = dataclasses.replace(teacher_params, seed=turn_seed(teacher_params.seed, turn, "teacher"))
            answers = sample(teacher, [tokens for *_, tokens in answering], params, bar)
        going = []
        for (row, question, ids, _), tokens in zip(answering, answers, strict=True):
            records.add_turn(row, question, render.decode(tokens), len(tokens), len(tokens) < params.max_tokens, ids)
            going.append(row)


def turn_stage(talks: ConversationsConfig, turn: int, what: str = "teacher replies") -> str:
    """What a progress line says runs: "turn 2/4: visitor questions" ("teacher replies" without conversations)."""
    return f"turn {turn}/{talks.turns}: {what}" if talks.share > 0 else what


def sample(client: SamplingClient, prompts: list[list[int]], params: SamplingParams, bar: Progress) -> list[list[int]]:
    return client.sample(prompts, params, on_batch=bar.advance) if prompts else []


def build(config: PhaseConfig, out: UnitWriter) -> None:
    store = config.store
    card = store.read_json("ingest", "card.json")
    prompts = [row for row in store.read_jsonl("ingest", "prompts.jsonl") if row["shard"] == config.shard]
    character = CharacterCard.model_validate(card)
    system = character.teacher_system_prompt()
    backend = open_backend(config)
    precision = backend.precision()
    pipeline = config.pipeline
    # a card without a lorebook keeps the key it had before there were lorebooks; a card with one gets a new key
    # where its records' shape changed (`LOREBOOK_RECORDS`)
    book = ({"lorebook": character.lorebook.model_dump(), "lorebook_records": LOREBOOK_RECORDS}
            if character.lorebook is not None else {})
    cache_key = digest({"system": system, "name": character.name, "model": pipeline.model.model_dump(),
                        "precision": precision, "sampling": pipeline.teacher.model_dump(),
                        "conversations": pipeline.conversations.model_dump(), "prompts": prompts,
                        "format": CACHE_FORMAT, **book})
    cached = store.cache_key("teacher", cache_key, records.TEACHER_FILE)
    usage = {"prefill_tokens": 0, "sample_tokens": 0}  # cached replies cost nothing this time
    hit = store.read_cached(cached)  # checked against its recorded sha256: a changed entry is a miss
    if hit is not None:
        rows = parse_jsonl(hit, cached, check=records.checked)
        out.metrics["cache_hit"] = 1
    else:
        teacher = Metered(backend.sampler())
        rows = generate(config, teacher, system, prompts, character.name, character.lorebook)
        usage = dict(teacher.usage)
        store.write_cached(cached, jsonl_bytes(rows))
        out.metrics["cache_hit"] = 0
    out.write_jsonl(records.TEACHER_FILE, rows)
    # turn 1's figures, then the later turns' (conversations: the records of more than one turn)
    out.metrics.update({**precision, "backend": backend.name, "rows": len(rows),
                        "reply_tokens": sum(r["reply_tokens"][0] for r in rows),
                        "prompt_tokens_with_card": sum(r["prompt_tokens_with_card"] for r in rows),
                        "conversations": sum(1 for r in rows if r["turns"] > 1),
                        "followups": sum(r["turns"] - 1 for r in rows),
                        "followup_reply_tokens": sum(sum(r["reply_tokens"][1:]) for r in rows),
                        **usage})
    if character.lorebook is not None:  # replayed from the records: a cached shard counts as a generated one
        out.metrics["lorebook_fired"] = fired_counts(character.lorebook, rows)


def fired_counts(book: Lorebook, rows: list[dict]) -> dict[str, int]:
    """Per keyed entry, the teacher prompts (assistant turns) whose system message carried it; 0 for one that never
    fired."""
    counts = Firing(book).replay(rows)
    return {label: counts[label] for label in dict.fromkeys(entry.label for entry in book.keyed())}


def main(config: PhaseConfig) -> dict:
    if config.shard is None:
        raise InputError("teacher needs --shard N (one of the shards ingest listed)")
    shards = config.store.require("ingest")["metrics"]["shards"]
    if config.shard not in shards:
        raise InputError(f"teacher --shard {config.shard}: ingest made shards {shards}")
    return run_unit(config, "teacher", lambda out: build(config, out),
                    extra_key={"shard": config.shard, "layout": OUTPUT_LAYOUT})
