"""Student format: teacher replies and conversations become chats without the card."""

from __future__ import annotations

from jobs.phases.base import PhaseConfig, run_unit, units


def single_turn(prompt: str, reply: str) -> list[dict]:
    """One question and its reply as chat messages: what the split files carry and training reads."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def conversation(row: dict) -> list[dict]:
    """A teacher row as chat messages, user and assistant alternating, no system message: its prompt and reply,
    then each follow-up's question and reply (a single-turn row has none)."""
    messages = single_turn(row["prompt"], row["reply"])
    for followup in row.get("followups", ()):
        messages += single_turn(followup["question"], followup["reply"])
    return messages


def to_student(row: dict) -> dict:
    """A teacher row with its `messages` and `turns` (assistant turns)."""
    return {**row, "messages": conversation(row), "turns": 1 + len(row.get("followups", ()))}


def main(config: PhaseConfig) -> dict:
    def build(out):
        rows = []
        for unit in units(config.store, "teacher"):
            rows += [to_student(reply) for reply in config.store.read_jsonl(unit, "replies.jsonl")]
        rows.sort(key=lambda r: r["id"])
        out.write_jsonl("conversations.jsonl", rows)
        out.metrics.update({"rows": len(rows), "conversations": sum(1 for r in rows if r["turns"] > 1),
                            "assistant_turns": sum(r["turns"] for r in rows)})

    return run_unit(config, "student", build)
