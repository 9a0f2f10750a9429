"""Split: train / val / eval, with eval prompts never seen in training."""

from __future__ import annotations

import random

from jobs.errors import InputError
from jobs.phases.base import PhaseConfig, run_unit


def main(config: PhaseConfig) -> dict:
    split = config.pipeline.split

    def build(out):
        rows = config.store.read_jsonl("audit", "kept.jsonl")
        if len(rows) < split.min_rows:
            raise InputError(f"split: only {len(rows)} rows survived the audit, need at least {split.min_rows} "
                             f"(split.eval_count={split.eval_count} + 2)")
        random.Random(split.seed).shuffle(rows)
        evaluation, rest = rows[:split.eval_count], rows[split.eval_count:]
        val_count = round(len(rest) * split.val_fraction)
        val, train = rest[:val_count], rest[val_count:]
        # ingest dropped duplicate prompts, so disjoint rows mean disjoint prompts; check anyway
        held_out = {r["prompt"].lower() for r in evaluation}
        if any(r["prompt"].lower() in held_out for r in train + val):
            raise InputError("split: an eval prompt also appears in train or val")
        out.write_jsonl("train.jsonl", train)
        out.write_jsonl("val.jsonl", val)
        out.write_jsonl("eval.jsonl", evaluation)
        out.metrics.update({"train": len(train), "val": len(val), "eval": len(evaluation)})

    return run_unit(config, "split", build)
