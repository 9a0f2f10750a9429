"""What distillation compares: the teacher (the base model with the card as its system message) and a model
without the card, at the positions of the teacher's replies.

A conversation is rendered twice (`pair`): the assistant tokens are the same, only the prompt before them
differs. The teacher's top-k next-token distribution at each of those positions is the target of the `logit`
objective (train) and the reference of the KL figures (evaluate). KL over the teacher's top k plus one bucket
for the rest of the vocabulary is a lower bound of the full KL (merging outcomes never increases KL), exact
when k covers the vocabulary.

The teacher's system message may change within a conversation (a lorebook's keyed entries join it from the turn a
key occurs, `jobs.lorebook.turn_systems`): `pair_runs` pairs each run of turns under one system message apart, the
teacher reading that message and the conversation up to the run's last turn, so that each reply's targets come
from the distribution it was sampled from; `teacher_topk_runs` joins the runs' targets into one per conversation.
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


def runs(systems: list[str]) -> list[tuple[str, int, int]]:
    """Per run of consecutive turns under one system message (`systems`: one per assistant turn), the message and
    the run's first and last turn (from 1)."""
    found: list[tuple[str, int, int]] = []
    for number, system in enumerate(systems, start=1):
        if found and found[-1][0] == system:
            found[-1] = (system, found[-1][1], number)
        else:
            found.append((system, number, number))
    return found


def pair_runs(renderer: Renderer, messages: list[dict], systems: list[str]) -> list[Paired]:
    """`pair` with a system message per assistant turn (`systems`): one Paired per run of turns under one system
    message (`runs`), in turn order. A run's teacher side is its system message and the conversation up to its last
    turn, its student side the whole conversation, and the positions of both are the run's turns' alone; one run is
    `[pair(renderer, messages, system)]`."""
    found = runs(systems)
    if len(found) == 1:
        return [pair(renderer, messages, found[0][0])]
    student_tokens, student_weights = renderer.conversation(messages)
    student_positions = [i for i, w in enumerate(student_weights) if w > 0]
    paired = []
    for system, first, last in found:
        # the assistant positions of the turns before the run: those of the conversation's start, rendered alone
        before = sum(1 for w in renderer.conversation(messages[:2 * first - 2])[1] if w > 0) if first > 1 else 0
        teacher_tokens, teacher_weights = renderer.conversation([{"role": "system", "content": system},
                                                                 *messages[:2 * last]])
        teacher_positions = [i for i, w in enumerate(teacher_weights) if w > 0][before:]
        positions = student_positions[before:before + len(teacher_positions)]
        if [teacher_tokens[i] for i in teacher_positions] != [student_tokens[i] for i in positions]:
            raise RuntimeError("the chat template renders the assistant turns differently with a system message "
                               "or in a conversation's start")
        paired.append(Paired(teacher_tokens, student_tokens, student_weights, teacher_positions, positions))
    if [i for p in paired for i in p.student_positions] != student_positions:
        raise RuntimeError("the chat template renders a conversation's start differently from the whole")
    return paired


def whole(renderer: Renderer, messages: list[dict], runs: list[Paired], system: str) -> Paired:
    """The conversation paired over every assistant position, for the student's side of `runs` (`pair_runs`): a
    single run is that already; else `pair` with `system` (the last turn's message)."""
    return runs[0] if len(runs) == 1 else pair(renderer, messages, system)


def teacher_topk(teacher: SamplingClient, pairs: list[Paired], k: int) -> list[TopK]:
    """The teacher's top k at every assistant position of each conversation, one row a position."""
    found = teacher.topk_logprobs([p.teacher_tokens for p in pairs], [p.teacher_positions[0] for p in pairs], k)
    return [TopK(p.student_positions[0], [top.ids[i - top.start] for i in p.teacher_positions],
                 [top.logprobs[i - top.start] for i in p.teacher_positions])
            for p, top in zip(pairs, found, strict=True)]


def teacher_topk_runs(teacher: SamplingClient, conversations: list[list[Paired]], k: int) -> list[TopK]:
    """`teacher_topk` over each conversation's runs (`pair_runs`), in one call: per conversation, one TopK over all
    its assistant positions, each run's rows from that run's pass."""
    found = iter(teacher_topk(teacher, [p for paired in conversations for p in paired], k))
    joined = []
    for paired in conversations:
        parts = [next(found) for _ in paired]
        joined.append(TopK(parts[0].start, [row for part in parts for row in part.ids],
                           [row for part in parts for row in part.logprobs]))
    return joined


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
