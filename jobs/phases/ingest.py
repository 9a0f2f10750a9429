"""Ingest (seed steps 3-4): validate the card and the prompts, profile them, assign shards.

Everything is checked before anything is written: a card that leaves the model no room for a prompt and a
reply is refused, prompts that would not fit are dropped as too long, and a prompt set that shrinks below
what the rest of the pipeline needs is refused saying how many remain.
"""

from __future__ import annotations

import statistics

from jobs.card import CharacterCard, card_bytes, parse_card
from jobs.errors import InputError
from jobs.inputs import BYTES_PER_TOKEN, estimate_tokens
from jobs.phases.base import PhaseConfig, run_unit
from jobs.prompts import load_prompts
from jobs.store import UnitWriter, jsonl_bytes, sha256_bytes

TEMPLATE_TOKENS = 32  # what the chat template adds around the system, user and assistant turns
MIN_PROMPT_TOKENS = 256  # the room a card must leave for a prompt


def shard_unit(index: int) -> str:
    return f"teacher/shard-{index:05d}"


def prompt_room(config: PhaseConfig, card: CharacterCard) -> int:
    """Tokens left for a prompt once the card, the reply and the template have their share of the context."""
    pipeline = config.pipeline
    card_tokens = estimate_tokens(card.teacher_system_prompt())
    room = pipeline.model.context_tokens - card_tokens - pipeline.teacher.max_new_tokens - TEMPLATE_TOKENS
    if room < MIN_PROMPT_TOKENS:
        raise InputError(f"{pipeline.ingest.card}: the card is about {card_tokens} tokens (estimated at "
                         f"{BYTES_PER_TOKEN:g} bytes a token), too long for model.context_tokens="
                         f"{pipeline.model.context_tokens} with teacher.max_new_tokens="
                         f"{pipeline.teacher.max_new_tokens} and {MIN_PROMPT_TOKENS} tokens for the prompt")
    return room


def select(config: PhaseConfig, rows: list[dict], room: int) -> tuple[list[dict], dict[str, int]]:
    """The prompts kept (deduplicated, within the length bounds, up to the limit), with ids and shards."""
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
    need = config.pipeline.split.min_rows
    if len(kept) < need:
        raise InputError(f"prompts {ingest.prompts}: {len(kept)} usable of {len(rows)} read ({dropped['duplicate']} "
                         f"duplicate, {dropped['too_short']} under ingest.min_words={ingest.min_words}, "
                         f"{dropped['too_long']} over ingest.max_words={ingest.max_words} or the context); profile "
                         f"{config.pipeline.profile} needs at least {need} (split.eval_count + 2)")
    for number, row in enumerate(kept):
        row["id"] = row["id"] or f"p-{number:05d}"
        row["shard"] = number % ingest.shards
    return kept, dropped


def build(config: PhaseConfig, card: CharacterCard, read: int, kept: list[dict], dropped: dict[str, int],
          out: UnitWriter) -> None:
    shards = sorted({row["shard"] for row in kept})
    lengths = [len(r["prompt"].split()) for r in kept]
    profile = {"source": config.pipeline.ingest.prompts, "rows_read": read, "rows_kept": len(kept),
               "dropped": dropped, "shards": len(shards),
               "words": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}}
    out.write_json("card.json", card.model_dump())
    out.write_jsonl("prompts.jsonl", kept)
    out.write_json("profile.json", profile)
    out.metrics.update({"prompts": len(kept), "shards": shards, **{f"dropped_{k}": v for k, v in dropped.items()}})


def main(config: PhaseConfig) -> dict:
    ingest = config.pipeline.ingest
    raw_card = card_bytes(ingest, config.store_settings)
    # bad input fails here, before anything is written
    card = parse_card(raw_card, ingest.card)
    rows = load_prompts(ingest, config.store_settings)
    kept, dropped = select(config, rows, prompt_room(config, card))
    # content hashes in the key: editing the file behind the same name reruns ingest; model and teacher
    # settings decide which prompts fit the context
    content = {"card": sha256_bytes(raw_card), "prompts": sha256_bytes(jsonl_bytes(rows))}
    return run_unit(config, "ingest", ("ingest", "model", "teacher"), (),
                    lambda out: build(config, card, len(rows), kept, dropped, out), extra_key=content)
