"""Model backends. Pipeline phases use only the interface in `base`; `open_sampler`/`open_trainer` pick one.

Heavy imports (torch, transformers, peft) happen inside the engine, never at import time here.
"""

from __future__ import annotations

from pathlib import Path

from jobs.backends.base import SamplingClient, TrainingClient
from jobs.config import ModelConfig, TrainConfig


def open_sampler(model: ModelConfig, adapter_dir: Path | None = None) -> SamplingClient:
    """The base model, or the base plus a LoRA adapter saved by `TrainingClient.save_state`."""
    from jobs.backends.local import LocalEngine

    return LocalEngine.for_sampling(model, adapter_dir)


def open_trainer(model: ModelConfig, train: TrainConfig) -> TrainingClient:
    from jobs.backends.local import LocalEngine

    return LocalEngine.for_training(model, train)
