"""Evaluate's rubric judge (`jobs.evaluation.rubric`): reading grades from fixed answers, the agreement and Cohen's
kappa on known inputs, the grading prompt; and end to end on the tiny random model, the phases up to evaluate run in
this process with `evaluate.rubric_judge` on (metrics.json and rubric.jsonl), and the same grading chats answered
through the `tinker` backend (the stand-in on loopback) give the local engine's answers (greedy)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from conftest import phase_config

from jobs.backends.base import Metered
from jobs.card import CharacterCard
from jobs.config import TinkerConfig
from jobs.evaluation import rubric
from jobs.evaluation.measure import Measured, Prompts
from jobs.metrics import (
    KEYS,
    OPTIONAL,
    OPTIONAL_KEYS,
    RUBRIC_DIMENSIONS,
    figure_rows,
    markdown_table,
    record,
)
from jobs.phases.evaluate import Context

ADA = CharacterCard(name="Ada Lovelace", system_prompt="You are Ada Lovelace, mathematician, in London in 1843. "
                    "You write {notes} on the Analytical Engine.")  # braces: the card is not a format string
ROLES = rubric.ROLES
EMPTY_PROMPTS = Prompts(system="", with_card=[], without_card=[], teacher_replies=[], pairs=[])


@pytest.mark.parametrize(("answer", "grades"), [
    ("in_character: 4\nvoice: 3\nknowledge_boundary: 5", (4, 3, 5)),
    ('{"in_character": 2, "voice": "1", "knowledge_boundary": 5}', (2, 1, 5)),
    ("**In character**: 5/5\n- Voice: 2.\n1. Knowledge-boundary = 4", (5, 2, 4)),
    ("Grades:\n  IN_CHARACTER: 3 (a slip)\n  knowledge boundary: 1", (3, None, 1)),  # partial: voice missing
    ("in_character: 4.5\nvoice: 10\nknowledge_boundary: 0", (None, None, None)),  # not whole, not 1-5
    ("voice: 3\nvoice: 4\nin_character: 2\nin_character: 2", (2, None, None)),  # two different grades: none
    ("in_character: <grade>\nvoice: five", (None, None, None)),
    ("I would give it 4 for character and 3 for the voice, 5 overall.", (None, None, None)),  # no named line
    ("my voice: 3, they said", (None, None, None)),  # a dimension's name inside a sentence is not a grade
    ("", (None, None, None)),
])
def test_grades_are_read_from_lines_or_json_and_never_guessed(answer, grades):
    assert rubric.parse(answer) == dict(zip(RUBRIC_DIMENSIONS, grades, strict=True))


def test_kappa_and_agreement_on_known_inputs_and_against_sklearn():
    from sklearn.metrics import cohen_kappa_score

    # 3 of 4 agree; each says yes to 1/2 and 1/4: chance agrees 1/8 + 3/8 = 1/2, so kappa (3/4 - 1/2) / (1/2)
    assert rubric.agreement([True, True, False, False], [True, False, False, False]) == (0.75, 0.5)
    assert rubric.agreement([True, False], [False, True]) == (0.0, -1.0)
    assert rubric.agreement([True, False, True], [True, False, True]) == (1.0, 1.0)
    # both say yes to everything: chance agrees on all, kappa is undefined; one rater constant: 0
    assert rubric.agreement([True] * 3, [True] * 3) == (1.0, None)
    assert rubric.agreement([True, True, True, True], [True, True, False, True]) == (0.75, 0.0)
    assert rubric.agreement([], []) == (None, None)
    draw = random.Random(3)
    for _ in range(20):
        n = draw.randint(2, 30)
        first, second = ([draw.random() < p for _ in range(n)] for p in (draw.random(), draw.random()))
        if len(set(first)) == len(set(second)) == 1 and first[0] == second[0]:
            continue
        assert rubric.kappa(first, second) == pytest.approx(cohen_kappa_score(first, second), abs=1e-12)


def test_the_grading_prompt_holds_the_card_the_rubric_the_question_and_the_reply():
    rules = rubric.load()
    card = ADA.teacher_system_prompt()
    system, user = rubric.messages(rules, card, "Who {are} you?", "I am Ada, and {this} is my engine.")
    assert (system["role"], user["role"]) == ("system", "user")
    assert card in system["content"] and "{notes}" in system["content"]
    for name, spec in rules.dimensions.items():
        assert f"{name}: {spec['what']}" in system["content"]
        assert all(f"  {grade}: {spec['scale'][grade]}" in system["content"] for grade in range(1, 6))
    assert "{card}" not in system["content"] and "{rubric}" not in system["content"]
    assert "Who {are} you?" in user["content"] and "I am Ada, and {this} is my engine." in user["content"]
    assert card not in user["content"]  # the grader's card is in its system prompt, as the teacher's was
    # the format the prompt asks for is the one parse reads
    asked = system["content"].split("nothing else:\n", 1)[1]
    assert rubric.parse(asked.replace("<grade>", "3")) == dict.fromkeys(RUBRIC_DIMENSIONS, 3)
    assert rubric.parse(asked) == dict.fromkeys(RUBRIC_DIMENSIONS)


class Fixed:
    """Stands in for a judge: says yes to the replies that hold "Ada"."""

    def says(self, replies):
        return ["Ada" in reply for reply in replies]


def test_figures_per_role_with_their_n_and_the_agreement_with_both_judges():
    replies = {"student": ["Ada speaks.", "Ada again.", "Hello."], "base": ["I am an AI.", "Hello.", "Ada?"],
               "teacher_resampled": ["Ada here.", "Ada.", "Ada, yes."]}
    answers = {"student": ["in_character: 5\nvoice: 4\nknowledge_boundary: 5", "in_character: 3\nvoice: 2",
                           "no grades at all"],
               "base": ["in_character: 1\nvoice: 1\nknowledge_boundary: 2", "in_character: 2\nvoice: 1\n"
                        "knowledge_boundary: 3", "in_character: 4\nvoice: 3\nknowledge_boundary: 4"],
               "teacher_resampled": ["in_character: 5\nvoice: 5\nknowledge_boundary: 5"] * 3}
    rows = [{"id": str(i), "prompt": f"question {i}"} for i in range(3)]
    graded = rubric.Graded(rows, Measured(replies=replies, rubric=answers), Fixed(), Fixed())
    figures = graded.figures()
    assert set(figures) == set(OPTIONAL_KEYS)
    assert (figures["rubric_in_character_student"], figures["rubric_voice_student"],
            figures["rubric_knowledge_boundary_student"]) == (4.0, 3.0, 5.0)  # over the grades read
    assert (figures["rubric_graded_student"], figures["rubric_unread_student"]) == (1, 4)
    assert figures["rubric_in_character_base"] == pytest.approx(7 / 3) and figures["rubric_graded_base"] == 3
    assert figures["rubric_voice_teacher_resampled"] == 5.0 and figures["rubric_unread_teacher_resampled"] == 0
    # 8 replies with an in_character grade; in character (4+): the student's first, the base's third, the three
    # teacher's (5 of 8); the judges say yes to the 6 "Ada" replies and disagree on the student's second only: 7/8
    # agree, chance 5/8 * 6/8 + 3/8 * 2/8 = 9/16, kappa (7/8 - 9/16) / (7/16) = 5/7
    assert figures["rubric_compared"] == 8
    assert figures["rubric_agreement_embedding"] == figures["rubric_agreement_lexical"] == 7 / 8
    assert figures["rubric_kappa_embedding"] == figures["rubric_kappa_lexical"] == pytest.approx(5 / 7)
    recorded = record({**dict.fromkeys(KEYS, 0.5), **figures})  # registered, and rounded as their units say
    assert list(recorded) == [*KEYS, *OPTIONAL_KEYS] and recorded["rubric_in_character_base"] == 2.33
    table = markdown_table(figure_rows(recorded))
    assert all(metric.label in table for metric in OPTIONAL)
    assert not any(metric.label in markdown_table(figure_rows(dict.fromkeys(KEYS, 0.5))) for metric in OPTIONAL)
    with pytest.raises(ValueError, match="not computed"):  # all of the optional figures, or none
        record({**dict.fromkeys(KEYS, 0.5), "rubric_compared": 3})
    row = graded.rows()[1]
    assert row["student"] == {"reply": "Ada again.", "answer": "in_character: 3\nvoice: 2",
                              "grades": {"in_character": 3, "voice": 2, "knowledge_boundary": None},
                              "in_character": False, "embedding_judge": True, "lexical_judge": True}
    assert graded.rows()[2]["student"]["in_character"] is None


# the phases up to evaluate, in this process, on the ci profile and the tiny model: training as short as it goes
RUN = ("train.steps=1", "train.checkpoint_every=1", "train.val_every=1", "evaluate.rubric_judge=true")


@pytest.fixture(scope="module")
def evaluated(s3_server):  # it puts its address in the environment for the session
    from jobs.phases import audit, evaluate, ingest, split, teacher, train

    config = phase_config("rubric-judge", *RUN)
    ingest.main(config)
    for shard in config.store.require("ingest")["metrics"]["shards"]:
        teacher.main(dataclasses.replace(config, shard=shard))
    for phase in (audit, split, train, evaluate):
        phase.main(config)
    store = config.store
    return {"config": config, "metrics": store.read_json("evaluate", "metrics.json"),
            "rows": store.read_jsonl("evaluate", "rubric.jsonl"), "replies": store.read_jsonl("evaluate",
                                                                                            "replies.jsonl"),
            "card": CharacterCard.model_validate(store.read_json("ingest", "card.json"))}


def test_evaluate_with_the_rubric_judge_writes_its_figures_with_their_n(evaluated):
    figures, rows, replies = evaluated["metrics"], evaluated["rows"], evaluated["replies"]
    assert set(OPTIONAL_KEYS) <= set(figures) and set(KEYS) <= set(figures)
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in replies] and rows
    for role in ROLES:
        assert [row[role]["reply"] for row in rows] == [row[role] for row in replies]
        grades = [rubric.parse(row[role]["answer"]) for row in rows]
        assert [row[role]["grades"] for row in rows] == grades
        assert figures[f"rubric_graded_{role}"] == sum(None not in g.values() for g in grades)
        unread = sum(v is None for g in grades for v in g.values())
        assert figures[f"rubric_unread_{role}"] == unread
        assert 0 <= unread <= len(RUBRIC_DIMENSIONS) * len(rows)
        for dimension in RUBRIC_DIMENSIONS:
            read = [g[dimension] for g in grades if g[dimension] is not None]
            mean = figures[f"rubric_{dimension}_{role}"]
            assert (mean is None) == (not read) and (mean is None or 1 <= mean <= 5)
    compared = sum(row[role]["in_character"] is not None for row in rows for role in ROLES)
    assert figures["rubric_compared"] == compared
    for judge in ("embedding", "lexical"):
        agreeing = [row[role]["in_character"] == row[role][f"{judge}_judge"] for row in rows for role in ROLES
                    if row[role]["in_character"] is not None]
        share = figures[f"rubric_agreement_{judge}"]
        assert share == (round(sum(agreeing) / compared, 4) if compared else None)
    # the report's table shows them (the same rows as the model card's)
    assert "rubric judge (the teacher model grades, 1-5): in character" in markdown_table(figure_rows(figures))
    # the judges' per-reply decisions are the figures' shares: the student's embedding-judge share
    said = [row["student"]["embedding_judge"] for row in rows]
    assert figures["in_character_student"] == round(sum(said) / len(said), 4)


def test_tinker_stand_in_grades_as_the_local_engine(evaluated, tinker_server, monkeypatch):
    """The grading chats of the evaluate run above, through the `tinker` backend against the stand-in (float32,
    greedy): the same answers the local engine gave in evaluate."""
    from jobs.backends.tinker_backend import TinkerBackend

    for key, value in tinker_server.env().items():
        monkeypatch.setenv(key, value)
    config, rows = evaluated["config"], evaluated["rows"]
    backend = TinkerBackend(config.pipeline.model, TinkerConfig(base_url=tinker_server.base_url))
    client = Metered(backend.sampler())
    system = evaluated["card"].teacher_system_prompt()
    ctx = Context(config, dataclasses.replace(EMPTY_PROMPTS, system=system), [], [],
                  Measured(replies={role: [row[role]["reply"] for row in rows] for role in ROLES}), None,
                  [row["prompt"] for row in rows])
    steps: list[int] = []
    answers = rubric.grade_replies(client, ctx, steps.append)["rubric"]
    assert sum(steps) == rubric.steps(ctx) == len(ROLES) * len(rows)
    for role in ROLES:
        assert answers[role] == [row[role]["answer"] for row in rows], role
        assert any(answer.strip() for answer in answers[role])  # the tiny model says something, if no grade
