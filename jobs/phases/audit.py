"""Audit: drop empty, truncated, duplicate, out-of-character and over-long replies.

A reply cut off by the token limit keeps its complete sentences when it has at least one ("trimmed");
otherwise it is dropped as truncated. The report counts every reason and shows examples.
"""

from __future__ import annotations

import re

from jobs.config import AuditConfig
from jobs.phases.base import PhaseConfig, run_unit
from jobs.phases.student import single_turn
from jobs.store import UnitWriter

SENTENCE_END = re.compile(r"[.!?…](?=[\"')\]]?(\s|$))")


def trim_to_sentence(text: str) -> str:
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else ""


def judge(row: dict, audit: AuditConfig, seen: set[str]) -> tuple[str | None, dict]:
    """(reason to drop or None, the row as kept)."""
    reply = row["reply"].strip()
    if not reply:
        return "empty", row
    if not row["finished"]:
        reply = trim_to_sentence(reply)
        if not reply:
            return "truncated", row
        row = {**row, "reply": reply, "trimmed": True,
               "messages": single_turn(row["prompt"], reply)}
    lowered = reply.lower()
    if any(phrase in lowered for phrase in audit.forbidden):
        return "out_of_character", row
    if len(reply.split()) < audit.min_reply_words:
        return "too_short", row
    if row["reply_tokens"] > audit.max_reply_tokens:
        return "too_long", row
    key = " ".join(lowered.split())
    if key in seen:
        return "duplicate", row
    seen.add(key)
    return None, row


def main(config: PhaseConfig) -> dict:
    def build(out: UnitWriter) -> None:
        rows = config.store.read_jsonl("student", "conversations.jsonl")
        seen: set[str] = set()
        kept, dropped = [], []
        for row in rows:
            reason, row = judge(row, config.pipeline.audit, seen)
            (dropped.append({**row, "reason": reason}) if reason else kept.append(row))
        reasons: dict[str, int] = {}
        for row in dropped:
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
        report = {"rows_in": len(rows), "kept": len(kept), "trimmed": sum(1 for r in kept if r.get("trimmed")),
                  "dropped": reasons, "examples": {r["reason"]: r["reply"][:200] for r in dropped}}
        out.write_jsonl("kept.jsonl", kept)
        out.write_jsonl("dropped.jsonl", dropped)
        out.write_json("audit.json", report)
        out.metrics.update({"kept": len(kept), "dropped": len(dropped), "trimmed": report["trimmed"]})

    return run_unit(config, "audit", build)
