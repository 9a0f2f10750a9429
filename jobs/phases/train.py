"""Train: the LoRA student on the conversations without the card, resumable from the last checkpoint.

The objective (`train.objective`, a class in the registry `jobs.objectives`) says what each step's loss pulls
the student toward: the teacher's sampled tokens (sft), the teacher's top-k distribution at each of them
(logit), or the teacher's judgement of the student's own samples (on_policy). Loss is on the assistant tokens
only; validation is the NLL of the teacher's replies for every objective, so runs of different objectives
compare.

Every `checkpoint_every` steps the backend saves its state (adapter,
optimizer, RNG: a folder in the store for the local engine, a `tinker://` path on Tinker) and a row with
that location and the loop's own state (data position, loss history) is appended to
`train/checkpoints.jsonl`: a restarted phase resumes from the last row whose fingerprint matches, and ends
with the same adapter as an uninterrupted run. `train/adapter.json` says where the final adapter is.
"""

from __future__ import annotations

import dataclasses
import random
import time
from functools import lru_cache
from typing import TypedDict

from jobs.backends.base import Datum, TrainingClient
from jobs.card import CharacterCard
from jobs.config import TrainConfig
from jobs.log import Progress, get_logger
from jobs.objectives import OBJECTIVES
from jobs.objectives.base import to_datum
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.store import ArtifactStore, UnitWriter, jsonl_bytes, parse_jsonl
from jobs.trained import ADAPTER

CHECKPOINTS = "checkpoints.jsonl"
# part of the fingerprint: a train unit written before its outputs took this shape is redone, not misread
OUTPUT_LAYOUT = 3


class LoopState(TypedDict):
    """The training loop's own state, saved with every checkpoint row: steps done, rows consumed, and per step
    its figures (`history`) and at validation steps the validation loss (`val`)."""

    step: int
    data_position: int
    history: list[dict[str, float]]
    val: list[dict[str, float]]


@lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_rows(size: int, batch_size: int, position: int, seed: int) -> list[int]:
    """Rows for the batch that starts at data position `position` (a new shuffle every epoch)."""
    return [_epoch_order(size, seed, p // size)[p % size] for p in range(position, position + batch_size)]


def learning_rate(train: TrainConfig, step: int) -> float:
    """Linear decay to 10% of the peak over the run."""
    return train.learning_rate * (1.0 - 0.9 * step / train.steps)


def objective_settings(train: TrainConfig) -> dict[str, float | int]:
    """The settings of `train` that the objective uses besides steps and batch size: recorded with the train
    metrics, so that runs of one objective on the same data can be told apart in the report."""
    return {"learning_rate": train.learning_rate, "max_seq_len": train.max_seq_len,
            **{key: getattr(train, key) for key in OBJECTIVES.get(train.objective).settings}}


def validation_loss(trainer, data: list[Datum]) -> float | None:
    if not data:
        return None
    logprobs = trainer.compute_logprobs([d.tokens for d in data])
    total = weight = 0.0
    for datum, row in zip(data, logprobs, strict=True):
        for lp, w in zip(row, datum.weights[1:], strict=True):
            total -= lp * w
            weight += w
    return total / max(weight, 1.0)


class Checkpoints:
    """`train/checkpoints.jsonl`: one row per saved state (its backend location and the loop's state), for
    this fingerprint. A row is appended only once the backend has saved, so every row can be resumed from."""

    def __init__(self, store: ArtifactStore, fingerprint: str):
        self.store, self.fingerprint = store, fingerprint
        self.index_key = store.key("train", CHECKPOINTS)

    def rows(self) -> list[dict]:
        if not self.store.exists(self.index_key):
            return []
        return parse_jsonl(self.store.get_bytes(self.index_key), self.index_key)

    def latest(self) -> dict | None:
        mine = [row for row in self.rows() if row["fingerprint"] == self.fingerprint]
        return mine[-1] if mine else None

    def save(self, trainer: TrainingClient, state: LoopState) -> None:
        location = trainer.save_state(f"step-{state['step']:06d}")
        row = {"step": state["step"], "fingerprint": self.fingerprint, "location": location, "state": state,
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.put_bytes(self.index_key, jsonl_bytes(self.rows() + [row]))


def build(config: PhaseConfig, out: UnitWriter) -> None:
    train, store, log = config.pipeline.train, config.store, get_logger().bind(phase="train")
    checkpoints = Checkpoints(store, out.fingerprint)
    latest = checkpoints.latest()
    backend = open_backend(config)
    rows = store.read_jsonl("split", "train.jsonl")
    card = CharacterCard.model_validate(store.read_json("ingest", "card.json"))
    kind = OBJECTIVES.get(train.objective)
    objective = kind(rows, train, card.teacher_system_prompt(), card.lorebook)
    if kind.teacher_pass:
        # before the student's model is made, so one model is in memory while training; one long pass before
        # step 1: its own progress (a heartbeat while the teacher scores every row)
        with Progress(len(rows), "train", stage=kind.teacher_pass) as bar:
            objective.prepare(backend.sampler())
            bar.advance(len(rows))
    trainer = backend.trainer(train, resume_from=latest["location"] if latest else None)
    state: LoopState = latest["state"] if latest else {"step": 0, "data_position": 0, "history": [], "val": []}
    if latest:
        log.info("resumed from checkpoint", step=state["step"], location=latest["location"])
    objective.start(trainer, backend.sampler() if kind.teacher_in_loop else None)
    val = [to_datum(trainer.renderer, row, train.max_seq_len) for row in store.read_jsonl("split", "val.jsonl")]
    with Progress(train.steps, "train", initial=state["step"], each=True) as bar:
        while state["step"] < train.steps:
            started = time.time()
            indices = batch_rows(len(rows), train.batch_size, state["data_position"], train.seed)
            batch, loss_fn, figures = objective.batch(indices, state["step"])
            lr = learning_rate(train, state["step"])
            # both requests go out before either is waited on
            pending, stepped = trainer.forward_backward(batch, loss_fn), trainer.optim_step(lr)
            result = pending.result()
            stepped.result()
            state["step"] += 1
            state["data_position"] += train.batch_size
            seconds, sequence_tokens = time.time() - started, sum(len(d.tokens) for d in batch)
            state["history"].append({"step": state["step"], "loss": round(result["loss"], 5), "lr": lr,
                                     "tokens": int(result["tokens"]), "sequence_tokens": sequence_tokens,
                                     "seconds": round(seconds, 3), **{k: round(v, 5) for k, v in figures.items()}})
            if state["step"] % train.val_every == 0 or state["step"] == train.steps:
                loss = validation_loss(trainer, val)
                if loss is not None:
                    state["val"].append({"step": state["step"], "loss": round(loss, 5)})
            # every token of the batch went forward and back: the step's own rate, validation not counted
            bar.advance(1, loss=round(result["loss"], 4), tokens_per_s=round(sequence_tokens / max(seconds, 1e-9)))
            if state["step"] % train.checkpoint_every == 0 or state["step"] == train.steps:
                checkpoints.save(trainer, state)
    adapter = trainer.save_adapter("final")
    out.write_json(ADAPTER, dataclasses.asdict(adapter))
    out.write_jsonl("metrics.jsonl", state["history"])
    out.write_jsonl("val.jsonl", state["val"])
    losses = [h["loss"] for h in state["history"]]
    window = max(1, min(5, len(losses) // 4))
    out.metrics.update({
        **backend.precision(), "backend": backend.name,
        "objective": train.objective, "settings": objective_settings(train), "steps": train.steps,
        "train_rows": len(rows),
        "first_loss": losses[0], "last_loss": losses[-1],
        "first_loss_mean": round(sum(losses[:window]) / window, 5),
        "last_loss_mean": round(sum(losses[-window:]) / window, 5),
        "val_loss_last": state["val"][-1]["loss"] if state["val"] else None,
        # what Tinker bills for training: every token of every sequence, validation forwards included
        "train_tokens": sum(h["sequence_tokens"] for h in state["history"])
                        + sum(len(d.tokens) for d in val) * len(state["val"]),
        "checkpoints": [row["step"] for row in checkpoints.rows() if row["fingerprint"] == out.fingerprint],
        "resumed_from": latest["step"] if latest else 0})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "train", lambda out: build(config, out), extra_key={"layout": OUTPUT_LAYOUT})
