"""The local engine on the real SmolLM2-135M: training changes the LoRA weights, state round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.backends import open_sampler, open_trainer
from jobs.backends.base import Datum, SamplingParams
from jobs.config import load_pipeline_config
from jobs.phases.train import to_datum

pytestmark = pytest.mark.slow
CONFIG = load_pipeline_config("ci")


@pytest.fixture(scope="module")
def trainer():
    return open_trainer(CONFIG.model, CONFIG.train)


def batch(renderer) -> list[Datum]:
    rows = [{"prompt": "Who taught you?", "reply": "Haydn, though I learned little from him."},
            {"prompt": "Do you like coffee?", "reply": "Exactly sixty beans a cup, counted by hand."}]
    return [to_datum(renderer, row, 128) for row in rows]


def test_loss_only_on_reply_tokens(trainer):
    datum = batch(trainer.renderer)[0]
    prompt_len = len(trainer.renderer.prompt("Who taught you?"))
    assert datum.weights[:prompt_len] == [0.0] * prompt_len and set(datum.weights[prompt_len:]) == {1.0}
    assert datum.tokens[-1] == trainer.renderer.end_of_turn


def test_a_step_changes_lora_weights_and_lowers_loss(trainer, tmp_path):
    before = trainer.adapter_parameters()
    losses = []
    for _ in range(3):
        losses.append(trainer.forward_backward(batch(trainer.renderer))["loss"])
        trainer.optim_step(1e-3)
    after = trainer.adapter_parameters()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before) and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert all(t.dtype == torch.float32 for t in after.values())  # fp32 adapter over the bf16 base

    trainer.save_state(tmp_path / "state")
    other = open_trainer(CONFIG.model, CONFIG.train.model_copy(update={"seed": 99}))
    assert not all(torch.equal(after[n], p) for n, p in other.adapter_parameters().items())
    other.load_state(tmp_path / "state")
    assert all(torch.equal(after[n], p) for n, p in other.adapter_parameters().items())


def test_sampling_and_logprobs():
    sampler = open_sampler(CONFIG.model)
    prompts = [sampler.renderer.prompt("Name a symphony."), sampler.renderer.prompt("Say hello.")]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.2, batch_size=2)
    first, second = sampler.sample(prompts, greedy), sampler.sample(prompts, greedy)
    assert first == second and all(0 < len(tokens) <= 8 for tokens in first)
    logprobs = sampler.compute_logprobs([p + t for p, t in zip(prompts, first)])
    assert [len(lp) for lp in logprobs] == [len(p) + len(t) - 1 for p, t in zip(prompts, first)]
    assert all(value <= 0 for row in logprobs for value in row)
