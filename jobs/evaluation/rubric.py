"""Evaluate's rubric judge (`evaluate.rubric_judge`, on in the full profile): the teacher model itself grades each
held-out reply on the dimensions role-play benchmarks score, and how far the cheap judges agree with it.

The grader is the base model with a grading prompt as its system prompt instead of the card: the card's system
prompt (what the teacher was told), the dimensions and their 1-5 scales, and the answer's format, all from
jobs/assets/persona/rubric.yaml; the user message is the held-out question and the reply. Greedy, with no
repetition penalty (the answer repeats the prompt's dimension names), at most rubric.yaml's `max_new_tokens`. It
grades the replies the judges score: the student's, the base's and the teacher's second sample's. It runs after
the student's parts, on the base model opened again, every run: its grades of the base's and the teacher's replies
are not cached (they are the base parts' replies, graded again by each run).

A grade is read from a line or a JSON member `<dimension>: <1-5>` (the name in any case, with `_`, `-` or a space
between its words; markdown marks and a list number allowed). No such line, a grade outside 1-5 or not whole, or two
different grades for one dimension: no grade, counted in `rubric_unread_<role>`, never guessed.

Figures per role: each dimension's mean grade over the replies whose grade was read, and n (`rubric_graded_<role>`:
replies graded on every dimension). Agreement: over every role's replies whose in_character grade was read, in
character is a grade of rubric.yaml's `in_character_from` (4: a small slip allowed) or above; against the
embedding judge's and the n-gram judge's decision on the same reply, the share that agree and Cohen's kappa
(agreement beyond chance; None where both say the same of every reply), with n (`rubric_compared`). rubric.jsonl
holds each prompt and, per role, the reply, the grader's answer, the grades read and both judges' decisions.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from jobs.backends.base import Metered
from jobs.evaluation.figures import Judge
from jobs.evaluation.measure import Measured, sample_replies
from jobs.inputs import load_yaml
from jobs.log import get_logger
from jobs.metrics import (
    IN_CHARACTER,
    OPTIONAL_KEYS,
    RUBRIC_AGREEMENT,
    RUBRIC_BOUNDARY,
    RUBRIC_COMPARED,
    RUBRIC_COMPARED_JUDGES,
    RUBRIC_DIMENSIONS,
    RUBRIC_GRADED,
    RUBRIC_IN_CHARACTER,
    RUBRIC_KAPPA,
    RUBRIC_UNREAD,
    RUBRIC_VOICE,
    Metric,
)

if TYPE_CHECKING:  # the phase imports this module
    from jobs.phases.evaluate import Advance, Context

ROLES = IN_CHARACTER.variants  # the roles the judges score: student, base, teacher_resampled
FIGURE: dict[str, Metric] = dict(zip(RUBRIC_DIMENSIONS, (RUBRIC_IN_CHARACTER, RUBRIC_VOICE, RUBRIC_BOUNDARY),
                                     strict=True))
FEEDS = OPTIONAL_KEYS
Grades = dict[str, int | None]


@dataclass(frozen=True)
class Rubric:
    """rubric.yaml: the dimensions with their scales, the in-character threshold, the grader's answer length and
    its two message templates."""

    dimensions: dict[str, dict]
    in_character_from: int
    max_new_tokens: int
    system: str
    user: str

    def text(self) -> str:
        """The dimensions as the grader reads them: each question, then its scale from 5 down to 1."""
        return "\n\n".join(f"{name}: {spec['what']}\n" + "\n".join(f"  {grade}: {spec['scale'][grade]}"
                                                                   for grade in range(5, 0, -1))
                           for name, spec in self.dimensions.items())


@cache
def load() -> Rubric:
    data = resources.files("jobs.assets.persona").joinpath("rubric.yaml").read_bytes()
    spec = load_yaml(data, "rubric")
    if tuple(spec["dimensions"]) != RUBRIC_DIMENSIONS:
        raise ValueError(f"rubric.yaml's dimensions {tuple(spec['dimensions'])} are not jobs.metrics' "
                         f"{RUBRIC_DIMENSIONS}")
    return Rubric(spec["dimensions"], spec["in_character_from"], spec["max_new_tokens"], spec["system"],
                  spec["user"])


def messages(rubric: Rubric, card: str, question: str, reply: str) -> list[dict]:
    """The grader's conversation: the grading prompt (the card's system prompt and the rubric) and the reply."""
    # replace, not format: a card or a reply may hold braces
    system = rubric.system.replace("{rubric}", rubric.text()).replace("{card}", card)
    user = rubric.user.replace("{question}", question).replace("{reply}", reply)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def grade_pattern(dimension: str) -> re.Pattern:
    name = r"[\s_-]*".join(map(re.escape, dimension.split("_")))
    # at a line's start (after markdown marks or a list number) or a JSON member's; a whole grade 1-5 ("4/5" is 4)
    return re.compile(rf"(?:^|[{{,])[\s\"'*#>-]*(?:\d+[.)]\s*)?{name}[\s\"'*]*[:=][\s\"'*]*([1-5])(?!\d|\.\d)",
                      re.IGNORECASE | re.MULTILINE)


PATTERNS = {dimension: grade_pattern(dimension) for dimension in RUBRIC_DIMENSIONS}


def parse(answer: str) -> Grades:
    """Each dimension's grade in the grader's answer, None where it gave none or two different ones."""
    found: Grades = {}
    for dimension, pattern in PATTERNS.items():
        grades = {int(grade) for grade in pattern.findall(answer)}
        found[dimension] = grades.pop() if len(grades) == 1 else None
    return found


def grade_replies(client: Metered, ctx: Context, advance: Advance) -> dict:
    """The grader's answer for each held-out reply of each role (evaluate's part, on the base model)."""
    rubric = load()
    params = dataclasses.replace(ctx.sampling, max_tokens=rubric.max_new_tokens, temperature=0.0, top_p=1.0,
                                 repetition_penalty=1.0)
    answers = {}
    for role in ROLES:
        chats = [messages(rubric, ctx.prompts.system, question, reply)
                 for question, reply in zip(ctx.questions, ctx.seen.replies[role], strict=True)]
        answers[role] = sample_replies(client, [client.renderer.chat(chat) for chat in chats], params, advance)
    return {"rubric": answers}


def steps(ctx: Context) -> int:
    return len(ROLES) * len(ctx.questions)


def kappa(first: list[bool], second: list[bool]) -> float | None:
    """Cohen's kappa of two raters' yes/no on the same items; None where chance alone agrees on every item (both
    say the same of all of them) or there are none."""
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    yes_first, yes_second = sum(first) / n, sum(second) / n
    chance = yes_first * yes_second + (1 - yes_first) * (1 - yes_second)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(first: list[bool], second: list[bool]) -> tuple[float | None, float | None]:
    """The share of items on which two raters agree, and Cohen's kappa."""
    if not first:
        return None, None
    return sum(a == b for a, b in zip(first, second, strict=True)) / len(first), kappa(first, second)


class Graded:
    """The grader's answers read: per role, each reply's grades, and both judges' decisions on the same replies."""

    def __init__(self, rows: list[dict], seen: Measured, judge: Judge, lexical: Judge):
        self.rows_in, self.seen, self.rubric = rows, seen, load()
        self.grades = {role: [parse(answer) for answer in seen.rubric[role]] for role in ROLES}
        self.judged = {role: dict(zip(RUBRIC_COMPARED_JUDGES, (judge.says(seen.replies[role]),
                                                               lexical.says(seen.replies[role])), strict=True))
                       for role in ROLES}
        unread = {role: sum(v is None for g in grades for v in g.values()) for role, grades in self.grades.items()}
        get_logger().info("rubric judge", unread=unread, of=len(RUBRIC_DIMENSIONS) * len(rows))
        if all(grades and all(v is None for g in grades for v in g.values()) for grades in self.grades.values()):
            get_logger().warning("the rubric judge read no grade in any answer: a grader too small for the rubric?")

    def in_character(self, grades: Grades) -> bool | None:
        grade = grades["in_character"]
        return None if grade is None else grade >= self.rubric.in_character_from

    def figures(self) -> dict[str, float | int | None]:
        found: dict[str, float | int | None] = {}
        for role, grades in self.grades.items():
            for dimension, metric in FIGURE.items():
                read = [grade for g in grades if (grade := g[dimension]) is not None]
                found[metric.of(role)] = sum(read) / len(read) if read else None
            found[RUBRIC_GRADED.of(role)] = sum(all(v is not None for v in g.values()) for g in grades)
            found[RUBRIC_UNREAD.of(role)] = sum(v is None for g in grades for v in g.values())
        # every role's replies with an in-character grade, pooled: one role alone is mostly in or mostly out
        compared = [(verdict, {name: says[i] for name, says in self.judged[role].items()})
                    for role, grades in self.grades.items()
                    for i, verdict in enumerate(map(self.in_character, grades)) if verdict is not None]
        rubric_says = [bool(verdict) for verdict, _ in compared]
        for name in RUBRIC_COMPARED_JUDGES:
            share, beyond_chance = agreement(rubric_says, [judges[name] for _, judges in compared])
            found[RUBRIC_AGREEMENT.of(name)], found[RUBRIC_KAPPA.of(name)] = share, beyond_chance
        found[RUBRIC_COMPARED.key] = len(compared)
        return found

    def rows(self) -> list[dict]:
        """rubric.jsonl: each held-out prompt, and per role the reply, the grader's answer, the grades read, its in
        character verdict and both judges'."""
        return [{"id": row["id"], "prompt": row["prompt"],
                 **{role: {"reply": self.seen.replies[role][i], "answer": self.seen.rubric[role][i],
                           "grades": self.grades[role][i], "in_character": self.in_character(self.grades[role][i]),
                           **{f"{name}_judge": self.judged[role][name][i] for name in RUBRIC_COMPARED_JUDGES}}
                    for role in ROLES}}
                for i, row in enumerate(self.rows_in)]
