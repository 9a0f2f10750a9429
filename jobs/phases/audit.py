"""Audit: drop empty, truncated, duplicate, out-of-character and over-long replies.

Reads every teacher shard's conversation records (`jobs.records`) and writes the ones it keeps in the same shape.
A reply cut off by the token limit keeps its complete sentences when it has at least one ("trimmed"); otherwise it
is dropped as truncated. Every assistant turn of a conversation is judged by the same rules, in order: a
conversation whose turn k fails is cut before turn k (kept if its first turn passes), a record whose first turn
fails is dropped. The report counts every reason, per turn, and shows examples.
"""

from __future__ import annotations

from jobs import records
from jobs.config import AuditConfig
from jobs.phases.base import PhaseConfig, run_unit, units
from jobs.store import ArtifactStore, UnitWriter, parse_jsonl


def judge_reply(reply: str, finished: bool, reply_tokens: int, audit: AuditConfig,
                seen: set[str]) -> tuple[str | None, str]:
    """(reason to drop or None, the reply as kept: a cut-off one trimmed to its whole sentences). A reply that
    passes joins `seen`, so a later copy of it is a duplicate."""
    text = reply.strip()
    if not text:
        return "empty", reply
    if not finished:
        text = records.trim_to_sentence(text)
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


def judge(record: dict, audit: AuditConfig, seen: set[str]) -> tuple[str | None, dict, list[dict]]:
    """(reason to drop the record or None, the record as kept, the turns it loses: `jobs.records.turn` rows with
    their `reason`).

    A conversation cut before turn k keeps turns 1 to k-1 (`cut_at: k`, `cut_reason`); `trimmed` lists the turns cut
    to whole sentences."""
    kept, trimmed, reason = record, [], None
    for number in range(1, record["turns"] + 1):
        at = records.turn(record, number)
        reason, reply = judge_reply(at["reply"], at["finished"], at["reply_tokens"], audit, seen)
        if reason:
            break
        if not at["finished"]:
            kept = records.with_reply(kept, number, reply)
            trimmed.append(number)
    else:
        number = record["turns"] + 1
    if number == 1:
        return reason, record, []
    kept = records.cut({**kept, "trimmed": trimmed}, number - 1)
    lost = [{"reason": reason if k == number else "after_cut", **records.turn(record, k)}
            for k in range(number, record["turns"] + 1)]
    if lost:
        kept = {**kept, "cut_at": number, "cut_reason": reason}
    return None, kept, lost


def audit_records(rows: list[dict], audit: AuditConfig) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(kept records, dropped records with their `reason`, the turns cut from kept conversations, audit.json)."""
    seen: set[str] = set()
    kept, dropped, cut = [], [], []
    for row in rows:
        reason, row, lost = judge(row, audit, seen)
        (dropped.append({**row, "reason": reason}) if reason else kept.append(row))
        cut += [{"id": row["id"], **turn} for turn in lost]
    reasons: dict[str, int] = {}
    for row in dropped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    # why turns were lost, by turn: turn 1's are the records dropped, a later turn's the conversations cut there
    by_turn: dict[str, dict[str, int]] = {"1": dict(reasons)} if reasons else {}
    for turn in cut:
        if turn["reason"] != "after_cut":
            counts = by_turn.setdefault(str(turn["turn"]), {})
            counts[turn["reason"]] = counts.get(turn["reason"], 0) + 1
    report = {"rows_in": len(rows), "kept": len(kept), "trimmed": sum(1 for r in kept if 1 in r.get("trimmed", ())),
              "dropped": reasons, "examples": {r["reason"]: records.first_reply(r)[:200] for r in dropped},
              "conversations_in": sum(1 for r in rows if r["turns"] > 1),
              "conversations_kept": sum(1 for r in kept if r["turns"] > 1),
              "conversations_cut": sum(1 for r in kept if "cut_at" in r),
              "assistant_turns_in": sum(r["turns"] for r in rows),
              "assistant_turns_kept": sum(r["turns"] for r in kept),
              "trimmed_turns": sum(len(r.get("trimmed", ())) for r in kept),
              "dropped_by_turn": dict(sorted(by_turn.items(), key=lambda item: int(item[0]))),
              "turn_examples": {turn["reason"]: f"turn {turn['turn']}: {turn['reply'][:200]}"
                                for turn in cut if turn["reason"] != "after_cut"}}
    return kept, dropped, cut, report


def teacher_records(store: ArtifactStore) -> list[dict]:
    """Every teacher shard's records, by id (so the shards' count and order do not matter)."""
    rows = []
    for unit in units(store, "teacher"):
        key = store.key(unit, records.TEACHER_FILE)
        rows += parse_jsonl(store.read(unit, records.TEACHER_FILE), key, check=records.checked)
    return sorted(rows, key=lambda r: r["id"])


def main(config: PhaseConfig) -> dict:
    def build(out: UnitWriter) -> None:
        kept, dropped, cut, report = audit_records(teacher_records(config.store), config.pipeline.audit)
        out.write_jsonl("kept.jsonl", kept)
        out.write_jsonl("dropped.jsonl", dropped)
        out.write_jsonl("cut.jsonl", cut)
        out.write_json("audit.json", report)
        out.metrics.update({"kept": len(kept), "dropped": len(dropped), "trimmed": report["trimmed"],
                            "conversations_kept": report["conversations_kept"],
                            "conversations_cut": report["conversations_cut"],
                            "assistant_turns_kept": report["assistant_turns_kept"]})

    return run_unit(config, "audit", build)
