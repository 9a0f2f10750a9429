"""Model backends, one class each (`base.Backend`), in one registry: `model.backend` names one, `local` (the
engine in this process) or `tinker` (the Tinker API). Phases use only the interface in `base`, through the
backend `open_backend` opens; a backend's class owns its checks of the config, of its credentials and
preflight's. A new backend is a module beside these and one line below.

Heavy imports (torch, transformers, peft, tinker) happen inside the backends, never at import time here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.backends.base import Backend
from jobs.backends.local_backend import LocalBackend
from jobs.backends.tinker_backend import TinkerBackend
from jobs.registry import Registry
from jobs.store import ArtifactStore

if TYPE_CHECKING:  # jobs.config validates with this registry, so imports it for types only
    from jobs.config import PipelineConfig

BACKENDS: Registry[Backend] = Registry("backend", [LocalBackend, TinkerBackend])


def open_backend(pipeline: PipelineConfig, store: ArtifactStore, scratch: Path) -> Backend:
    """The configured backend; a local one keeps its saved states in `store` (the train unit's folders)."""
    return BACKENDS.get(pipeline.model.backend).open(pipeline, store, scratch)


def check_credentials(pipeline: PipelineConfig) -> None:
    """Fails in one line when the configured backend lacks its credentials (before any work)."""
    BACKENDS.get(pipeline.model.backend).check_credentials()
