"""The model cache: base models, the embedding model and Hub downloads live under one folder (`make setup` fills
it; a pod mounts the `cache` volume there). Below both `model_files` and `embeddings`, which each name folders in it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE_DIR") or Path.home() / ".cache" / "distill")


def cached_model_dir(name: str) -> Path:
    """Where model `name` (a Hub id) lives in the cache, whether or not it is there yet."""
    return cache_root() / "models" / name.replace("/", "--")
