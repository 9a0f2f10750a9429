"""A lorebook's keyed entries in every pass of the teacher, not only its sampling: the records name each turn's
entries (`jobs.records.LOREBOOK_ENTRIES`), `jobs.lorebook.turn_systems` rebuilds the system message the teacher
sampled with, the logit objective's targets and on_policy's scores read each turn under its own system message
(`jobs.distill.pair_runs`), the audit cuts the field with the turns, and ingest's room check counts the keyed
entries' budget. On the tiny model, with the keeper card (`examples/cards/keeper.v2.json`)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from card_png import EXAMPLES
from conftest import phase_config

from jobs import distill, records
from jobs.backends.local import LocalEngine
from jobs.card import read_card
from jobs.config import AuditConfig, TrainConfig
from jobs.errors import InputError
from jobs.inputs import estimate_tokens
from jobs.lorebook import Firing, turn_system, turn_systems
from jobs.objectives import Logit, OnPolicy
from jobs.phases import audit, teacher
from jobs.phases.ingest import MIN_PROMPT_TOKENS, TEMPLATE_TOKENS, prompt_room

KEEPER = json.loads((EXAMPLES / "keeper.v2.json").read_text())
# no key at turn 1; the lamp at turn 1 (and it stays); the visitor's question fires the fog signal at turn 2
PROMPTS = [{"id": "q-cold", "prompt": "Is it cold out here in winter?"},
           {"id": "q-lamp", "prompt": "How do you trim the lamp at night?"}]
QUESTION = "Did the fog ever stop your light?"
LAMP, FOG = 2, 3  # the entries' positions in the card's character_book.entries
K = 8


def keeper(book: dict | None = None):
    """The keeper card, with `book` as its character_book (None: without one)."""
    data = {key: value for key, value in KEEPER["data"].items() if key != "character_book"}
    if book is not None:
        data["character_book"] = book
    return read_card(json.dumps({"spec": "chara_card_v2", "data": data}).encode(), "keeper.json").card


@pytest.fixture(scope="module")
def engine():
    config = phase_config("lorebook-passes")
    return LocalEngine.for_sampling(config.pipeline.model.model_copy(update={"dtype": "float32"}))


def conversations(engine, card) -> tuple[list[dict], dict[str, list[str]], list[list[list[int]]]]:
    """The teacher's records of PROMPTS (two turns each, the visitor asking QUESTION), the system messages
    `Firing.system` gave each conversation turn by turn, and the teacher's prompts call by call."""
    config = phase_config("lorebook-passes", "conversations.share=1", "conversations.turns=2",
                          "teacher.max_new_tokens=8", "teacher.temperature=0")
    render = engine.renderer
    sent: list[list[list[int]]] = []
    sampled: dict[str, list[str]] = {}

    class Scripted:  # the engine for the teacher, a fixed question for the visitor
        renderer = render

        def sample(self, prompts, params, on_batch=None):
            if "curious visitor" in render.decode(prompts[0]):
                return [render.reply(QUESTION) for _ in prompts]
            sent.append(prompts)
            return engine.sample(prompts, params, on_batch=on_batch)

    original = Firing.system

    def recording(self, shared, conversation, messages):
        text, entries = original(self, shared, conversation, messages)
        sampled.setdefault(conversation, []).append(text)
        return text, entries

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Firing, "system", recording)
        rows = teacher.generate(config, Scripted(), card.teacher_system_prompt(), PROMPTS, card.name, card.lorebook)
    return rows, sampled, sent


@pytest.fixture(scope="module")
def with_book(engine):
    card = keeper(KEEPER["data"]["character_book"])
    return card, *conversations(engine, card)


def test_records_name_each_turns_entries_and_the_rebuilt_system_is_the_sampled_one(engine, with_book):
    card, rows, sampled, sent = with_book
    cold, lamp = rows
    assert [e.label for e in (card.lorebook.entries[LAMP], card.lorebook.entries[FOG])] \
        == ["the lamp and lens", "the fog signal"]
    assert cold[records.LOREBOOK_ENTRIES] == [[], [FOG]]  # the key fires at turn 2
    assert lamp[records.LOREBOOK_ENTRIES] == [[LAMP], [LAMP, FOG]]  # the lamp stays, the fog joins it
    assert records.checked(cold, "here") is cold
    shared = card.teacher_system_prompt()
    for row in rows:
        rebuilt = turn_systems(shared, card.lorebook, row)
        assert rebuilt == sampled[row["id"]] and len(set(rebuilt)) == 2
        # the teacher's prompt of turn 2 is the rebuilt system message and the conversation before the reply
        asked = engine.renderer.chat([{"role": "system", "content": rebuilt[1]}, *row["messages"][:3]])
        assert asked in sent[1]
    assert turn_systems(shared, card.lorebook, cold)[0] == shared  # no entry: the shared text, byte for byte
    # the shard's figures, replayed from the messages, agree with the entries the records name
    named = Counter(card.lorebook.entries[i].label for row in rows for ids in row[records.LOREBOOK_ENTRIES]
                    for i in ids)
    assert {label: n for label, n in teacher.fired_counts(card.lorebook, rows).items() if n} == named


def test_the_audit_cuts_the_entries_with_the_turns():
    row = records.opened("a-1", "Is it cold here?", "Bitter in winter.", 4, True, lorebook_entries=[])
    records.add_turn(row, QUESTION, "Once, for sixty-one hours.", 7, True, lorebook_entries=[FOG])
    records.add_turn(row, "And the lamp?", "As an AI, I cannot say.", 8, True, lorebook_entries=[LAMP, FOG])
    assert records.problem(row) is None
    reason, kept, lost = audit.judge(row, AuditConfig(), set())
    assert reason is None and kept["turns"] == 2 and kept["cut_at"] == 3  # out of character at turn 3
    assert kept[records.LOREBOOK_ENTRIES] == [[], [FOG]] and records.problem(kept) is None
    assert [turn[records.LOREBOOK_ENTRIES] for turn in lost] == [[LAMP, FOG]]
    assert records.first_turn(row)[records.LOREBOOK_ENTRIES] == [[]]
    assert "one entry per assistant turn" in records.problem({**row, records.LOREBOOK_ENTRIES: [[], [FOG]]})
    assert "entry positions" in records.problem({**row, records.LOREBOOK_ENTRIES: [[], ["fog"], []]})
    with pytest.raises(ValueError, match="lorebook entries go with a record that carries them"):
        records.add_turn(row, "More?", "No.", 1, True)  # a lorebook card's turn without its entries


def test_a_rebuilt_system_refuses_entries_the_card_does_not_have(with_book):
    card, *_ = with_book
    for ids in ([0], [99], [8]):  # a constant entry, none, a disabled one
        with pytest.raises(InputError, match="not keyed entries of the card's lorebook"):
            turn_system("CARD", card.lorebook, ids)
    _, (cold, _), _, _ = with_book
    old = {key: value for key, value in cold.items() if key != records.LOREBOOK_ENTRIES}
    with pytest.raises(InputError, match="start a new run id"):
        turn_systems("CARD", card.lorebook, old)


def turn_rows(top: distill.TopK, first: int, count: int) -> tuple[list, list]:
    return top.ids[first:first + count], top.logprobs[first:first + count]


def test_the_logit_targets_of_each_turn_come_from_its_own_system_message(engine, with_book):
    card, (cold, _), _, _ = with_book
    render, messages = engine.renderer, cold["messages"]
    shared = card.teacher_system_prompt()
    first, second = turn_systems(shared, card.lorebook, cold)
    assert first == shared and second != shared
    one = len(render.reply(messages[1]["content"]))  # turn 1's assistant positions (its end-of-turn included)
    two = len(render.reply(messages[3]["content"]))
    runs = distill.pair_runs(render, messages, [first, second])
    assert len(runs) == 2 and [len(p.student_positions) for p in runs] == [one, two]
    target = distill.teacher_topk_runs(engine, [runs], K)[0]
    assert len(target.ids) == one + two
    # by hand: turn 1 with its system and the conversation's start, turn 2 with its own system
    by_turn_1 = distill.teacher_topk(engine, [distill.pair(render, messages[:2], first)], K)[0]
    by_turn_2 = distill.teacher_topk(engine, [distill.pair(render, messages, second)], K)[0]
    alone = distill.teacher_topk(engine, [distill.pair(render, messages, shared)], K)[0]
    for got, expected in ((turn_rows(target, 0, one), turn_rows(by_turn_1, 0, one)),
                          (turn_rows(target, one, two), turn_rows(by_turn_2, one, two))):
        assert got[0] == expected[0]
        assert [v for row in got[1] for v in row] == pytest.approx([v for row in expected[1] for v in row], abs=1e-4)
    # the shared system alone gives turn 2 other targets: not the distribution its reply was sampled from
    shared_two = turn_rows(alone, one, two)
    assert max(abs(a - b) for got, exp in zip(turn_rows(target, one, two)[1], shared_two[1], strict=True)
               for a, b in zip(got, exp, strict=True)) > 1e-2
    # the objective's data: the same targets at the student's positions of turn 2
    objective = Logit([cold], TrainConfig(objective="logit", top_k=K), shared, card.lorebook)
    objective.prepare(engine)
    datum = objective.data[0]
    positions = runs[1].student_positions
    assert [datum.candidates[i] for i in positions] == target.ids[one:]
    assert [p for i in positions for p in datum.probs[i]] \
        == pytest.approx([math.exp(v) for row in target.logprobs[one:] for v in row], abs=1e-6)


class Rollouts:
    """The student and the teacher on_policy talks to, recording what the teacher scores: every reply is REPLY."""

    REPLY = (42, 43, 44)

    def __init__(self, renderer):
        self.renderer, self.scored = renderer, []

    def sampler(self):
        return self

    def sample(self, prompts, params, on_batch=None):
        return [list(self.REPLY) for _ in prompts]

    def compute_logprobs(self, sequences):
        self.scored += sequences
        return [[0.0] * len(s) for s in sequences]


def test_on_policy_scores_a_rollout_with_the_system_message_of_the_turn_it_answers(engine, with_book):
    card, rows, _, _ = with_book
    shared = card.teacher_system_prompt()
    student, scorer = Rollouts(engine.renderer), Rollouts(engine.renderer)
    objective = OnPolicy(rows, TrainConfig(objective="on_policy", rollout_tokens=8), shared, card.lorebook)
    objective.start(student, scorer)
    objective.batch([0, 1], 0)
    for row, scored in zip(rows, scorer.scored, strict=True):
        last = turn_systems(shared, card.lorebook, row)[-1]
        prompt = engine.renderer.chat([{"role": "system", "content": last}, *row["messages"][:-1]])
        assert scored[:len(prompt)] == prompt and card.lorebook.entries[FOG].text in last


def test_a_card_without_a_lorebook_keeps_its_records_and_targets(engine):
    card = keeper(None)
    assert card.lorebook is None
    rows, sampled, _ = conversations(engine, card)
    shared = card.teacher_system_prompt()
    for row in rows:
        assert records.LOREBOOK_ENTRIES not in row and records.per_turn(row) == records.PER_TURN
        assert turn_systems(shared, None, row) == sampled[row["id"]] == [shared, shared]
    # the logit targets: one pass with the shared system, as before there were per-turn systems
    objective = Logit(rows, TrainConfig(objective="logit", top_k=K), shared, None)
    objective.prepare(engine)
    pairs = [distill.pair(engine.renderer, row["messages"], shared) for row in rows]
    before = distill.teacher_topk(engine, pairs, K)
    for datum, paired, target in zip(objective.data, pairs, before, strict=True):
        assert datum == distill.soft_datum(paired, target, objective.train.max_seq_len)


def test_ingest_counts_the_keyed_entries_budget_in_the_room_it_leaves():
    card = keeper(KEEPER["data"]["character_book"])
    constants_only = keeper({**KEEPER["data"]["character_book"],
                             "entries": [e for e in KEEPER["data"]["character_book"]["entries"] if e.get("constant")]})
    keyed = card.lorebook.keyed_room()
    assert 0 < keyed <= card.lorebook.budget and constants_only.lorebook.keyed_room() == 0
    assert card.teacher_system_prompt() == constants_only.teacher_system_prompt()
    base = phase_config("lorebook-room").pipeline
    needed = (estimate_tokens(card.teacher_system_prompt()) + keyed + base.teacher.max_new_tokens + TEMPLATE_TOKENS
              + MIN_PROMPT_TOKENS)
    fits = phase_config("lorebook-room", f"model.context_tokens={needed}")
    assert prompt_room(fits, card) == MIN_PROMPT_TOKENS
    short = phase_config("lorebook-room", f"model.context_tokens={needed - 1}")
    with pytest.raises(InputError, match=f"and up to {keyed} more of its lorebook's keyed entries") as caught:
        prompt_room(short, card)
    assert "too long for model.context_tokens" in str(caught.value)
    # the same card without its keyed entries fits that context
    assert prompt_room(short, constants_only) == MIN_PROMPT_TOKENS + keyed - 1
