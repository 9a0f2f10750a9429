"""The engine's next-token choice against transformers' own logits processors, on random logits (no model)."""

from __future__ import annotations

import pytest
import torch

from jobs.backends.base import SamplingParams
from jobs.backends.sampling import NUCLEUS_WIDTHS, choose_tokens, nucleus, shared_prefix_length


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 0.5), (1.3, 0.99), (0.7, 1.0)])
def test_nucleus_is_the_one_generate_samples_from(temperature, top_p):
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=generator) * 3
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(dim=-1)
    candidates, probs = nucleus(logits, params)
    ours = torch.zeros_like(expected).scatter(1, candidates, probs / probs.sum(dim=-1, keepdim=True))
    assert torch.equal(ours > 0, expected > 0)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_a_nucleus_wider_than_every_first_look_falls_back_to_the_whole_vocabulary():
    logits = torch.zeros(2, 2 * NUCLEUS_WIDTHS[-1])  # uniform: the 0.9 nucleus holds 90% of the vocabulary
    _, probs = nucleus(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9))
    assert int((probs[0] > 0).sum()) == int(0.9 * logits.shape[1]) + 1


def test_repetition_penalty_and_greedy_match_generate():
    from transformers import RepetitionPenaltyLogitsProcessor

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=generator)
    history = torch.randint(0, 300, (4, 200), generator=generator)  # many ids repeat: each is penalised once
    params = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone()).argmax(dim=-1)
    assert torch.equal(choose_tokens(logits, history, params, generator), expected)


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    card = list(range(100))
    assert shared_prefix_length([card + [1, 2], card + [3]]) == 100
    assert shared_prefix_length([card, card + [5]]) == 99  # the shorter row keeps its last token
    assert shared_prefix_length([card + [1]]) == 0  # one row: nothing to share
    assert shared_prefix_length([[7] * 10 + [1], [7] * 10 + [2]]) == 0  # too short to be worth a pass
