"""The metric registry (`jobs.metrics`), evaluate's figure functions and the figure table that the report and the
model card share, on made-up values: no model runs here."""

from __future__ import annotations

import html
import itertools
import re

import pytest
from conftest import phase_config

from jobs.backends.base import SamplingParams
from jobs.card import CharacterCard
from jobs.evaluation import consistency, measure, persona
from jobs.evaluation import figures as evaluate_figures
from jobs.metrics import (
    COST_PER_REQUEST,
    KEYS,
    KL_CLOSED,
    LATENCY,
    METRICS,
    NLL,
    REPLY_TOKENS,
    SIMILARITY,
    TOKEN_REDUCTION,
    Row,
    figure_rows,
    markdown_table,
    record,
)
from jobs.page import to_html, to_markdown
from jobs.phases import export, report

# the keys of evaluate's metrics.json that the rest of the pipeline, the DAG and the report's comparison of runs
# read (nll_gap_closed is gone: it was not bounded, so it did not mean what its name said; kl_closed replaces it)
EXPECTED_KEYS = {
    "similarity_student", "similarity_base", "similarity_teacher_resampled", "persona_similarity_student",
    "persona_similarity_base", "persona_similarity_teacher", "out_of_character_student", "out_of_character_base",
    "out_of_character_teacher", "in_character_student", "in_character_base", "in_character_teacher_resampled",
    "in_character_turn_1_student", "in_character_turn_1_base", "in_character_turn_1_teacher_resampled",
    "in_character_turn_3_on_student", "in_character_turn_3_on_base", "in_character_turn_3_on_teacher_resampled",
    "judge_accuracy", "judge_accuracy_turn_1", "judge_accuracy_turn_3_on", "in_character_lexical_student",
    "in_character_lexical_base",
    "in_character_lexical_teacher_resampled", "lexical_judge_accuracy", "kl_student", "kl_base", "kl_closed",
    "nll_student", "nll_base", "nll_teacher",
    "prompt_tokens_with_card", "prompt_tokens_without_card", "token_reduction", "reply_tokens",
    "cost_per_request_with_card", "cost_per_request_without_card", "cost_ratio", "prompt_cost_ratio",
    "latency_with_card_s", "latency_without_card_s", "latency_ratio", "prefill_with_card_s", "prefill_without_card_s",
    "prefill_ratio",
    "identity_student", "identity_base", "identity_teacher", "holds_role_student", "holds_role_base",
    "holds_role_teacher", "knowledge_boundary_student", "knowledge_boundary_base", "knowledge_boundary_teacher",
    "capability_student", "capability_base", "capability_teacher", "capability_drop", "persona_prompts_identity",
    "persona_prompts_holding_role", "persona_prompts_knowledge_boundary", "persona_prompts_capability",
    "in_character_own_turn_3_on_student", "in_character_own_turn_3_on_base",
    "in_character_own_turn_3_on_teacher_resampled", "consistent_student", "consistent_base",
    "consistent_teacher_resampled", "consistency_pairs_student", "consistency_pairs_base",
    "consistency_pairs_teacher_resampled"}
# a value for each unit, most with more digits than metrics.json keeps
BY_UNIT = {"cosine": 0.81234, "share": 0.125, "nats/token": 1.23456, "tokens": 1234.56, "x": 2.34567,
           "s": 0.123456, "$": 0.0000412345, "prompts": 8}


def made_up(**changed: float | None) -> dict[str, float | None]:
    figures = {key: BY_UNIT[metric.unit.name] for metric in METRICS for key in metric.keys}
    return {**figures, **changed}


def test_the_registry_has_the_expected_metric_names():
    assert len(KEYS) == len(set(KEYS))
    assert set(KEYS) == EXPECTED_KEYS


def test_record_keeps_every_registered_figure_rounded_as_its_unit_says():
    recorded = record(made_up(kl_closed=None))
    assert list(recorded) == list(KEYS)
    assert recorded[SIMILARITY.of("student")] == 0.8123
    assert recorded[NLL.of("teacher")] == 1.2346
    assert recorded[REPLY_TOKENS.key] == 1234.6
    assert recorded[LATENCY.of("with_card")] == 0.1235
    assert recorded["cost_ratio"] == 2.346
    assert recorded[COST_PER_REQUEST.of("without_card")] == 0.0000412345  # dollars per request are kept whole
    assert recorded[KL_CLOSED.key] is None


def test_record_refuses_a_figure_not_registered_and_one_missing():
    with pytest.raises(ValueError, match=r"not registered \['similarity_teacher'\], not computed \[\]"):
        record(made_up(similarity_teacher=0.5))
    figures = made_up()
    del figures[TOKEN_REDUCTION.key]
    with pytest.raises(ValueError, match=r"not registered \[\], not computed \['token_reduction'\]"):
        record(figures)


def test_a_family_names_its_variants_and_refuses_others():
    assert SIMILARITY.of("teacher_resampled") == "similarity_teacher_resampled"
    assert LATENCY.of("without_card") == "latency_without_card_s"
    assert TOKEN_REDUCTION.keys == ("token_reduction",)
    with pytest.raises(KeyError, match=re.escape("similarity_{} has no variant 'teacher'")):
        SIMILARITY.of("teacher")
    with pytest.raises(KeyError, match="no variant 'student'"):
        TOKEN_REDUCTION.of("student")


def test_rows_format_each_value_by_its_unit_and_show_which_way_is_better():
    figures = made_up(similarity_student=0.9, similarity_base=0.5, out_of_character_base=0.25, kl_closed=None,
                      cost_per_request_with_card=0.00005)
    rows = {row.label: row for row in figure_rows(figures)}
    assert len(rows) == len(METRICS)
    similarity = "similarity to teacher (a second teacher sample: its own spread): student / base / teacher resampled"
    assert rows[similarity] == Row(similarity, "0.900 / 0.500 / 0.812", "cosine", "↑")
    assert rows['replies out of character ("as an AI"...): student / base / teacher'][1:] \
        == ("12.5% / 25.0% / 12.5%", "share", "↓")
    assert rows["NLL of the teacher's sampled replies: student / base / teacher"].value == "1.235 / 1.235 / 1.235"
    assert rows["KL closed: share of the base's KL to the teacher that the student removed"].value == "n/a"
    assert rows["prompt tokens per request: with card / without card"] \
        == Row("prompt tokens per request: with card / without card", "1,235 / 1,235", "tokens", "↓")
    assert rows["reply tokens per request (the teacher's)"].better == ""
    assert rows["cost per request: with card / without card"].value == "0.000050 / 0.000041"
    assert rows["cost ratio per request (with ÷ without card)"][1:] == ("2.35", "x", "↑")
    assert rows["latency per request: with card / without card"][1:] == ("0.123 / 0.123", "s", "↓")


def test_compared_runs_are_named_by_objective_steps_and_the_settings_train_recorded():
    from jobs.config import TrainConfig
    from jobs.phases.train import objective_settings

    def named(train: TrainConfig) -> str:
        metrics = {"objective": train.objective, "steps": train.steps, "settings": objective_settings(train)}
        return report.Compared("run-1", "", metrics, 1.0, {}, []).name

    assert named(TrainConfig(objective="logit", top_k=64, learning_rate=1e-3, max_seq_len=256)) \
        == "logit, 60 steps, learning rate 0.001, max seq len 256, top k 64, sampled weight 0.0 (run-1)"
    assert named(TrainConfig(objective="sft", learning_rate=2e-4)) \
        == "sft, 60 steps, learning rate 0.0002, max seq len 512 (run-1)"
    assert "warm start steps 5" in named(TrainConfig(objective="on_policy", warm_start_steps=5))
    # a run trained before the settings were recorded
    assert report.Compared("run-0", "", {"objective": "sft", "steps": 9}, 1.0, {}, []).name == "sft, 9 steps (run-0)"


def test_report_and_model_card_show_the_same_evaluate_rows():
    ev = {**record(made_up()), "eval_prompts": 8, "backend": "tinker"}
    train = {"first_loss": 3.1, "last_loss": 2.2, "first_loss_mean": 3.0, "last_loss_mean": 2.3, "val_loss_last": None,
             "steps": 12}
    rows = report.figures(train, ev, {"kept": 90, "rows_in": 96, "trimmed": 3})
    built = report.report_page("title", "notes", rows, [], [], [], [], [])
    markdown, page = to_markdown(built), to_html(built)
    card = export.model_card(phase_config("metrics-test"), "Ada Lovelace", train, ev)
    evaluate_lines = markdown_table(figure_rows(ev)).splitlines()[2:]
    assert len(evaluate_lines) == len(METRICS)
    for text in (markdown, card):
        assert [line for line in text.splitlines() if line in evaluate_lines] == evaluate_lines
    for row in figure_rows(ev):
        assert "".join(f"<td>{html.escape(cell)}</td>" for cell in row) in page
    train_line = markdown_table([report.train_loss(train)]).splitlines()[2]
    assert train_line == "| train loss, first → last step | 3.100 → 2.200 (12 steps) | nats/token | ↓ |"
    assert train_line in markdown and train_line in card
    assert "| validation loss, last | n/a | nats/token | ↓ |" in markdown
    assert "training rows kept by the audit" in markdown and "training rows kept by the audit" not in card
    assert "held-out prompts through the `tinker` backend" in card  # where evaluate ran, not always "local"


class CountingClient:
    """Stands in for a metered model: one token per reply, logprobs of -1."""

    def __init__(self):
        self.calls = 0

    def sample(self, prompts, params):
        self.calls += 1
        return [[1] for _ in prompts]

    def compute_logprobs(self, sequences):
        return [[-1.0] * (len(s) - 1) for s in sequences]


def in_character_embedding(texts: list[str]):
    """Stands in for sentence embeddings: the teacher's replies here talk of composing, the base's do not; a
    little noise per text keeps the classes from being points."""
    import numpy as np

    return np.array([[float("compose" in t.lower()), float("compose" not in t.lower()), (hash(t) % 7) / 70]
                     for t in texts])


def test_the_judges_read_every_reply_as_whole_sentences_as_the_audit_keeps_the_teachers():
    # the teacher's training replies reach the judges trimmed by the audit; a base reply cut off by the token limit
    # must not be told apart by its cut: here the cut is the only difference, so a judge reading it would be right
    # every time, and one reading whole sentences is at chance and calls a reply the same with or without it
    topics = ["Vienna", "the piano", "my deafness", "Haydn", "the symphony", "Bonn", "my nephew", "the quartet"]
    kept = [f"I think of {topic} often. It stays with me, number {i}." for i, topic in enumerate(topics * 2)]
    cut = [f"{reply} And when the evening came I" for reply in kept]
    assert evaluate_figures.as_judged(cut[0]) == kept[0]
    assert evaluate_figures.as_judged("no sentence ends here ") == "no sentence ends here"
    judge = evaluate_figures.Judge(kept, cut, lexical=True)
    assert judge.accuracy <= 0.6
    assert judge.says(cut) == judge.says(kept)


def test_the_judges_accuracy_by_turn_shows_where_it_cannot_tell_teacher_from_base():
    # turn 1: the teacher speaks as the character, the base as an assistant; turn 3: after the same history the
    # base has caught up and both say the same, which no judge can tell apart: exactly half right there
    first = [f"Ah, Vienna, my dear friend, number {i}! I hear it still." for i in range(8)]
    plain = [f"As an assistant, I can help with question {i}." for i in range(8)]
    later = [f"The sonata was finished in winter, number {i}." for i in range(8)]
    turns = [1] * 8 + [3] * 8
    judge = evaluate_figures.Judge(first + later, plain + later, lexical=True, turns=turns)
    assert judge.accuracy_by_turn == {"judge_accuracy_turn_1": 1.0, "judge_accuracy_turn_3_on": 0.5}
    assert evaluate_figures.Judge(first, plain, lexical=True, turns=[1] * 8).accuracy_by_turn == {
        "judge_accuracy_turn_1": 1.0, "judge_accuracy_turn_3_on": None}
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]},
            {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": c}
                          for i, c in enumerate(["q", "b1", "q", "b2", "q", "b3"])]}]
    assert evaluate_figures.judge_positives(rows) == ["a1", "b1", "b2", "b3"]
    assert evaluate_figures.judge_turns(rows) == [1, 1, 2, 3]


def test_a_reply_is_as_similar_to_the_teachers_with_or_without_a_cut_off_tail():
    # the similarities read replies as the judges do: the token limit's cut says nothing of the character (real
    # sentence embeddings: a tail of other words moves the raw cosine)
    teacher = ["I think of Vienna often. It stays with me."]
    cut = ["I think of Vienna often. It stays with me. And when the evening came and the candles were lit I"]
    assert evaluate_figures.similarity(cut, teacher) == evaluate_figures.similarity(teacher, teacher)
    assert evaluate_figures.cosine_to_reference(cut, teacher) < evaluate_figures.similarity(cut, teacher)


def test_evaluate_computes_every_registered_figure_and_the_replies_file(monkeypatch):
    # where the figures look them up (`jobs.evaluation.figures` imports them by name)
    monkeypatch.setattr(evaluate_figures, "cosine_to_reference",
                        lambda texts, references: [float(t == r) for t, r in zip(texts, references, strict=True)])
    monkeypatch.setattr(evaluate_figures, "embed", in_character_embedding)
    ticks = itertools.count()
    monkeypatch.setattr(measure.time, "perf_counter", lambda: float(next(ticks)))  # every timed call takes 1 s
    config = phase_config("metrics-test")
    prompts = measure.Prompts(system="card", with_card=[[0] * 10, [0] * 30], without_card=[[0] * 2, [0] * 6],
                               teacher_replies=[[0], [0] * 3], pairs=[])
    client = CountingClient()
    seen = measure.Measured(
        replies={"teacher": ["I compose.", "Vienna."], "teacher_resampled": ["I compose.", "As an AI, no."],
                 "student": ["I compose.", "Bonn."], "base": ["As an AI language model...", "Vienna."]},
        nll={"student": [1.0, 2.0], "base": [3.0, 4.0], "teacher": [1.0, 1.0]},
        latency=measure.latency(client, prompts, 1, SamplingParams(max_tokens=4)),
        kl={"student": [[0.1], [0.3, 0.1, 0.1]], "base": [[0.4], [0.4, 0.4, 0.4]]},
        judge_negatives=[f"Hello there from Vienna and Bonn, as an AI, number {i}." for i in range(10)],
        turns={"student": {1: ["I compose."], 2: ["Hi."], 3: ["I compose.", "I compose."]},
               "base": {1: ["Hi."], 2: ["Hi."], 3: ["Hi.", "I compose."]},
               "teacher_resampled": {1: ["I compose."]}})
    judge = evaluate_figures.Judge([f"I compose, number {i}." for i in range(10)], seen.judge_negatives,
                                   turns=[1] * 6 + [2] * 2 + [3] * 2)
    lexical = evaluate_figures.Judge([f"I compose, number {i}." for i in range(10)], seen.judge_negatives, lexical=True)
    card = CharacterCard.model_construct(name="I compose.", topics=[])
    similarity = evaluate_figures.similarity_to_teacher(seen.replies)
    # the persona checks: every reply names the character; the base answers every ordinary question right, the
    # student half of them
    beethoven = CharacterCard(name="Beethoven", system_prompt="You are Beethoven, in Vienna in 1824.")
    checks = persona.check_prompts(beethoven, set(), config.pipeline.audit.forbidden)
    answers = "12 27 99 25 10 Paris 7 8 green cold Jupiter cow tac"  # every sum and fact checks.yaml asks
    # a format question ("^\\W*green\\W*$") gets its word alone
    right = {p.prompt: p.expect.strip("^$\\W*") if p.expect.startswith("^") else answers for p in checks.probes}
    seen.persona = {"base": [right[p.prompt] if p.check == "capability" else "Beethoven." for p in checks.probes],
                    "teacher": ["I am Beethoven."] * len(checks.probes)}
    seen.persona["student"] = [reply if i % 2 else "Beethoven." for i, reply in enumerate(seen.persona["base"])]
    # their own conversations: the student composes at turn 3; it keeps to Bonn, the base moves to Vienna once
    seen.own_turns = {"student": {1: ["Hi."], 3: ["I compose."]}, "base": {1: ["Hi."], 3: ["Hi."]},
                      "teacher_resampled": {1: ["I compose."]}}
    talks = len(checks.consistency)
    seen.repeated = {"student": [["In Bonn.", "Music.", "Bonn, I said!"]] * talks,
                     "base": [["In Bonn.", "Music.", "Vienna."]] + [["Bonn.", "Music.", "Bonn."]] * (talks - 1),
                     "teacher_resampled": [["i forget.", "Music.", "i forget."]] * talks}
    recorded = record({**evaluate_figures.figures(seen, similarity, prompts, card, judge, lexical,
                                                  config.pipeline.audit.forbidden, config.pipeline.evaluate.prices),
                       **persona.figures(checks, seen.persona),
                       **consistency.figures(seen.own_turns, seen.repeated, checks, judge)})

    assert similarity == {"similarity_student": [1.0, 0.0], "similarity_base": [0.0, 1.0],
                          "similarity_teacher_resampled": [1.0, 0.0]}
    assert recorded["similarity_student"] == 0.5
    assert recorded["persona_similarity_student"] == 0.5 and recorded["persona_similarity_base"] == 0.0
    assert recorded["out_of_character_base"] == 0.5 and recorded["out_of_character_teacher"] == 0.5
    assert recorded["out_of_character_student"] == 0.0
    # token-weighted: (1*1 + 2*3) / 4 for the student, (3 + 12) / 4 for the base; the gap 2.75 is 8/11 closed
    assert (recorded["nll_student"], recorded["nll_base"], recorded["nll_teacher"]) == (1.75, 3.75, 1.0)
    # the judge learned "compose" from its own rows: half the student's and the second sample's, none of the base's
    assert recorded["judge_accuracy"] == 1.0
    assert recorded["judge_accuracy_turn_1"] == recorded["judge_accuracy_turn_3_on"] == 1.0
    assert (recorded["in_character_student"], recorded["in_character_base"],
            recorded["in_character_teacher_resampled"]) == (0.5, 0.0, 0.5)
    # the n-gram judge learned the words themselves ("compose" against "Vienna", "Bonn", "AI"): the same here
    assert recorded["lexical_judge_accuracy"] == 1.0
    assert (recorded["in_character_lexical_student"], recorded["in_character_lexical_base"],
            recorded["in_character_lexical_teacher_resampled"]) == (0.5, 0.0, 0.5)
    # a mean over every position of every reply: 0.6 / 4 and 1.6 / 4; the student removed 62.5% of the base's KL
    assert (recorded["kl_student"], recorded["kl_base"], recorded["kl_closed"]) == (0.15, 0.4, 0.625)
    # by turn: turn 1, and turns 3 on pooled; none where no conversation reaches them
    assert (recorded["in_character_turn_1_student"], recorded["in_character_turn_3_on_student"]) == (1.0, 1.0)
    assert (recorded["in_character_turn_1_base"], recorded["in_character_turn_3_on_base"]) == (0.0, 0.5)
    assert recorded["in_character_turn_3_on_teacher_resampled"] is None
    assert (recorded["prompt_tokens_with_card"], recorded["prompt_tokens_without_card"]) == (20, 4)
    assert recorded["token_reduction"] == 0.8 and recorded["prompt_cost_ratio"] == 5.0
    assert recorded["reply_tokens"] == 2
    prices = config.pipeline.evaluate.prices
    cost = {tokens: (tokens * prices.input_per_mtok + 2 * prices.output_per_mtok) / 1e6 for tokens in (20, 4)}
    assert recorded["cost_per_request_with_card"] == cost[20]
    assert recorded["cost_ratio"] == round(cost[20] / cost[4], 3) > 1
    assert client.calls == 4  # a warm-up and one timed request, with and without the card
    assert recorded["latency_with_card_s"] == recorded["prefill_without_card_s"] == recorded["latency_ratio"] == 1
    assert evaluate_figures.kl({"student": [[0.1]], "base": [[0.0]]})["kl_closed"] is None

    assert (recorded["identity_student"], recorded["holds_role_base"], recorded["knowledge_boundary_teacher"]) \
        == (1.0, 1.0, 1.0)
    assert (recorded["capability_base"], recorded["capability_student"], recorded["capability_teacher"]) \
        == (1.0, 0.5, 0.0)
    assert recorded["capability_drop"] == 0.5 and recorded["persona_prompts_capability"] == 16
    assert (recorded["in_character_own_turn_3_on_student"], recorded["in_character_own_turn_3_on_base"],
            recorded["in_character_own_turn_3_on_teacher_resampled"]) == (1.0, 0.0, None)
    assert (recorded["consistent_student"], recorded["consistency_pairs_student"]) == (1.0, 4)
    assert (recorded["consistent_base"], recorded["consistent_teacher_resampled"]) == (0.75, None)
    assert recorded["consistency_pairs_teacher_resampled"] == 0  # no number, no name: nothing to compare

    rows = evaluate_figures.reply_rows([{"id": "a", "prompt": "Who are you?"}, {"id": "b", "prompt": "Where?"}], seen,
                               similarity)
    assert list(rows[1]) == ["id", "prompt", "teacher", "student", "base", "teacher_resampled", "similarity_student",
                             "similarity_base", "similarity_teacher_resampled", "nll_student", "nll_base",
                             "nll_teacher", "kl_student", "kl_base"]
    assert (rows[1]["student"], rows[1]["similarity_base"], rows[1]["nll_base"]) == ("Bonn.", 1.0, 4.0)


class ScriptedClient:
    """Stands in for a metered model in a replay: it answers each chat with the number of messages it was given,
    and keeps the chats."""

    def __init__(self):
        self.chats: list[list[dict]] = []
        self.renderer = self

    def chat(self, messages):
        self.chats.append(messages)
        return [len(messages)]

    def decode(self, tokens):
        return f"after {tokens[0]} messages"

    def sample(self, prompts, params, on_batch=None):
        return prompts


def test_a_replay_gives_each_turn_the_recorded_conversation_before_it():
    conversations = [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                      {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}],
                     [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "b1"}]]
    client = ScriptedClient()
    turns = measure.replay(client, conversations, "the card", SamplingParams(max_tokens=4))
    assert turns == {1: ["after 2 messages", "after 2 messages"], 2: ["after 4 messages"], 3: ["after 6 messages"]}
    third = client.chats[-1]
    assert third[0] == {"role": "system", "content": "the card"} and third[1:] == conversations[0][:5]
    rows = evaluate_figures.replayed(conversations, {"student": turns})
    assert rows[0]["student"] == ["after 2 messages", "after 4 messages", "after 6 messages"]
    assert rows[1] == {"messages": conversations[1], "student": ["after 2 messages"]}
    assert measure.replay(client, [], None, SamplingParams(max_tokens=4)) == {}
