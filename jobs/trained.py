"""What the train phase leaves for the phases after it: where its adapter is (`train/adapter.json`), and its loss
as the first row of the report's figure table and of the model card's."""

from __future__ import annotations

from jobs.backends.base import Adapter
from jobs.metrics import ARROWS, NATS, Row
from jobs.store import ArtifactStore

ADAPTER = "adapter.json"  # the trained adapter's locations (`backends.base.Adapter`)


def read_adapter(store: ArtifactStore) -> Adapter:
    """Where the train phase left the adapter."""
    return Adapter(**store.read_json("train", ADAPTER))


def train_loss(train: dict) -> Row:
    """The train phase's first and last step's loss (`train`: its metrics)."""
    return Row("train loss, first → last step", f"{NATS.format(train['first_loss'])} → "
               f"{NATS.format(train['last_loss'])} ({train['steps']} steps)", NATS.name, ARROWS["lower"])
