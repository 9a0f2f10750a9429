"""Audit: drop empty, truncated, duplicate, out-of-character and over-long replies.

A reply cut off by the token limit keeps its complete sentences when it has at least one ("trimmed");
otherwise it is dropped as truncated. Every assistant turn of a conversation is judged by the same rules, in
order: a conversation whose turn k fails is cut before turn k (kept if its first turn passes), a row whose first
turn fails is dropped. The report counts every reason, per turn, and shows examples.
"""

from __future__ import annotations

import re

from jobs.config import AuditConfig
from jobs.phases.base import PhaseConfig, run_unit
from jobs.phases.student import conversation
from jobs.store import UnitWriter

SENTENCE_END = re.compile(r"[.!?…](?=[\"')\]]?(\s|$))")


def trim_to_sentence(text: str) -> str:
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else ""


def judge_reply(reply: str, finished: bool, reply_tokens: int, audit: AuditConfig,
                seen: set[str]) -> tuple[str | None, str]:
    """(reason to drop or None, the reply as kept: a cut-off one trimmed to its whole sentences). A reply that
    passes joins `seen`, so a later copy of it is a duplicate."""
    text = reply.strip()
    if not text:
        return "empty", reply
    if not finished:
        text = trim_to_sentence(text)
        if not text:
            return "truncated", reply
    lowered = text.lower()
    if any(phrase in lowered for phrase in audit.forbidden):
        return "out_of_character", text
    if len(text.split()) < audit.min_reply_words:
        return "too_short", text
    if reply_tokens > audit.max_reply_tokens:
        return "too_long", text
    key = " ".join(lowered.split())
    if key in seen:
        return "duplicate", text
    seen.add(key)
    return None, text


def judge(row: dict, audit: AuditConfig, seen: set[str]) -> tuple[str | None, dict, list[dict]]:
    """(reason to drop the row or None, the row as kept, the turns it loses: `{"turn", "reason", ...}`).

    The kept row's `reply`, `followups`, `messages` and `turns` agree: a conversation cut before turn k keeps
    turns 1 to k-1 (`cut_at: k`, `cut_reason`); a trimmed turn carries `trimmed: true`."""
    reason, reply = judge_reply(row["reply"], row["finished"], row["reply_tokens"], audit, seen)
    if reason:
        return reason, row, []
    if not row["finished"]:
        row = {**row, "reply": reply, "trimmed": True}
    if "followups" in row:
        kept: list[dict] = []
        for turn, followup in enumerate(row["followups"], start=2):
            reason, reply = judge_reply(followup["reply"], followup["finished"], followup["reply_tokens"], audit, seen)
            if reason:
                lost = [{"turn": k, "reason": reason if k == turn else "after_cut", **f}
                        for k, f in enumerate(row["followups"][turn - 2:], start=turn)]
                row = {**row, "cut_at": turn, "cut_reason": reason}
                break
            kept.append(followup if followup["finished"] else {**followup, "reply": reply, "trimmed": True})
        else:
            lost = []
        row = {**row, "followups": kept}
    else:
        lost = []
    return None, {**row, "messages": conversation(row), "turns": 1 + len(row.get("followups", ()))}, lost


def audit_rows(rows: list[dict], audit: AuditConfig) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(kept rows, dropped rows with their `reason`, the turns cut from kept conversations, audit.json)."""
    seen: set[str] = set()
    kept, dropped, cut = [], [], []
    for row in rows:
        reason, row, lost = judge(row, audit, seen)
        (dropped.append({**row, "reason": reason}) if reason else kept.append(row))
        cut += [{"id": row["id"], **turn} for turn in lost]
    reasons: dict[str, int] = {}
    for row in dropped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    # why turns were lost, by turn: turn 1's are the rows dropped, a later turn's the conversations cut there
    by_turn: dict[str, dict[str, int]] = {"1": dict(reasons)} if reasons else {}
    for turn in cut:
        if turn["reason"] != "after_cut":
            counts = by_turn.setdefault(str(turn["turn"]), {})
            counts[turn["reason"]] = counts.get(turn["reason"], 0) + 1
    report = {"rows_in": len(rows), "kept": len(kept), "trimmed": sum(1 for r in kept if r.get("trimmed")),
              "dropped": reasons, "examples": {r["reason"]: r["reply"][:200] for r in dropped},
              "conversations_in": sum(1 for r in rows if r["turns"] > 1),
              "conversations_kept": sum(1 for r in kept if r["turns"] > 1),
              "conversations_cut": sum(1 for r in kept if "cut_at" in r),
              "assistant_turns_in": sum(r["turns"] for r in rows),
              "assistant_turns_kept": sum(r["turns"] for r in kept),
              "trimmed_turns": sum(1 for r in kept for t in [r, *r.get("followups", ())] if t.get("trimmed")),
              "dropped_by_turn": dict(sorted(by_turn.items(), key=lambda item: int(item[0]))),
              "turn_examples": {turn["reason"]: f"turn {turn['turn']}: {turn['reply'][:200]}"
                                for turn in cut if turn["reason"] != "after_cut"}}
    return kept, dropped, cut, report


def main(config: PhaseConfig) -> dict:
    def build(out: UnitWriter) -> None:
        kept, dropped, cut, report = audit_rows(config.store.read_jsonl("student", "conversations.jsonl"),
                                                config.pipeline.audit)
        out.write_jsonl("kept.jsonl", kept)
        out.write_jsonl("dropped.jsonl", dropped)
        out.write_jsonl("cut.jsonl", cut)
        out.write_json("audit.json", report)
        out.metrics.update({"kept": len(kept), "dropped": len(dropped), "trimmed": report["trimmed"],
                            "conversations_kept": report["conversations_kept"],
                            "conversations_cut": report["conversations_cut"],
                            "assistant_turns_kept": report["assistant_turns_kept"]})

    return run_unit(config, "audit", build)
