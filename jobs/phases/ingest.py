"""Ingest: validate the card and the prompts, synthesize prompts where there are too few,
profile them, assign shards.

Everything is checked before anything is written: a card that leaves the model no room for a prompt and a
reply (counting what its lorebook's keyed entries may add) is refused, prompts that would not fit are dropped
as too long, and a prompt set too small for the profile is refused saying how many it needs and how to get
them. With `ingest.prompts=synthesize` (the default for a card of one's own) or `ingest.top_up=true` the
teacher engine writes the prompts that are missing (`jobs.synthesis`); they are cached across runs under a key
of everything that made them.
"""

from __future__ import annotations

import json
import statistics

from jobs.card import CharacterCard, ReadCard, card_bytes, read_card
from jobs.config import digest
from jobs.errors import InputError
from jobs.inputs import BYTES_PER_TOKEN, estimate_tokens
from jobs.log import Progress
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.prompts import SYNTHESIZE, load_prompts, prompt_source
from jobs.store import UnitWriter, jsonl_bytes, sha256_bytes
from jobs.synthesis import synthesize

TEMPLATE_TOKENS = 32  # what the chat template adds around the system, user and assistant turns
MIN_PROMPT_TOKENS = 256  # the room a card must leave for a prompt


def prompt_room(config: PhaseConfig, card: CharacterCard) -> int:
    """Tokens left for a prompt once the card (with the most its lorebook's keyed entries can add to a system
    message), the reply and the template have their share of the context."""
    pipeline = config.pipeline
    card_tokens = estimate_tokens(card.teacher_system_prompt())
    keyed = card.lorebook.keyed_room() if card.lorebook is not None else 0
    room = pipeline.model.context_tokens - card_tokens - keyed - pipeline.teacher.max_new_tokens - TEMPLATE_TOKENS
    if room < MIN_PROMPT_TOKENS:
        entries = f" and up to {keyed} more of its lorebook's keyed entries (their token budget)" if keyed else ""
        raise InputError(f"{pipeline.ingest.card}: the card is about {card_tokens} tokens{entries} (estimated at "
                         f"{BYTES_PER_TOKEN:g} bytes a token), too long for model.context_tokens="
                         f"{pipeline.model.context_tokens} with teacher.max_new_tokens="
                         f"{pipeline.teacher.max_new_tokens} and {MIN_PROMPT_TOKENS} tokens for the prompt")
    return room


def needed(config: PhaseConfig) -> int:
    """Prompts the profile needs: its held-out evaluation set and at least as many to train on."""
    return 2 * config.pipeline.split.eval_count


def select(config: PhaseConfig, rows: list[dict], room: int) -> tuple[list[dict], dict[str, int]]:
    """The prompts kept (deduplicated, within the length bounds, up to the limit)."""
    ingest = config.pipeline.ingest
    seen, kept, dropped = set(), [], {"duplicate": 0, "too_short": 0, "too_long": 0}
    for row in rows:
        words = len(row["prompt"].split())
        key = " ".join(row["prompt"].lower().split())
        reason = ("duplicate" if key in seen else "too_short" if words < ingest.min_words
                  else "too_long" if words > ingest.max_words or estimate_tokens(row["prompt"]) > room else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        kept.append(row)
    if ingest.limit:
        kept = kept[:ingest.limit]
    return kept, dropped


def to_synthesize(config: PhaseConfig, source: str, kept: list[dict], read: int, dropped: dict[str, int]) -> int:
    """How many prompts synthesis must write; refuses, in one line, a prompt set too small for the profile."""
    ingest, need = config.pipeline.ingest, needed(config)
    if source == SYNTHESIZE or ingest.top_up:
        if not ingest.limit:
            raise InputError("ingest.limit is 0: synthesis needs it to say how many prompts to write "
                             f"(ingest.prompts={source}, ingest.top_up={str(ingest.top_up).lower()})")
        return max(0, ingest.limit - len(kept))
    if len(kept) < need:
        raise InputError(f"prompts {source}: {len(kept)} usable of {read} read ({dropped['duplicate']} duplicate, "
                         f"{dropped['too_short']} under ingest.min_words={ingest.min_words}, {dropped['too_long']} "
                         f"over ingest.max_words={ingest.max_words} or the context); profile "
                         f"{config.pipeline.profile} needs at least {need} (split.eval_count="
                         f"{config.pipeline.split.eval_count} held out and as many to train): set ingest.top_up=true "
                         f"to synthesize the other {max(need, ingest.limit) - len(kept)}, or ingest.prompts=synthesize")
    return 0


def synthesized(config: PhaseConfig, card: CharacterCard, count: int, kept: list[dict]) -> tuple[list[dict], dict]:
    """`count` new prompts and their figures, from the cache when the same inputs made them before."""
    pipeline, store = config.pipeline, config.store
    backend = open_backend(config)
    existing = [row["prompt"] for row in kept]
    key = digest({"card": card.model_dump(), "model": pipeline.model.model_dump(),
                  "precision": backend.precision(), "count": count, "existing": existing,
                  "settings": pipeline.ingest.synthesis.model_dump(),
                  "words": [pipeline.ingest.min_words, pipeline.ingest.max_words]})
    cached = store.cache_key("prompts", key, "synthesis.json")
    if store.exists(cached):
        found = json.loads(store.get_bytes(cached))
        return found["prompts"], {**found["figures"], "cache_hit": 1}
    with Progress(count, "synthesis") as bar:
        rows, figures = synthesize(card, count, existing, backend.sampler(), pipeline.ingest,
                                   on_round=lambda written: bar.advance(written - bar.done))
    store.put_bytes(cached, json.dumps({"prompts": rows, "figures": figures}).encode())
    return rows, {**figures, "cache_hit": 0}


def build(config: PhaseConfig, read: ReadCard, source: str, rows_read: int, kept: list[dict],
          dropped: dict[str, int], synthesis: tuple[list[dict], dict] | None, out: UnitWriter) -> None:
    ingest = config.pipeline.ingest
    system = read.card.teacher_system_prompt()
    lengths = [len(r["prompt"].split()) for r in kept]
    profile = {"source": source, "rows_read": rows_read, "rows_kept": len(kept), "dropped": dropped,
               "shards": len({row["shard"] for row in kept}), "needed": needed(config), "limit": ingest.limit,
               "words": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
               "card": {"source": ingest.card, "format": read.format, "mapping": read.mapping,
                        "system_prompt_chars": len(system), "system_prompt_tokens": estimate_tokens(system),
                        "tokens_counted_by": f"estimated at {BYTES_PER_TOKEN:g} UTF-8 bytes a token: ingest loads "
                                             "no tokenizer; the report's per-request token counts are exact"}}
    out.write_json("card.json", read.card.model_dump())
    out.write_jsonl("prompts.jsonl", kept)
    if synthesis is not None:
        rows, figures = synthesis
        profile["synthesis"] = {"settings": ingest.synthesis.model_dump(), **figures}
        out.write_jsonl("synthesized.jsonl", rows)
        out.metrics["synthesized"] = figures["written"]
    out.write_json("profile.json", profile)
    out.metrics.update({"prompts": len(kept), "shards": sorted({row["shard"] for row in kept}),
                        **{f"dropped_{k}": v for k, v in dropped.items()}})


def main(config: PhaseConfig) -> dict:
    ingest = config.pipeline.ingest
    raw_card = card_bytes(ingest, config.store_settings)
    # bad input fails here, before anything is written (synthesis, the slow part, comes after every check)
    read = read_card(raw_card, ingest.card)
    source = prompt_source(ingest)
    rows = [] if source == SYNTHESIZE else load_prompts(ingest, config.store_settings)
    kept, dropped = select(config, rows, prompt_room(config, read.card))
    count = to_synthesize(config, source, kept, len(rows), dropped)
    # content hashes in the key: editing the file behind the same name reruns ingest; model and teacher
    # settings decide which prompts fit the context (and the engine that writes them)
    content = {"card": sha256_bytes(raw_card), "prompts": sha256_bytes(jsonl_bytes(rows))}

    def body(out: UnitWriter) -> None:
        synthesis = synthesized(config, read.card, count, kept) if count else None
        if synthesis is not None:
            new, figures = synthesis
            if len(kept) + len(new) < needed(config):
                raise InputError(f"synthesis wrote {len(new)} distinct prompts of {count} asked in {figures['rounds']} "
                                 f"rounds (refused: {figures['refused']}); with the {len(kept)} given, profile "
                                 f"{config.pipeline.profile} needs at least {needed(config)}: raise "
                                 "ingest.synthesis.max_rounds or lower ingest.synthesis.similarity")
            kept.extend({"id": f"s-{number:05d}", "prompt": row["prompt"]} for number, row in enumerate(new))
        for number, row in enumerate(kept):
            row["id"] = row["id"] or f"p-{number:05d}"
            row["shard"] = number % ingest.shards
        build(config, read, source, len(rows), kept, dropped, synthesis, out)

    return run_unit(config, "ingest", body, extra_key=content)
