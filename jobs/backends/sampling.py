"""How the local engine picks tokens: which prompt tokens a batch shares, nucleus sampling as transformers'
`generate` does it, and per-row draws that do not depend on a row's batch companions."""

from __future__ import annotations

import torch

from jobs.backends.base import SamplingParams

# a shared prefix shorter than this is not worth a separate forward pass
MIN_SHARED_PREFIX = 16
# how many of the most likely tokens nucleus sampling looks at, widening only when some row's nucleus is wider:
# a full sort of the vocabulary (and sampling from all of it) costs more than the model's step
NUCLEUS_WIDTHS = (256, 4096)


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Tokens at the start of every row, leaving each row at least one token of its own."""
    if len(rows) < 2:
        return 0
    length = min(len(r) for r in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        same = 0
        while same < length and row[same] == first[same]:
            same += 1
        length = same
    return length if length >= MIN_SHARED_PREFIX else 0


def nucleus(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens each row may sample after temperature and top-p, and their probabilities (zero outside the
    nucleus), as (candidates, probabilities), each (rows, width).

    The nucleus is almost always among the few most likely tokens: those are looked at first, a wider set
    when some row's nucleus is wider, and the whole vocabulary (as `generate` sorts it every step) last.
    """
    probs = (logits / params.temperature).softmax(dim=-1)
    vocab = probs.shape[-1]
    if params.top_p >= 1.0:
        return torch.arange(vocab, device=probs.device).expand_as(probs), probs
    for width in sorted({min(width, vocab) for width in (*NUCLEUS_WIDTHS, vocab)}):
        top, candidates = probs.topk(width, dim=-1)
        before = top.cumsum(dim=-1) - top  # the mass of the more likely tokens
        if width == vocab or bool((before[:, -1] + top[:, -1] >= params.top_p).all()):
            break
    # a token stays while the more likely ones hold less than top_p; the most likely always does
    return candidates, top.masked_fill(before >= params.top_p, 0.0)


def draw(probs: torch.Tensor, generators: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One column per row, drawn from each row's unnormalised probabilities by the inverse of its cumulative
    distribution: one uniform number per row, from that row's own generator when `generators` is a list.

    So a row's draw depends only on its own probabilities and generator: not on its batch companions, and not on
    how many candidates `nucleus` looked at (torch.multinomial draws one number per candidate and so would)."""
    rows = probs.shape[0]
    if isinstance(generators, torch.Generator):
        uniform = torch.rand(rows, generator=generators, device=probs.device)
    else:
        uniform = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    cdf = probs.cumsum(dim=-1)
    # the first column whose cumulative mass exceeds the draw: never a zero-probability one
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    return picked.squeeze(1).clamp(max=probs.shape[1] - 1)


def choose_tokens(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """The next token of each row, as transformers' generate picks it: the repetition penalty on every token in
    the row so far (`history`, prompt included; a repeated id counts once), then greedy, or temperature and
    nucleus (top-p) sampling. `generator` is one generator for all rows or one per row (`draw`)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty
        before = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(before < 0, before * penalty, before / penalty))
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    candidates, probs = nucleus(logits, params)
    return candidates.gather(1, draw(probs, generator)[:, None]).squeeze(1)
