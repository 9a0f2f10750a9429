"""Train (seed steps 11-13): LoRA SFT on the student conversations, resumable from the last checkpoint.

Loss is on the assistant tokens only. Checkpoints (adapter, optimizer, RNG, data position, loss history)
go to `train/checkpoints/step-NNNNNN/` every `checkpoint_every` steps, and a row is appended to
`train/checkpoints.jsonl` after the files: a restarted phase resumes from the last row whose fingerprint
matches, and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import time
from functools import lru_cache
from pathlib import Path

from jobs.backends.base import Datum
from jobs.backends.renderer import Renderer
from jobs.config import TrainConfig
from jobs.log import Progress, get_logger
from jobs.phases.base import PhaseConfig, run_unit, scratch_dir
from jobs.store import ArtifactStore, UnitWriter, jsonl_bytes, parse_jsonl, sha256_file

CHECKPOINTS = "checkpoints.jsonl"


def to_datum(renderer: Renderer, row: dict, max_len: int) -> Datum:
    prompt, reply = renderer.prompt(row["prompt"]), renderer.reply(row["reply"])
    tokens = (prompt + reply)[:max_len]
    weights = ([0.0] * len(prompt) + [1.0] * len(reply))[:max_len]
    return Datum(tokens, weights)


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
    """The train unit's checkpoints in the store, filtered to one fingerprint."""

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

    def save(self, trainer, step: int, state: dict, folder: Path) -> None:
        trainer.save_state(folder)
        (folder / "state.json").write_text(json.dumps(state))
        prefix = f"checkpoints/step-{step:06d}"
        files = {}
        for path in sorted(folder.iterdir()):
            self.store.put_file(self.store.key("train", f"{prefix}/{path.name}"), path)
            files[path.name] = sha256_file(path)
        # the index row goes last: a checkpoint without its row is never resumed from
        row = {"step": step, "fingerprint": self.fingerprint, "prefix": prefix, "files": files,
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.put_bytes(self.index_key, jsonl_bytes(self.rows() + [row]))

    def restore(self, row: dict, folder: Path) -> dict:
        for name, digest in row["files"].items():
            path = folder / name
            self.store.get_file(self.store.key("train", f"{row['prefix']}/{name}"), path)
            if sha256_file(path) != digest:
                raise RuntimeError(f"checkpoint {row['prefix']}/{name} does not match its index row")
        return json.loads((folder / "state.json").read_text())


def build(config: PhaseConfig, out: UnitWriter) -> None:
    from jobs.backends import open_trainer, resolved_precision

    train, store, log = config.pipeline.train, config.store, get_logger().bind(phase="train")
    trainer = open_trainer(config.pipeline.model, train)
    rows = store.read_jsonl("split", "train.jsonl")
    data = [to_datum(trainer.renderer, row, train.max_seq_len) for row in rows]
    val = [to_datum(trainer.renderer, row, train.max_seq_len) for row in store.read_jsonl("split", "val.jsonl")]
    checkpoints = Checkpoints(store, out.fingerprint)
    work = scratch_dir(config, "train")
    state = {"step": 0, "data_position": 0, "history": [], "val": []}
    latest = checkpoints.latest()
    if latest:
        state = checkpoints.restore(latest, work / f"resume-{latest['step']:06d}")
        trainer.load_state(work / f"resume-{latest['step']:06d}")
        log.info("resumed from checkpoint", step=state["step"], prefix=latest["prefix"])
    with Progress(train.steps, "train") as bar:
        bar.advance(state["step"])
        while state["step"] < train.steps:
            started = time.time()
            batch = [data[i] for i in batch_rows(len(data), train.batch_size, state["data_position"], train.seed)]
            result = trainer.forward_backward(batch)
            lr = learning_rate(train, state["step"])
            trainer.optim_step(lr)
            state["step"] += 1
            state["data_position"] += train.batch_size
            state["history"].append({"step": state["step"], "loss": round(result["loss"], 5), "lr": lr,
                                     "tokens": int(result["tokens"]), "seconds": round(time.time() - started, 3)})
            if state["step"] % train.val_every == 0 or state["step"] == train.steps:
                loss = validation_loss(trainer, val)
                if loss is not None:
                    state["val"].append({"step": state["step"], "loss": round(loss, 5)})
            bar.advance(1, loss=f"{result['loss']:.3f}")
            if state["step"] % train.checkpoint_every == 0 or state["step"] == train.steps:
                checkpoints.save(trainer, state["step"], state, work / f"step-{state['step']:06d}")
    final = work / "final"
    trainer.save_state(final)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        out.upload_file(f"adapter/{name}", final / name)
    out.write_jsonl("metrics.jsonl", state["history"])
    out.write_jsonl("val.jsonl", state["val"])
    losses = [h["loss"] for h in state["history"]]
    window = max(1, min(5, len(losses) // 4))
    out.metrics.update({
        **resolved_precision(config.pipeline.model),
        "steps": train.steps, "train_rows": len(data), "first_loss": losses[0], "last_loss": losses[-1],
        "first_loss_mean": round(sum(losses[:window]) / window, 5),
        "last_loss_mean": round(sum(losses[-window:]) / window, 5),
        "val_loss_last": state["val"][-1]["loss"] if state["val"] else None,
        "checkpoints": [row["step"] for row in checkpoints.rows() if row["fingerprint"] == out.fingerprint],
        "resumed_from": latest["step"] if latest else 0})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "train", ("model", "train"), ("split",), lambda out: build(config, out))
