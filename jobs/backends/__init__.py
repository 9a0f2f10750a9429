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


def resolved_precision(model: ModelConfig) -> dict[str, str]:
    """The device and dtype the engine runs `model` with on this machine (`auto` resolved), for manifests and
    cache keys: replies sampled in another dtype are other replies."""
    from jobs.backends.local import resolve_precision

    precision = resolve_precision(model)
    return {"device": precision.device, "dtype": precision.dtype}


def open_trainer(model: ModelConfig, train: TrainConfig) -> TrainingClient:
    from jobs.backends.local import LocalEngine

    return LocalEngine.for_training(model, train)
