"""Ingest (seed steps 3-4): validate the card and the prompts, profile them, assign shards."""

from __future__ import annotations

import statistics

from jobs.card import CharacterCard, card_bytes, parse_card
from jobs.phases.base import PhaseConfig, run_unit
from jobs.prompts import load_prompts
from jobs.store import UnitWriter, jsonl_bytes, sha256_bytes


def shard_unit(index: int) -> str:
    return f"teacher/shard-{index:05d}"


def build(config: PhaseConfig, card: CharacterCard, rows: list[dict], out: UnitWriter) -> None:
    ingest = config.pipeline.ingest
    seen, kept, dropped = set(), [], {"duplicate": 0, "too_short": 0, "too_long": 0}
    for row in rows:
        words = len(row["prompt"].split())
        key = " ".join(row["prompt"].lower().split())
        reason = ("duplicate" if key in seen else "too_short" if words < ingest.min_words
                  else "too_long" if words > ingest.max_words else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        kept.append(row)
    if ingest.limit:
        kept = kept[:ingest.limit]
    for number, row in enumerate(kept):
        row["id"] = row["id"] or f"p-{number:05d}"
        row["shard"] = number % ingest.shards
    shards = sorted({row["shard"] for row in kept})
    lengths = [len(r["prompt"].split()) for r in kept]
    profile = {"source": ingest.prompts, "rows_read": len(rows), "rows_kept": len(kept), "dropped": dropped,
               "words": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
               "shards": len(shards)}
    out.write_json("card.json", card.model_dump())
    out.write_jsonl("prompts.jsonl", kept)
    out.write_json("profile.json", profile)
    out.metrics.update({"prompts": len(kept), "shards": shards, **{f"dropped_{k}": v for k, v in dropped.items()}})


def main(config: PhaseConfig) -> dict:
    ingest = config.pipeline.ingest
    raw_card = card_bytes(ingest.card, config.store_settings)
    card = parse_card(raw_card, ingest.card)  # bad input fails here, before anything is written
    rows = load_prompts(ingest.prompts, config.store_settings)
    # content hashes in the key: editing the file behind the same name reruns ingest
    content = {"card": sha256_bytes(raw_card),
               "prompts": sha256_bytes(jsonl_bytes(rows))}
    return run_unit(config, "ingest", ("ingest",), (), lambda out: build(config, card, rows, out), extra_key=content)
