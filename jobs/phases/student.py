"""Student format: teacher replies become conversations without the card."""

from __future__ import annotations

from jobs.phases.base import PhaseConfig, run_unit, units


def single_turn(prompt: str, reply: str) -> list[dict]:
    """One question and its reply as chat messages: what the split files carry and training reads."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def main(config: PhaseConfig) -> dict:
    def build(out):
        rows = []
        for unit in units(config.store, "teacher"):
            for reply in config.store.read_jsonl(unit, "replies.jsonl"):
                rows.append({**reply, "messages": single_turn(reply["prompt"], reply["reply"])})
        rows.sort(key=lambda r: r["id"])
        out.write_jsonl("conversations.jsonl", rows)
        out.metrics["rows"] = len(rows)

    return run_unit(config, "student", build)
