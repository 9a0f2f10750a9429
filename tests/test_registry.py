"""The registries of train objectives and model backends (`jobs.objectives`, `jobs.backends`): what ships, the
one-line error an unknown name gets, and what a new one takes. The test's own objective (a loss of its own) and
backend are classes registered in one line each, as a module of the code and its line in the registry would be:
the config's checks, the credentials check, preflight and the train phase dispatch to them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, phase_config

from jobs.backends import BACKENDS, check_credentials, open_backend
from jobs.backends.base import Datum, SamplingClient, TrainingClient
from jobs.backends.local import LocalEngine
from jobs.backends.local_backend import LocalBackend
from jobs.card import CharacterCard
from jobs.config import PipelineConfig, TrainConfig, load_pipeline_config
from jobs.errors import InputError
from jobs.objectives import OBJECTIVES
from jobs.objectives.base import Batch, Objective, to_datum
from jobs.phases import preflight
from jobs.phases import train as train_phase
from jobs.run_options import BACKEND_CHOICES
from jobs.store import ArtifactStore

SHIPPED_OBJECTIVES = ("sft", "logit", "on_policy")
SHIPPED_BACKENDS = ("local", "tinker")


class ScaledCE(Objective):
    """A loss of its own: the cross-entropy of the teacher's replies times `SCALE`, as a soft target that puts
    `SCALE` of the mass on the token the teacher sampled (`Datum.candidates`), so it runs on every backend."""

    name = "scaled_ce"
    SCALE = 0.5

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        if pipeline.train.max_seq_len < 64:
            raise ValueError("train.max_seq_len must be at least 64 (scaled_ce)")

    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        self.data = []
        for row in self.rows:
            plain = to_datum(trainer.renderer, row, self.train.max_seq_len)
            self.data.append(Datum(plain.tokens, plain.weights,
                                   [[t] if w else [] for t, w in zip(plain.tokens, plain.weights, strict=True)],
                                   [[self.SCALE] if w else [] for w in plain.weights]))

    def batch(self, indices: list[int], step: int) -> Batch:
        return [self.data[i] for i in indices], "cross_entropy", {"scale": self.SCALE}


class Frugal(LocalBackend):
    """The local engine under a name of its own, with a limit, a credential and a preflight of its own."""

    name = "frugal"
    KEY = "FRUGAL_KEY"

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        if pipeline.train.lora_rank > 8:
            raise ValueError("train.lora_rank must be at most 8 with model.backend=frugal")

    @classmethod
    def check_credentials(cls) -> None:
        if not os.environ.get(cls.KEY):
            raise InputError(f"model.backend=frugal needs ${cls.KEY}")

    @classmethod
    def preflight(cls, pipeline: PipelineConfig) -> Path:
        return Path("/frugal") / pipeline.model.base


def test_the_registries_list_exactly_the_shipped_objectives_and_backends():
    assert OBJECTIVES.names() == SHIPPED_OBJECTIVES and BACKENDS.names() == SHIPPED_BACKENDS
    assert ("", *SHIPPED_BACKENDS) == BACKEND_CHOICES
    # the settings each declares are settings of the config (a renamed one fails here, not in a run)
    config = load_pipeline_config("ci")
    for objective in OBJECTIVES:
        assert set(OBJECTIVES.get(objective).settings) <= set(TrainConfig.model_fields), objective
    for backend in BACKENDS:
        for setting in BACKENDS.get(backend).settings:
            section, _, key = setting.partition(".")
            assert hasattr(getattr(config, section), key) if key else hasattr(config, section), setting
    # what `make objectives` runs one by one, read from the code
    listed = subprocess.run([sys.executable, "-m", "jobs.objectives"], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == list(SHIPPED_OBJECTIVES)
    dry = subprocess.run(["make", "-n", "objectives", f"PY={sys.executable}"], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert "for objective in sft logit on_policy;" in dry.stdout


@pytest.mark.parametrize("setting, kind, choices", [("train.objective", "objective", SHIPPED_OBJECTIVES),
                                                    ("model.backend", "backend", SHIPPED_BACKENDS)])
def test_an_unknown_name_is_one_line_naming_the_choices(setting, kind, choices):
    with pytest.raises(InputError) as caught:
        load_pipeline_config("ci", overrides=[f"{setting}=nope"])
    assert str(caught.value) == (f"config {setting}: unknown {kind} 'nope': choose one of {', '.join(choices)} "
                                 "(profile ci)")


def test_a_backend_of_its_own_gets_the_config_credentials_and_preflight_checks(store_env, monkeypatch):
    assert "frugal" not in BACKENDS
    with BACKENDS.registered(Frugal):
        with pytest.raises(InputError, match=r"^config: train.lora_rank must be at most 8 with model.backend=frugal"):
            load_pipeline_config("ci", overrides=["model.backend=frugal", "train.lora_rank=16"])
        config = phase_config("registry-backend", "model.backend=frugal", "train.lora_rank=8")
        monkeypatch.delenv(Frugal.KEY, raising=False)
        with pytest.raises(InputError, match=r"needs \$FRUGAL_KEY"):
            check_credentials(config.pipeline)
        monkeypatch.setenv(Frugal.KEY, "yes")
        check_credentials(config.pipeline)
        checks = preflight.check_environment(config)
        assert checks["backend"] == "frugal" and checks["model_dir"] == f"/frugal/{config.pipeline.model.base}"
        assert type(open_backend(config.pipeline, config.store, Path("/nonexistent"))) is Frugal
        # the other backends' checks are theirs: Tinker's fixed LoRA scale does not apply here
        load_pipeline_config("ci", overrides=["model.backend=frugal", "train.lora_rank=8", "train.lora_alpha=7"])
    with pytest.raises(InputError, match="unknown backend 'frugal'"):
        load_pipeline_config("ci", overrides=["model.backend=frugal"])


ROWS = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        for question, answer in [("Who are you?", "I am Beethoven, and I write symphonies."),
                                 ("What do you play?", "The piano, loudly, because I cannot hear it."),
                                 ("Where do you live?", "In Vienna, in too many lodgings to count.")]]


def write_inputs(store: ArtifactStore) -> None:
    """The units train reads (ingest's card, split's rows), as those phases would have written them."""
    card = CharacterCard(name="Beethoven", system_prompt="You are Ludwig van Beethoven, the composer, in Vienna.")
    with store.writing("ingest", fingerprint="registry-test") as out:
        out.write_json("card.json", card.model_dump())
    with store.writing("split", fingerprint="registry-test") as out:
        out.write_jsonl("train.jsonl", ROWS)
        out.write_jsonl("val.jsonl", ROWS[:1])


@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_every_registered_objective_trains_through_the_train_phase(objective, store_env):
    config = phase_config(f"registry-{objective.replace('_', '-')}", f"train.objective={objective}", "train.steps=2",
                          "train.batch_size=2", "train.checkpoint_every=2", "train.val_every=2", "train.top_k=8",
                          "train.rollout_tokens=8")
    write_inputs(config.store)
    metrics = train_phase.main(config)
    assert (metrics["objective"], metrics["steps"], metrics["backend"]) == (objective, 2, "local")
    assert set(metrics["settings"]) == {"learning_rate", "max_seq_len", *OBJECTIVES.get(objective).settings}
    history = config.store.read_jsonl("train", "metrics.jsonl")
    assert [h["step"] for h in history] == [1, 2] and all(h["loss"] == h["loss"] for h in history)  # not NaN
    assert metrics["val_loss_last"] is not None


def test_an_objective_of_its_own_trains_through_the_train_phase_on_a_backend_of_its_own(store_env, monkeypatch):
    with OBJECTIVES.registered(ScaledCE), BACKENDS.registered(Frugal):
        with pytest.raises(InputError, match=r"train.max_seq_len must be at least 64 \(scaled_ce\)"):
            load_pipeline_config("ci", overrides=["train.objective=scaled_ce", "train.max_seq_len=32"])
        config = phase_config("registry-objective", "train.objective=scaled_ce", "model.backend=frugal",
                              "train.lora_rank=8", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
                              "train.val_every=2")
        write_inputs(config.store)
        metrics = train_phase.main(config)
    assert (metrics["objective"], metrics["backend"], metrics["steps"]) == ("scaled_ce", "frugal", 2)
    history = config.store.read_jsonl("train", "metrics.jsonl")
    assert [h["step"] for h in history] == [1, 2] and all(h["scale"] == ScaledCE.SCALE for h in history)
    # step 1's loss is its own: SCALE times the cross-entropy of the batch's replies under the base model
    train = config.pipeline.train
    base = LocalEngine.for_sampling(config.pipeline.model)
    batch = [to_datum(base.renderer, ROWS[i], train.max_seq_len)
             for i in train_phase.batch_rows(len(ROWS), train.batch_size, 0, train.seed)]
    logprobs = base.compute_logprobs([d.tokens for d in batch])
    nll = -sum(lp * w for d, row in zip(batch, logprobs, strict=True) for lp, w in zip(row, d.weights[1:], strict=True))
    cross_entropy = nll / sum(sum(d.weights[1:]) for d in batch)
    assert metrics["first_loss"] == pytest.approx(ScaledCE.SCALE * cross_entropy, rel=2e-3)
    assert "scaled_ce" not in OBJECTIVES and "frugal" not in BACKENDS
