"""Teacher: the base model with the card as system prompt answers one shard of prompts.

Replies are cached across runs under a key of the card, the model and the sampling settings and the shard's
prompts: a new run that changes only training settings reuses them; a changed card regenerates.
"""

from __future__ import annotations

from jobs.backends.base import Backend, SamplingParams
from jobs.card import CharacterCard
from jobs.config import digest
from jobs.errors import InputError
from jobs.log import Progress
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.store import UnitWriter, jsonl_bytes, parse_jsonl


def generate(config: PhaseConfig, backend: Backend, system: str, prompts: list[dict]) -> list[dict]:
    teacher = backend.sampler()
    render = teacher.renderer
    with_card = [render.prompt(p["prompt"], system=system) for p in prompts]
    params = SamplingParams.from_config(config.pipeline.teacher)
    with Progress(len(prompts), f"teacher shard {config.shard}") as bar:
        replies = teacher.sample(with_card, params, on_batch=bar.advance)
    return [{"id": p["id"], "prompt": p["prompt"], "reply": render.decode(tokens),
             "reply_tokens": len(tokens), "finished": len(tokens) < params.max_tokens,
             "prompt_tokens_with_card": len(full), "prompt_tokens_without_card": len(render.prompt(p["prompt"]))}
            for p, tokens, full in zip(prompts, replies, with_card, strict=True)]


def build(config: PhaseConfig, out: UnitWriter) -> None:
    store = config.store
    card = store.read_json("ingest", "card.json")
    prompts = [row for row in store.read_jsonl("ingest", "prompts.jsonl") if row["shard"] == config.shard]
    system = CharacterCard.model_validate(card).teacher_system_prompt()
    backend = open_backend(config)
    precision = backend.precision()
    cache_key = digest({"system": system, "model": config.pipeline.model.model_dump(), "precision": precision,
                        "sampling": config.pipeline.teacher.model_dump(), "prompts": prompts})
    cached = store.cache_key("teacher", cache_key, "replies.jsonl")
    if store.exists(cached):
        rows = parse_jsonl(store.get_bytes(cached), cached)
        out.metrics["cache_hit"] = 1
    else:
        rows = generate(config, backend, system, prompts)
        store.put_bytes(cached, jsonl_bytes(rows))
        out.metrics["cache_hit"] = 0
    out.write_jsonl("replies.jsonl", rows)
    reply_tokens = sum(r["reply_tokens"] for r in rows)
    prompt_tokens = sum(r["prompt_tokens_with_card"] for r in rows)
    fresh = 1 - out.metrics["cache_hit"]  # cached replies cost nothing this time
    out.metrics.update({**precision, "backend": backend.name, "rows": len(rows), "reply_tokens": reply_tokens,
                        "prompt_tokens_with_card": prompt_tokens,
                        "prefill_tokens": fresh * prompt_tokens, "sample_tokens": fresh * reply_tokens})


def main(config: PhaseConfig) -> dict:
    if config.shard is None:
        raise InputError("teacher needs --shard N (one of the shards ingest listed)")
    shards = config.store.require("ingest")["metrics"]["shards"]
    if config.shard not in shards:
        raise InputError(f"teacher --shard {config.shard}: ingest made shards {shards}")
    return run_unit(config, "teacher", lambda out: build(config, out), extra_key=config.shard)
