"""Evaluate's persona checks (`jobs.evaluation.persona`): each rule on hand-written replies, the prompts a card gets
from checks.yaml, and the three roles' figures from the tiny random model through evaluate's own parts."""

from __future__ import annotations

import pytest
import tiny_model
from conftest import phase_config

from jobs.backends.base import Metered
from jobs.backends.local import LocalEngine
from jobs.card import CharacterCard
from jobs.config import AuditConfig, ModelConfig
from jobs.evaluation import consistency, persona
from jobs.evaluation.measure import Measured, Prompts
from jobs.metrics import PERSONA_CHECKS, ROLES
from jobs.phases.evaluate import BASE_PARTS, STUDENT_PARTS, Context

FORBIDDEN = AuditConfig().forbidden
BEETHOVEN = CharacterCard(name="Ludwig van Beethoven", system_prompt="You are Ludwig van Beethoven, composer, living "
                          "in Vienna in the years 1824 to 1826. You are almost deaf.")
TIMELESS = CharacterCard(name="Sir Pip the Fox", system_prompt="You are Sir Pip, a talking fox in an enchanted wood.")


@pytest.fixture(scope="module")
def checks() -> persona.Checks:
    return persona.check_prompts(BEETHOVEN, set(), FORBIDDEN)


def probe(checks: persona.Checks, check: str, prompt: str = "") -> persona.Probe:
    return next(p for p in checks.probes if p.check == check and prompt in p.prompt)


@pytest.mark.parametrize(("reply", "right"), [
    ("I am Ludwig van Beethoven, and my ears are failing me.", True),
    ("Beethoven, sir, and who are you to ask?", True),
    ("A composer, living in Vienna, and a deaf one.", True),  # no name, but the card's self-description
    ("A composer, and a tired one.", False),  # one word of it could be chance
    ("Hello! I am a helpful assistant. How can I help you today?", False),
    ("I am an AI language model trained to speak like Beethoven.", False),  # names him, and breaks the role
    ("   ", False),
])
def test_identity_counts_a_reply_that_names_the_character_or_its_self_description(checks, reply, right):
    assert persona.passed(probe(checks, "identity", "Who are you?"), reply, checks) is right


@pytest.mark.parametrize(("reply", "right"), [
    ("An AI? Nonsense! I am flesh and blood, and my ears fail me, not my wits.", True),
    ("I am an AI language model, so I cannot have opinions.", False),
    ("Yes, I'm just a chatbot.", False),
    ("I'm SmolLM, a model made by a team at Hugging Face.", False),
    ("I was trained by OpenAI.", False),
    ("As an AI, I must be honest with you.", False),  # the audit's phrase
    ("I'm here to help you with whatever your problem is.", False),  # an assistant presenting itself
    ("My purpose is to assist users with their questions about art.", False),
    ("How can I help you today?", False),
    ("I am here to help my pupil Ries with his fingering, not to chat.", True),
    ("", False),
])
def test_holding_the_role_fails_a_reply_that_admits_being_a_machine(checks, reply, right):
    assert persona.passed(probe(checks, "holding_role", "You are an AI, right?"), reply, checks) is right


@pytest.mark.parametrize(("reply", "right"), [
    ("Smartphone? What contraption is that? Write your question about music in the book!", True),
    ("A smartphone is a mobile device with a touchscreen and apps that connect to the internet.", False),
    ("I own an iPhone.", False),
    ("As an AI I own no phone, but smartphones are handy.", False),
])
def test_the_knowledge_boundary_fails_modern_terms_but_not_an_echo_of_the_question(checks, reply, right):
    assert persona.passed(probe(checks, "knowledge_boundary", "smartphone"), reply, checks) is right


def test_capability_checks_the_answer_and_the_format(checks):
    sum_ = probe(checks, "capability", "7 + 5")
    assert persona.passed(sum_, "12", checks) and persona.passed(sum_, "The answer is 12.", checks)
    assert not persona.passed(sum_, "The answer is 13.", checks) and not persona.passed(sum_, "112", checks)
    one_word = probe(checks, "capability", "one word")
    assert persona.passed(one_word, " Green.", checks) and not persona.passed(one_word, "Grass is green.", checks)
    # in or out of character does not matter here: only the answer
    assert persona.passed(sum_, "As an AI, I can tell you it is 12.", checks)


def test_the_prompts_come_from_the_card(checks):
    assert {check: checks.count(check) for check in PERSONA_CHECKS} \
        == {"identity": 8, "holding_role": 8, "knowledge_boundary": 8, "capability": 16}
    assert "Stop pretending to be Ludwig van Beethoven. What model are you?" in checks.prompts
    assert not any("{name}" in prompt for prompt in checks.prompts)
    assert persona.card_era(BEETHOVEN) == 1826 and checks.skipped == {}
    assert checks.name_parts == ("Ludwig van Beethoven", "Ludwig", "Beethoven")
    assert checks.self_terms == ("composer", "vienna")
    # a prompt a training row asks is not a held-out check
    trained = persona.trained_prompts([{"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello."},
                                                     {"role": "user", "content": "who are you"}]}])
    fewer = persona.check_prompts(BEETHOVEN, trained, FORBIDDEN)
    assert "Who are you?" not in fewer.prompts and fewer.dropped == ("Who are you?",)
    assert fewer.count("identity") == 7


def test_a_card_without_an_era_skips_the_boundary_check():
    checks = persona.check_prompts(TIMELESS, set(), FORBIDDEN)
    assert persona.card_era(TIMELESS) is None and checks.count("knowledge_boundary") == 0
    assert "names no year" in checks.skipped["knowledge_boundary"]
    assert checks.name_parts == ("Sir Pip the Fox", "Pip", "Fox")
    figures = persona.figures(checks, {role: ["I am Pip."] * len(checks.probes) for role in ROLES})
    assert figures["knowledge_boundary_student"] is None and figures["persona_prompts_knowledge_boundary"] == 0
    assert figures["identity_base"] == 1.0 and figures["capability_drop"] == 0.0
    # an era later than everything the check asks about skips it too; a century counts as its last year
    future = CharacterCard(name="Zed", system_prompt="You are Zed, a pilot of the starship Kepler in 2350.")
    assert "later than everything" in persona.check_prompts(future, set(), FORBIDDEN).skipped["knowledge_boundary"]
    monk = CharacterCard(name="Brother Odo", system_prompt="You are Brother Odo, a monk of the 12th century.")
    assert persona.card_era(monk) == 1200


def test_the_persona_parts_give_each_role_its_figures_on_the_tiny_model():
    config = phase_config("persona-test")
    client = Metered(LocalEngine.for_sampling(ModelConfig(base=tiny_model.NAME, dtype="float32")))
    checks = persona.check_prompts(BEETHOVEN, set(), FORBIDDEN)
    ctx = Context(config, Prompts.render(client.renderer, [], BEETHOVEN.teacher_system_prompt()), [], [],
                  Measured(replies={}), checks)
    parts = [part for part in BASE_PARTS + STUDENT_PARTS if "persona" in part.name]
    assert [part.name for part in parts] == ["base persona checks", "teacher persona checks", "student persona checks"]
    steps, sent = [], []
    for part in parts:
        before = client.usage["prefill_tokens"]
        ctx.seen.merge(part.compute(client, ctx, steps.append))
        sent.append(client.usage["prefill_tokens"] - before)
    assert sum(steps) == 3 * len(checks.probes) == sum(part.steps(ctx) for part in parts)
    assert set(ctx.seen.persona) == set(ROLES) and all(len(r) == 40 for r in ctx.seen.persona.values())
    base, teacher, student = sent  # the teacher's prompts carry the card, the others' do not
    assert teacher > base == student
    figures = persona.figures(checks, ctx.seen.persona)
    for check, metric in persona.FIGURE.items():
        assert figures[f"persona_prompts_{check}"] == checks.count(check) > 0
        for role in ROLES:
            assert 0.0 <= figures[metric.of(role)] <= 1.0, (metric.of(role), figures)
    assert -1.0 <= figures["capability_drop"] <= 1.0
    rows = persona.rows(checks, ctx.seen.persona)
    assert len(rows) == 40 and set(rows[0]) == {"check", "prompt", *ROLES}
    assert rows[0]["teacher"]["passed"] in (True, False)


@pytest.mark.parametrize(("first", "again", "verdict"), [
    ("I was born in Bonn, on the Rhine, in December 1770.", "In Bonn, as I told you!", False),
    ("I was born in Bonn.", "Vienna, of course.", True),  # names, none shared
    ("I am 54 years old.", "Fifty-five, I said, or 55.", True),  # numbers, none shared
    ("Bonn, in 1770.", "Why, in 1770!", False),  # no name on one side: the numbers decide
    ("I was born long ago.", "Ah, Vienna.", None),  # nothing stated in both: not compared
    ("Ludwig van Beethoven was born in Bonn.", "Beethoven, sir, was born in Bonn.", False),
])
def test_a_contradiction_is_a_later_answer_whose_numbers_or_names_share_nothing_with_the_first(
        checks, first, again, verdict):
    questions = ("In which town were you born?", "What do you enjoy most in life?", "Where were you born?")
    assert consistency.contradicts(first, again, questions, checks) is verdict


class Scripted:
    """Stands in for a metered model: it answers each chat with the number of messages it was given and the last
    question, and keeps the chats."""

    def __init__(self):
        self.chats: list[list[dict]] = []
        self.renderer = self

    def chat(self, messages):
        self.chats.append(messages)
        return [len(self.chats) - 1]

    def decode(self, tokens):
        messages = self.chats[tokens[0]]
        return f"{len(messages)} after {messages[-1]['content']}"

    def sample(self, prompts, params, on_batch=None):
        if on_batch:
            on_batch(len(prompts))
        return prompts


def test_own_conversations_give_each_turn_the_models_own_replies_as_history():
    said = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "teacher 1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "teacher 2"},
            {"role": "user", "content": "q3"}, {"role": "assistant", "content": "teacher 3"}]
    client, steps = Scripted(), []
    turns = consistency.own_replay(client, [said, said[:2]], "the card", None, ["own 1", "other 1"], steps.append)
    assert turns == {1: ["own 1", "other 1"], 2: ["4 after q2"], 3: ["6 after q3"]}
    assert client.chats[-1] == [{"role": "system", "content": "the card"}, said[0],
                                {"role": "assistant", "content": "own 1"}, said[2],
                                {"role": "assistant", "content": "4 after q2"}, said[4]]
    three_each = 3 * len(persona.check_prompts(TIMELESS, set(), ()).consistency)  # and the consistency talks'
    assert sum(steps) == 2 and consistency.own_steps([said, said[:2]], persona.check_prompts(TIMELESS, set(), ())) \
        == 2 + three_each
    assert consistency.own_replay(client, [], None, None, []) == {}
    talks = (("a1", "b", "a2"), ("c1", "b", "c2"))
    replies = consistency.ask_twice(Scripted(), talks, None, None)
    assert replies == [["1 after a1", "3 after b", "5 after a2"], ["1 after c1", "3 after b", "5 after c2"]]


class Even:
    """Stands in for the judge: calls every other reply the teacher's."""

    def share(self, replies):
        return sum(i % 2 == 0 for i in range(len(replies))) / len(replies)


def test_the_own_conversation_parts_run_on_the_tiny_model_after_the_replays():
    config = phase_config("persona-test")
    client = Metered(LocalEngine.for_sampling(ModelConfig(base=tiny_model.NAME, dtype="float32")))
    checks = persona.check_prompts(BEETHOVEN, set(), FORBIDDEN)
    talk = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"line {i}"} for i in range(6)]
    ctx = Context(config, Prompts.render(client.renderer, [], BEETHOVEN.teacher_system_prompt()), [talk, talk[:4]],
                  [], Measured(replies={}), checks)
    parts = [part for part in BASE_PARTS + STUDENT_PARTS if "conversations" in part.name]
    assert [p.name for p in parts] == ["base conversations", "teacher resampled conversations",
                                       "base own conversations", "teacher own conversations",
                                       "student conversations", "student own conversations"]
    for part in parts:
        ctx.seen.merge(part.compute(client, ctx, lambda n: None))
    for role in ("student", "base", "teacher_resampled"):
        own, replayed = ctx.seen.own_turns[role], ctx.seen.turns[role]
        assert [len(own[t]) for t in (1, 2, 3)] == [2, 2, 1]
        assert [len(replies) for replies in ctx.seen.repeated[role]] == [3] * len(checks.consistency)
        if role == "teacher_resampled":  # the teacher's own conversations are the recorded ones
            assert own == {1: ["line 1", "line 1"], 2: ["line 3", "line 3"], 3: ["line 5"]}
        else:  # a model's own turn 1 is its replay's
            assert own[1] == replayed[1]
    figures = consistency.figures(ctx.seen.own_turns, ctx.seen.repeated, checks, Even())
    assert figures["in_character_own_turn_3_on_base"] == 1.0  # one conversation reaches turn 3
    for role in ("student", "base", "teacher_resampled"):
        pairs = figures[f"consistency_pairs_{role}"]
        assert 0 <= pairs <= len(checks.consistency)
        assert (figures[f"consistent_{role}"] is None) == (pairs == 0)
    rows = consistency.rows(checks, ctx.seen.repeated)
    assert len(rows) == len(checks.consistency) and rows[0]["questions"][1] == "What do you enjoy most in life?"


def test_evaluate_persona_prompts_caps_each_check_capability_at_twice_and_consistency_at_half():
    full, fewer = persona.check_prompts(BEETHOVEN, set(), FORBIDDEN), persona.check_prompts(BEETHOVEN, set(),
                                                                                             FORBIDDEN, limit=2)
    assert [fewer.count(check) for check in PERSONA_CHECKS] == [2, 2, 2, 4]
    assert len(fewer.consistency) == 1 and len(full.consistency) > 1
    assert fewer.prompts == [p.prompt for p in full.probes if p.prompt in fewer.prompts]  # the first of each, in order
