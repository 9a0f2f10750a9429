"""Split: train / val / eval, with eval prompts never seen in training.

Every file holds the audit's conversation records (`jobs.records`), whole. eval.jsonl stays single-turn: the
single-turn records, and only where there are too few of them conversations cut to their first turn.
`split.eval_conversations` whole conversations (those with at least 3 assistant turns, or as many as
`conversations.turns` allows; the longest first) are held out in eval_conversations.jsonl; every other conversation
is training data beside the single-turn records.
"""

from __future__ import annotations

import random

from jobs import records
from jobs.config import SplitConfig
from jobs.errors import InputError
from jobs.phases.base import PhaseConfig, run_unit

# the turns a held-out conversation should have: enough to see a character drift after its first reply
EVAL_CONVERSATION_TURNS = 3


def hold_out_conversations(rows: list[dict], count: int, min_turns: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(`count` conversations of at least `min_turns` assistant turns, the longest first and otherwise in a seeded
    random order; the other rows, in their order)."""
    if not count:
        return [], rows
    candidates = [r for r in rows if r["turns"] >= min_turns]
    if len(candidates) < count:
        raise InputError(f"split: only {len(candidates)} conversations of at least {min_turns} turns survived the "
                         f"audit, split.eval_conversations={count} holds out {count}: raise conversations.share or "
                         "lower split.eval_conversations")
    random.Random(seed).shuffle(candidates)
    candidates.sort(key=lambda r: -r["turns"])
    held = {id(r) for r in candidates[:count]}
    return candidates[:count], [r for r in rows if id(r) not in held]


def pick_eval(rows: list[dict], count: int) -> tuple[list[dict], list[dict]]:
    """(`count` single-turn eval rows, the rest) from shuffled rows: single-turn rows in their order, then
    conversations cut to their first turn where those are too few."""
    singles = [i for i, r in enumerate(rows) if r["turns"] == 1]
    talks = [i for i, r in enumerate(rows) if r["turns"] > 1]
    chosen = (singles + talks)[:count]
    taken = set(chosen)
    evaluation = [rows[i] if rows[i]["turns"] == 1 else records.first_turn(rows[i]) for i in sorted(chosen)]
    return evaluation, [r for i, r in enumerate(rows) if i not in taken]


def counts(rows: list[dict]) -> dict[str, int]:
    return {"rows": len(rows), "conversations": sum(1 for r in rows if r["turns"] > 1),
            "assistant_turns": sum(r["turns"] for r in rows)}


def split_rows(rows: list[dict], split: SplitConfig, conversation_turns: int) -> dict[str, list[dict]]:
    """The audit's kept rows as the split's files: train, val, eval (single-turn) and eval_conversations."""
    if len(rows) < split.min_rows:
        raise InputError(f"split: only {len(rows)} rows survived the audit, need at least {split.min_rows} "
                         f"(split.eval_count={split.eval_count} + split.eval_conversations="
                         f"{split.eval_conversations} + 2)")
    min_turns = min(EVAL_CONVERSATION_TURNS, conversation_turns)
    conversations, rows = hold_out_conversations(rows, split.eval_conversations, min_turns, split.seed)
    rows = list(rows)
    random.Random(split.seed).shuffle(rows)
    evaluation, rest = pick_eval(rows, split.eval_count)
    val_count = round(len(rest) * split.val_fraction)
    val, train = rest[:val_count], rest[val_count:]
    # ingest dropped duplicate prompts, so disjoint rows mean disjoint prompts; check anyway
    held_out = {r["prompt"].lower() for r in evaluation + conversations}
    if any(r["prompt"].lower() in held_out for r in train + val):
        raise InputError("split: an eval prompt also appears in train or val")
    return {"train.jsonl": train, "val.jsonl": val, "eval.jsonl": evaluation, "eval_conversations.jsonl": conversations}


def main(config: PhaseConfig) -> dict:
    def build(out):
        files = split_rows(config.store.read_jsonl("audit", "kept.jsonl"), config.pipeline.split,
                           config.pipeline.conversations.turns)
        for name, rows in files.items():
            out.write_jsonl(name, rows)
        figures = {name: counts(rows) for name, rows in files.items()}
        out.write_json("split.json", figures)
        # rows per file (eval_conversations: the conversations held out), and the conversations among the training rows
        out.metrics.update({name.removesuffix(".jsonl"): figure["rows"] for name, figure in figures.items()})
        out.metrics.update({"train_conversations": figures["train.jsonl"]["conversations"],
                            "val_conversations": figures["val.jsonl"]["conversations"]})

    return run_unit(config, "split", build)
