"""Student format (seed step 7): teacher replies become conversations without the card."""

from __future__ import annotations

from jobs.phases.base import PhaseConfig, run_unit
from jobs.phases.ingest import shard_unit


def teacher_units(config: PhaseConfig) -> tuple[str, ...]:
    return tuple(shard_unit(i) for i in config.store.require("ingest")["metrics"]["shards"])


def main(config: PhaseConfig) -> dict:
    units = teacher_units(config)

    def build(out):
        rows = []
        for unit in units:
            for reply in config.store.read_jsonl(unit, "replies.jsonl"):
                rows.append({**reply, "messages": [{"role": "user", "content": reply["prompt"]},
                                                   {"role": "assistant", "content": reply["reply"]}]})
        rows.sort(key=lambda r: r["id"])
        out.write_jsonl("conversations.jsonl", rows)
        out.metrics["rows"] = len(rows)

    return run_unit(config, "student", (), ("ingest", *units), build)
