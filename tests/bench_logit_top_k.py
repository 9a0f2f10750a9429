"""`make bench-top-k RUN=<run-id>`: how many of the teacher's tokens the logit objective needs (`train.top_k`).

On a finished run's data (its train split and held-out eval rows, read from the store), the logit objective is
trained once per k in `--top-k` with the profile's train settings, in this process, and each student's
KL(teacher with card || student) on the held-out teacher replies is printed two ways: as evaluate computes it
(the teacher's top `evaluate.kl_top_k` plus one bucket for the rest, a lower bound) and over the whole vocabulary
(torch, exact), each with the share of the base model's KL closed. The logit target carries no mass beyond its k
tokens, so a small k teaches the student to put none on the teacher's tail; this measures what that costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from jobs import distill
from jobs.backends.local import LocalEngine
from jobs.backends.precision import describe_cpu
from jobs.card import CharacterCard
from jobs.config import load_pipeline_config
from jobs.errors import InputError
from jobs.objectives import Logit
from jobs.phases.train import batch_rows, learning_rate
from jobs.store import ArtifactStore, StoreSettings


def full_vocabulary(engine: LocalEngine, pairs: list[distill.Paired], teacher_side: bool) -> list[torch.Tensor]:
    """Each pair's log-distributions over the vocabulary at its assistant positions (teacher's or student's side)."""
    sequences = [p.teacher_tokens if teacher_side else p.student_tokens for p in pairs]
    positions = [p.teacher_positions if teacher_side else p.student_positions for p in pairs]
    found = {i: rows[[j - positions[i][0] for j in positions[i]]].clone()
             for i, rows in engine.position_logprobs(sequences, [p[0] for p in positions])}
    return [found[i] for i in range(len(pairs))]


def kl_figures(model: LocalEngine, pairs: list[distill.Paired], top: list, teacher: list[torch.Tensor]) -> dict:
    """Mean KL per token: over the teacher's top k + rest (as evaluate) and over the whole vocabulary."""
    bucketed = [v for t, m in zip(top, distill.model_logprobs(model, pairs, top), strict=True)
                for v in distill.kl_per_position(t, m)]
    exact = torch.cat([(t.exp() * (t - m)).sum(-1)
                       for t, m in zip(teacher, full_vocabulary(model, pairs, False), strict=True)])
    return {"top_k": statistics.mean(bucketed), "full": exact.mean().item()}


def run(argv: list[str] | None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", required=True, help="a finished run whose split phase ran with --profile")
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--top-k", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args(argv)
    if not args.run_id:
        raise InputError("no run: give RUN=<run-id> (make bench-top-k) or --run-id, a run whose split phase finished")
    if min(args.top_k) < 1:
        raise InputError("--top-k: every k must be at least 1")
    pipeline = load_pipeline_config(args.profile, overrides=args.set)
    store = ArtifactStore(StoreSettings.from_env(), args.run_id)
    rows, held_out = store.read_jsonl("split", "train.jsonl"), store.read_jsonl("split", "eval.jsonl")
    system = CharacterCard.model_validate(store.read_json("ingest", "card.json")).teacher_system_prompt()
    print(describe_cpu())
    print(f"run {args.run_id}: {len(rows)} train rows, {len(held_out)} held-out; {pipeline.train.steps} steps of "
          f"{pipeline.train.batch_size}, learning rate {pipeline.train.learning_rate}", flush=True)
    base = LocalEngine.for_sampling(pipeline.model)
    pairs = [distill.pair(base.renderer, row["messages"], system) for row in held_out]
    top = distill.teacher_topk(base, pairs, pipeline.evaluate.kl_top_k)
    teacher = full_vocabulary(base, pairs, True)
    base_kl = kl_figures(base, pairs, top, teacher)
    print(f"base: KL {base_kl['top_k']:.4f} (top {pipeline.evaluate.kl_top_k} + rest), {base_kl['full']:.4f} (full)")
    closed = []
    print("| train.top_k | KL top-k + rest | closed | KL full vocabulary | closed | train s |")
    print("|---|---|---|---|---|---|")
    for k in args.top_k:
        train = pipeline.train.model_copy(update={"objective": "logit", "top_k": k})
        logit = Logit(rows, train, system)
        logit.prepare(base)
        data = logit.data
        student = LocalEngine.for_training(pipeline.model, train)
        started = time.time()
        for step in range(train.steps):
            batch = [data[i] for i in batch_rows(len(rows), train.batch_size, step * train.batch_size, train.seed)]
            student.forward_backward(batch)
            student.optim_step(learning_rate(train, step))
        seconds = time.time() - started
        kl = kl_figures(student, pairs, top, teacher)  # position_logprobs computes no gradients
        print(f"| {k} | {kl['top_k']:.4f} | {1 - kl['top_k'] / base_kl['top_k']:.1%} | {kl['full']:.4f} "
              f"| {1 - kl['full'] / base_kl['full']:.1%} | {seconds:.0f} |", flush=True)
        closed.append(f"k {k} closes {1 - kl['full'] / base_kl['full']:.1%}")
        del student, data
    return "bench-top-k: " + ", ".join(closed) + " of the base's KL over the whole vocabulary"


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
