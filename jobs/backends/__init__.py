"""Model backends. Phases use only the interface in `base`, through the backend `open_backend` picks from
`model.backend`: `local` (the engine in this process) or `tinker` (the Tinker API).

Heavy imports (torch, transformers, peft, tinker) happen inside the backends, never at import time here.
"""

from __future__ import annotations

from pathlib import Path

from jobs.backends.base import Backend
from jobs.config import PipelineConfig
from jobs.store import ArtifactStore


def open_backend(pipeline: PipelineConfig, store: ArtifactStore, scratch: Path) -> Backend:
    """The configured backend; the local one keeps its saved states in `store` (the train unit's folders)."""
    if pipeline.model.backend == "tinker":
        from jobs.backends.tinker_backend import TinkerBackend

        return TinkerBackend(pipeline.model, pipeline.tinker)
    from jobs.backends.local_backend import LocalBackend, StoredFolders

    return LocalBackend(pipeline.model, StoredFolders(store, "train", scratch))


def check_credentials(pipeline: PipelineConfig) -> None:
    """Fails in one line when the configured backend lacks its credentials (before any work)."""
    if pipeline.model.backend == "tinker":
        from jobs.backends.tinker_backend import check_api_key

        check_api_key()
