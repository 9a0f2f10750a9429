"""The local engine on the real SmolLM2-135M: its sampling, log-probabilities and packed training agree with
plain transformers; training changes the LoRA weights; state round-trips; the shared prefix changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jobs.assets import builtin
from jobs.backends.local import LocalEngine
from jobs.backends.base import Datum, SamplingParams
from jobs.backends.model_files import model_dir
from jobs.card import parse_card
from jobs.config import load_pipeline_config
from jobs.phases.train import to_datum

pytestmark = pytest.mark.slow
CONFIG = load_pipeline_config("ci")
# the parity tests compare algorithms, so they run in float32 on every CPU
FLOAT32 = CONFIG.model.model_copy(update={"dtype": "float32"})
QUESTIONS = ["Who taught you?", "What do you think of Mozart's operas, honestly?", "Say hello.",
             "How do you compose when you cannot hear a single note?"]


@pytest.fixture(scope="module")
def trainer():
    return LocalEngine.for_training(CONFIG.model, CONFIG.train)


@pytest.fixture(scope="module")
def sampler():
    return LocalEngine.for_sampling(FLOAT32)


@pytest.fixture(scope="module")
def reference():
    """The same weights in plain transformers (its own attention), the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir(FLOAT32.base), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def card_prompts(sampler):
    card = parse_card(builtin("builtin:beethoven", "cards", ".yaml"), "builtin:beethoven")
    return [sampler.renderer.prompt(q, system=card.teacher_system_prompt()) for q in QUESTIONS]


def batch(renderer) -> list[Datum]:
    rows = [{"prompt": "Who taught you?", "reply": "Haydn, though I learned little from him."},
            {"prompt": "Do you like coffee? Tell me all about it.", "reply": "Exactly sixty beans a cup, counted."}]
    return [to_datum(renderer, row, 128) for row in rows]


def test_loss_only_on_reply_tokens(trainer):
    datum = batch(trainer.renderer)[0]
    prompt_len = len(trainer.renderer.prompt("Who taught you?"))
    assert datum.weights[:prompt_len] == [0.0] * prompt_len and set(datum.weights[prompt_len:]) == {1.0}
    assert datum.tokens[-1] == trainer.renderer.end_of_turn


def test_packed_loss_matches_plain_transformers(reference):
    """Packing without pads and logits only at weighted positions give the loss of the textbook computation:
    each sequence on its own, full logits, the weighted mean of the token NLLs."""
    trainer = LocalEngine.for_training(FLOAT32, CONFIG.train)  # LoRA starts as a no-op (B = 0): the base model's loss
    data = batch(trainer.renderer)
    total = weight = 0.0
    for datum in data:
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([datum.tokens])).logits[0, :-1].float()
        nll = F.cross_entropy(logits, torch.tensor(datum.tokens[1:]), reduction="none")
        total += float((nll * torch.tensor(datum.weights[1:])).sum())
        weight += sum(datum.weights[1:])
    result = trainer.forward_backward(data)
    assert result["tokens"] == weight
    assert result["loss"] == pytest.approx(total / weight, abs=1e-4)


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
    assert all(t.dtype == torch.float32 for t in after.values())  # an fp32 adapter whatever the base's dtype

    trainer.save_state(tmp_path / "state")
    other = LocalEngine.for_training(CONFIG.model, CONFIG.train.model_copy(update={"seed": 99}))
    assert not all(torch.equal(after[n], p) for n, p in other.adapter_parameters().items())
    other.load_state(tmp_path / "state")
    assert all(torch.equal(after[n], p) for n, p in other.adapter_parameters().items())


def test_greedy_tokens_are_identical_with_and_without_the_shared_prefix(sampler, card_prompts):
    greedy = SamplingParams(max_tokens=32, temperature=0.0, repetition_penalty=1.2, batch_size=3)
    shared = sampler.sample(card_prompts, greedy)
    assert shared == sampler.sample(card_prompts, greedy, share_prefix=False)
    assert all(0 < len(tokens) <= 32 for tokens in shared)


def test_greedy_decoding_matches_transformers_generate(sampler, reference, card_prompts):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.2, batch_size=4)
    ours = sampler.sample(card_prompts[:2], greedy)
    end = sampler.renderer.end_of_turn
    for prompt, tokens in zip(card_prompts[:2], ours, strict=True):
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                     repetition_penalty=1.2, eos_token_id=end, pad_token_id=sampler.pad_id)
        expected = out[0, len(prompt):].tolist()
        assert tokens == (expected[:expected.index(end)] if end in expected else expected)


def test_logprobs_match_transformers_with_and_without_the_shared_prefix(sampler, reference, card_prompts):
    sequences = [p + sampler.renderer.reply("Haydn taught me, and Neefe before him.") for p in card_prompts]
    shared = sampler.compute_logprobs(sequences)
    separate = sampler.compute_logprobs(sequences, share_prefix=False)
    for sequence, a, b in zip(sequences, shared, separate, strict=True):
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(sequence[1:])[:, None]).squeeze(1)
        assert len(a) == len(b) == len(sequence) - 1
        assert torch.allclose(torch.tensor(a), expected, atol=2e-4)
        assert torch.allclose(torch.tensor(b), expected, atol=2e-4)


def test_sampling_is_seeded_and_stays_in_the_nucleus(sampler, card_prompts):
    params = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, repetition_penalty=1.2, batch_size=4)
    first, second = sampler.sample(card_prompts, params), sampler.sample(card_prompts, params)
    assert first == second
    assert first != sampler.sample(card_prompts, SamplingParams(**{**params.__dict__, "seed": 1}))
