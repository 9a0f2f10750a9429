"""The local engine on the tiny test model (tests/tiny_model.py; parity holds on any weights): its sampling,
log-probabilities and packed training agree with plain transformers; training changes the LoRA weights; state
round-trips; the shared prefix changes nothing."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from tiny_model import SETTING

from jobs.assets import builtin
from jobs.backends.base import Datum, SamplingParams
from jobs.backends.local import LocalEngine
from jobs.backends.model_files import model_dir
from jobs.card import parse_card
from jobs.config import load_pipeline_config
from jobs.phases.train import to_datum
from jobs.records import exchange

CONFIG = load_pipeline_config("ci", overrides=[SETTING])
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
    rows = [{"messages": exchange("Who taught you?", "Haydn, though I learned little from him.")},
            {"messages": exchange("Do you like coffee? Tell me all about it.",
                                     "Exactly sixty beans a cup, counted.")}]
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


def test_a_rows_sampled_reply_does_not_depend_on_its_batch_companions(sampler, card_prompts):
    """Each row samples from its own generator (seeds[i]), so a reply is the same alone, in a batch, in another
    order or another batch size: what lets a server batch concurrent requests and still answer each one as if
    it were alone (and what makes the local backend and the Tinker backend agree)."""
    prompts = card_prompts[:2] + [sampler.renderer.prompt(q) for q in QUESTIONS[:2]]
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, batch_size=3)
    seeds = [11, 12, 13, 14]
    together = sampler.sample(prompts, params, seeds=seeds)
    alone = [sampler.sample([p], params, seeds=[s])[0] for p, s in zip(prompts, seeds, strict=True)]
    reordered = sampler.sample(prompts[::-1], SamplingParams(**{**params.__dict__, "batch_size": 2}), seeds=seeds[::-1])
    assert together == alone == reordered[::-1]
    # the default seeds are params.seed + row index
    assert sampler.sample(prompts, SamplingParams(**{**params.__dict__, "seed": 11})) == together


def test_sum_reduction_is_the_mean_times_the_weight_and_so_are_its_gradients():
    trainer = LocalEngine.for_training(FLOAT32, CONFIG.train)
    data = batch(trainer.renderer)
    # LoRA's B starts at zero, so A has no gradient yet: one step first makes every gradient non-zero
    trainer.forward_backward(data)
    trainer.optim_step(1e-3)
    mean = trainer.forward_backward(data)
    mean_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    summed = trainer.forward_backward(data, reduction="sum", logprobs=True)
    weight = sum(sum(d.weights[1:]) for d in data)
    assert summed["tokens"] == mean["tokens"] == weight
    assert summed["loss"] == pytest.approx(mean["loss"] * weight, rel=1e-5)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            expected = mean_grads[name] * weight
            assert torch.allclose(p.grad, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())), name
    # per-datum log-probabilities of the targets: those of compute_logprobs where the weight is non-zero, else 0
    reference = trainer.compute_logprobs([d.tokens for d in data])
    for datum, ours, full in zip(data, summed["logprobs"], reference, strict=True):
        assert len(ours) == len(datum.tokens) - 1
        expected = [lp if w else 0.0 for lp, w in zip(full, datum.weights[1:], strict=True)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(expected), atol=2e-4)
    assert -sum(sum(lp) for lp in summed["logprobs"]) == pytest.approx(summed["loss"], rel=1e-5)
    trainer.model.zero_grad(set_to_none=True)


def test_optim_step_is_adamw_with_the_given_hyperparameters_and_clipping():
    trainer = LocalEngine.for_training(FLOAT32, CONFIG.train)
    data = batch(trainer.renderer)
    trainer.forward_backward(data)
    trainer.optim_step(1e-3)
    trainer.forward_backward(data, reduction="sum")
    params = [p for _, p in trainer._trainable()]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for copy, p in zip(copies, params, strict=True):
        copy.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    assert norm > 0.5  # the clipping bites
    # the reference: a fresh AdamW given the engine's moments after its first step
    reference = torch.optim.AdamW(copies, lr=2e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    reference.load_state_dict({"state": deepcopy(trainer._optimizer.state_dict()["state"]),
                               "param_groups": reference.state_dict()["param_groups"]})
    reference.step()
    trainer.optim_step(2e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, grad_clip_norm=0.5)
    for copy, p in zip(copies, params, strict=True):
        assert torch.allclose(copy.detach(), p.detach(), rtol=1e-5, atol=1e-8)


def test_one_sure_soft_target_is_cross_entropy_and_importance_sampling_at_ratio_one_is_sft():
    """Soft targets whose one candidate is the true token with probability 1 are hard cross-entropy, loss and
    gradients; importance sampling of the policy's own tokens (ratio 1) with advantage 1 has loss -1 (the
    weighted mean of -ratio * advantage) and SFT's gradients, since d(-exp(logp - s)) = -dlogp where logp = s."""
    trainer = LocalEngine.for_training(FLOAT32, CONFIG.train)
    hard = batch(trainer.renderer)
    trainer.forward_backward(hard)  # LoRA's B starts at zero: one step first makes every gradient non-zero
    trainer.optim_step(1e-3)

    def gradients() -> dict[str, torch.Tensor]:
        found = {name: p.grad.clone() for name, p in trainer._trainable()}
        trainer.model.zero_grad(set_to_none=True)
        return found

    sft = trainer.forward_backward(hard)
    sft_grads = gradients()
    sure = [Datum(d.tokens, d.weights, candidates=[[t] for t in d.tokens], probs=[[1.0]] * len(d.tokens))
            for d in hard]
    soft = trainer.forward_backward(sure)
    soft_grads = gradients()
    sampled = trainer.compute_logprobs([d.tokens for d in hard])
    on_policy = [Datum(d.tokens, d.weights, sampled_logprobs=[0.0] + lp, advantages=[1.0] * len(d.tokens))
                 for d, lp in zip(hard, sampled, strict=True)]
    policy = trainer.forward_backward(on_policy, loss_fn="importance_sampling")
    policy_grads = gradients()

    assert soft["tokens"] == policy["tokens"] == sft["tokens"] == sum(sum(d.weights[1:]) for d in hard)
    assert soft["loss"] == pytest.approx(sft["loss"], rel=1e-5)
    assert policy["loss"] == pytest.approx(-1.0, abs=1e-4)
    for name, expected in sft_grads.items():
        tolerance = 1e-4 * float(expected.abs().max())
        assert torch.allclose(soft_grads[name], expected, rtol=1e-4, atol=tolerance), name
        assert torch.allclose(policy_grads[name], expected, rtol=1e-3, atol=tolerance), name
    flat = [torch.cat([g[name].flatten() for name in sft_grads]) for g in (sft_grads, policy_grads)]
    assert float(F.cosine_similarity(flat[0], flat[1], dim=0)) > 0.9999
