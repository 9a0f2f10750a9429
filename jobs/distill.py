"""What distillation compares: the teacher (the base model with the card as its system message) and a model
without the card, at the positions of the teacher's replies.

A conversation is rendered twice (`pair`): the assistant tokens are the same, only the prompt before them
differs. The teacher's top-k next-token distribution at each of those positions is the target of the `logit`
objective (train) and the reference of the KL figures (evaluate). KL over the teacher's top k plus one bucket
for the rest of the vocabulary is a lower bound of the full KL (merging outcomes never increases KL), exact
when k covers the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobs.backends.base import Datum, SamplingClient, TopK
from jobs.backends.renderer import Renderer

# a probability mass below this counts as this (log of zero)
MIN_MASS = 1e-9


@dataclass(frozen=True)
class Paired:
    """One conversation as the teacher and as the student see it: the assistant tokens sit at
    `teacher_positions` of `teacher_tokens` and at `student_positions` of `student_tokens`."""

    teacher_tokens: list[int]
    student_tokens: list[int]
    student_weights: list[float]
    teacher_positions: list[int]
    student_positions: list[int]


def pair(renderer: Renderer, messages: list[dict], system: str) -> Paired:
    teacher_tokens, teacher_weights = renderer.conversation([{"role": "system", "content": system}, *messages])
    student_tokens, student_weights = renderer.conversation(messages)
    teacher_positions = [i for i, w in enumerate(teacher_weights) if w > 0]
    student_positions = [i for i, w in enumerate(student_weights) if w > 0]
    if [teacher_tokens[i] for i in teacher_positions] != [student_tokens[i] for i in student_positions]:
        raise RuntimeError("the chat template renders the assistant turns differently with a system message")
    return Paired(teacher_tokens, student_tokens, student_weights, teacher_positions, student_positions)


def teacher_topk(teacher: SamplingClient, pairs: list[Paired], k: int) -> list[TopK]:
    """The teacher's top k at every assistant position of each conversation, one row a position."""
    found = teacher.topk_logprobs([p.teacher_tokens for p in pairs], [p.teacher_positions[0] for p in pairs], k)
    return [TopK(p.student_positions[0], [top.ids[i - top.start] for i in p.teacher_positions],
                 [top.logprobs[i - top.start] for i in p.teacher_positions])
            for p, top in zip(pairs, found, strict=True)]


def soft_datum(paired: Paired, target: TopK, max_len: int, sampled_weight: float = 0.0) -> Datum:
    """The student's training sequence with the teacher's top k (probabilities) as the target at each assistant
    position (`target` from `teacher_topk`), `sampled_weight` of each target moved onto the token the teacher
    sampled there (in place of the least likely candidate when the top k lacks it: a target keeps k tokens)."""
    length = len(paired.student_tokens)
    candidates: list[list[int]] = [[] for _ in range(length)]
    probs: list[list[float]] = [[] for _ in range(length)]
    for position, ids, logprobs in zip(paired.student_positions, target.ids, target.logprobs, strict=True):
        ids, row = list(ids), [math.exp(lp) * (1.0 - sampled_weight) for lp in logprobs]
        if sampled_weight:
            sampled = paired.student_tokens[position]
            if sampled not in ids:
                ids[-1], row[-1] = sampled, 0.0
            row[ids.index(sampled)] += sampled_weight
        candidates[position], probs[position] = ids, row
    return Datum(paired.student_tokens[:max_len], paired.student_weights[:max_len], candidates[:max_len],
                 probs[:max_len])


def model_logprobs(model: SamplingClient, pairs: list[Paired], targets: list[TopK]) -> list[list[list[float]]]:
    """The model's (without the card) log-probabilities of the teacher's top-k tokens, row for row of `targets`.
    The assistant positions of a conversation need not be consecutive: every position from the first is asked,
    and the assistant ones are kept."""
    spans = []
    for p, target in zip(pairs, targets, strict=True):
        first, rows = p.student_positions[0], {pos: ids for pos, ids in zip(p.student_positions, target.ids,
                                                                            strict=True)}
        spans.append(TopK(first, [rows.get(i, [p.student_tokens[i]]) for i in range(first, len(p.student_tokens))],
                          []))
    found = model.target_logprobs([p.student_tokens for p in pairs], spans)
    return [[row[i - p.student_positions[0]] for i in p.student_positions] for p, row in zip(pairs, found, strict=True)]


def kl_per_position(teacher: TopK, model: list[list[float]]) -> list[float]:
    """KL(teacher || model) at each row: over the teacher's top k, and the rest of the vocabulary as one outcome."""
    values = []
    for teacher_row, model_row in zip(teacher.logprobs, model, strict=True):
        kl, teacher_mass, model_mass = 0.0, 0.0, 0.0
        for t, m in zip(teacher_row, model_row, strict=True):
            p = math.exp(t)
            kl += p * (t - m)
            teacher_mass, model_mass = teacher_mass + p, model_mass + math.exp(m)
        rest_t, rest_m = max(1.0 - teacher_mass, MIN_MASS), max(1.0 - model_mass, MIN_MASS)
        values.append(kl + rest_t * math.log(rest_t / rest_m))
    return values
