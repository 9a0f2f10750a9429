"""Typed config: profiles, layered overrides, one-line errors, and the run id derived from inputs."""

from __future__ import annotations

import pytest

from jobs.cli import derive_run_id
from jobs.config import PROFILES, load_pipeline_config, user_layers
from jobs.errors import InputError
from jobs.store import StoreSettings


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    config = load_pipeline_config(profile)
    assert config.profile == profile
    assert config.train.checkpoint_every <= config.train.steps


def test_full_profile_is_seed_scale():
    full = load_pipeline_config("full")
    assert (full.train.steps, full.train.checkpoint_every, full.ingest.limit) == (1000, 200, 5000)


def test_layers_apply_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train: {steps: 9, batch_size: 3}\n")
    config = load_pipeline_config("ci", str(file), ["train.steps=7"], inline="train: {steps: 8, lora_rank: 4}")
    assert (config.train.steps, config.train.batch_size, config.train.lora_rank) == (7, 3, 4)
    assert user_layers(str(file), ["a.b=1"]) == {"train": {"steps": 9, "batch_size": 3}, "a": {"b": 1}}


@pytest.mark.parametrize("override, fragment", [
    (["train.steps=0"], "config train.steps:"),
    (["train.nope=1"], "config train.nope:"),
    (["train"], "expected section.key=value"),
    (["train.checkpoint_every=100"], "checkpoint_every must not exceed"),
    # the objective's and the backend's own checks (`jobs.objectives`, `jobs.backends`)
    (["train.objective=on_policy", "train.warm_start_steps=6"], "config: train.warm_start_steps must be fewer than"),
    (["model.backend=tinker", "train.lora_alpha=16"], "config: train.lora_alpha must be 32 with model.backend=tinker"),
    (["model.backend=tinker", "conversations.visitor.repetition_penalty=1.1"],
     "config: conversations.visitor.repetition_penalty must be 1.0 with model.backend=tinker"),
    (["train.objective=sfd"], "config train.objective: unknown objective 'sfd': choose one of sft, logit, on_policy"),
])
def test_bad_values_are_one_line_errors(override, fragment):
    with pytest.raises(InputError) as caught:
        load_pipeline_config("ci", overrides=override)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_limits_apply_only_to_the_objective_and_backend_that_have_them():
    # ci's steps are 6: warm start steps count against on_policy alone; alpha 16 is Tinker's limit alone
    assert load_pipeline_config("ci", overrides=["train.objective=sft", "train.warm_start_steps=6"])
    assert load_pipeline_config("ci", overrides=["train.lora_alpha=16"]).model.backend == "local"
    assert load_pipeline_config("ci", overrides=["model.backend=tinker"]).train.lora_alpha == 32


def test_unknown_profile_is_an_error():
    with pytest.raises(InputError, match="unknown profile"):
        load_pipeline_config("huge")


def test_run_id_follows_card_prompts_and_config(tmp_path):
    settings = StoreSettings()
    base = load_pipeline_config("ci")
    same = derive_run_id(load_pipeline_config("ci"), settings)
    assert derive_run_id(base, settings) == same and same.startswith("ci-")
    assert derive_run_id(load_pipeline_config("ci", overrides=["train.steps=5"]), settings) != same
    card = tmp_path / "card.yaml"
    card.write_text("name: B\nsystem_prompt: You are B, a composer of note.\n")
    changed = derive_run_id(load_pipeline_config("ci", overrides=[f"ingest.card={card}"]), settings)
    card.write_text("name: B\nsystem_prompt: You are B, a composer of great note.\n")
    assert derive_run_id(load_pipeline_config("ci", overrides=[f"ingest.card={card}"]), settings) != changed
