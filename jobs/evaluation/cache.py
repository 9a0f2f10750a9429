"""Evaluate's cache: the parts that do not depend on the student, computed once and read by every later run on
the same data (`make objectives` trains a student per objective on one split), under
`cache/evaluate/<key>/<part>` beside the teacher's replies cache (`jobs.store`).

A part's key is a digest of the split (its fingerprint and the sha256 of the files evaluate reads), the model
(its config, the device and dtype it runs in, the backend), the card's system prompt (and, for a card with one,
its lorebook: its keyed entries join the teacher's system messages, `jobs.evaluation.teacher_card`; a card without
one keeps the key it had before), the settings the part reads and `LAYOUT`. Entries hold exactly what was
computed: JSON (Python's float repr round-trips) or, for the teacher's top k, float64 arrays, so a run that reads
them gives the figures a run that computed them gave.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

from jobs.backends.base import TopK
from jobs.config import PipelineConfig, digest
from jobs.cpu import cpu_name
from jobs.log import get_logger
from jobs.lorebook import Lorebook
from jobs.store import ArtifactStore

# part of every key: raise it when a part computes something else from the same inputs, so old entries are not read
LAYOUT = 2
KIND = "evaluate"
# the split's files the cached parts read
SPLIT_FILES = ("eval.jsonl", "eval_conversations.jsonl", "train.jsonl")


def common_key(split: dict, pipeline: PipelineConfig, precision: dict, backend: str, system: str,
               card_name: str, lorebook: Lorebook | None = None) -> dict:
    """What every base part's cache key holds: the split (its manifest's fingerprint and the files read), the
    model, where it runs, the card's system prompt, its name (the persona checks ask by name) and its lorebook where
    it has one."""
    book = {"lorebook": lorebook.model_dump(mode="json")} if lorebook is not None else {}
    return {"split": split["fingerprint"], "data": {name: split["outputs"][name]["sha256"] for name in SPLIT_FILES},
            "model": pipeline.model.model_dump(mode="json"), "precision": precision, "backend": backend,
            "system": system, "card_name": card_name, **book}


def machine(device: str) -> str:
    """What a timing depends on besides the model: the processor (or the service) and the threads it runs with."""
    if device == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none seen'}"
    if device != "cpu":
        return device
    return f"cpu: {cpu_name()}; {os.cpu_count()} cores, threads {os.environ.get('DISTILL_THREADS') or 'all'}"


def encode_topk(found: list[TopK]) -> bytes:
    """The teacher's top k as compressed arrays: ids int64, log-probabilities float64 (exact), ragged by lengths."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, starts=np.array([t.start for t in found], dtype=np.int64),
                        positions=np.array([len(t.ids) for t in found], dtype=np.int64),
                        widths=np.array([len(row) for t in found for row in t.ids], dtype=np.int64),
                        ids=np.array([i for t in found for row in t.ids for i in row], dtype=np.int64),
                        logprobs=np.array([v for t in found for row in t.logprobs for v in row], dtype=np.float64))
    return buffer.getvalue()


def decode_topk(data: bytes) -> list[TopK]:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        starts, positions, widths = (arrays[name].tolist() for name in ("starts", "positions", "widths"))
        ids, logprobs = arrays["ids"].tolist(), arrays["logprobs"].tolist()
    found, row, cell = [], 0, 0
    for start, count in zip(starts, positions, strict=True):
        top = TopK(start, [], [])
        for width in widths[row:row + count]:
            top.ids.append(ids[cell:cell + width])
            top.logprobs.append(logprobs[cell:cell + width])
            cell += width
        row += count
        found.append(top)
    return found


def encode(found: dict) -> bytes:
    """A part's results (a few fields of `Measured`) as the cache holds them."""
    if "teacher_topk" in found:
        return encode_topk(found["teacher_topk"])
    return json.dumps(found).encode()


def decode(data: bytes, topk: bool) -> dict:
    if topk:
        return {"teacher_topk": decode_topk(data)}
    found = json.loads(data)
    for name in ("turns", "own_turns"):  # JSON keys are strings: a replay's turns are numbers
        if name in found:
            found[name] = {role: {int(turn): replies for turn, replies in by_turn.items()}
                           for role, by_turn in found[name].items()}
    return found


class PartCache:
    """The entries of one evaluation's parts: `common` is what every key holds (the data, the model, the card)."""

    def __init__(self, store: ArtifactStore, common: dict):
        self.store, self.common = store, {**common, "layout": LAYOUT}

    def key(self, part: str, settings: object) -> str:
        name = part.replace(" ", "-").replace(",", "")
        return self.store.cache_key(KIND, digest({**self.common, "part": part, "settings": settings}), name)

    def has(self, key: str) -> bool:
        return self.store.exists(key)

    def get(self, key: str, topk: bool) -> dict | None:
        """The part's results, or None where the entry is gone, does not match the sha256 recorded when it was
        written (`ArtifactStore.read_cached`, which logs it) or is unreadable: it is then computed again."""
        data = self.store.read_cached(key)
        if data is None:
            return None
        try:
            return decode(data, topk)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:  # damaged: JSON, npz, zip
            get_logger().warning("unreadable evaluate cache entry: computing it again", key=key, error=str(exc))
            return None

    def put(self, key: str, found: dict) -> None:
        self.store.write_cached(key, encode(found))
