"""Multi-turn teacher data: the visitor's questions, which prompts open conversations, the turn-by-turn
generation (with a scripted sampler, then on the tiny test model), the audit's cut at a conversation's first bad
turn and the split's held-out conversations."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest
from tiny_model import SETTING

from jobs import records
from jobs.backends.base import SamplingParams
from jobs.config import AuditConfig, SplitConfig, load_pipeline_config
from jobs.errors import InputError
from jobs.phases import audit, split, teacher
from jobs.phases.base import PhaseConfig
from jobs.store import StoreSettings

NAME = "Ludwig van Beethoven"
CARD = "You are Ludwig van Beethoven, the composer, in Vienna in 1824. You are deaf and proud, and you say so."


def phase_config(*overrides: str, shard: int = 0) -> PhaseConfig:
    return PhaseConfig(run_id="conversations", pipeline=load_pipeline_config("ci", overrides=list(overrides)),
                       store_settings=StoreSettings(), shard=shard)


@pytest.mark.parametrize("written, question", [
    ("What did you compose next?", "What did you compose next?"),
    ('Visitor: "Why Vienna?" I always wondered.\nBeethoven: Because...', "Why Vienna?"),
    ("**Question:** How loud is the piano?", "How loud is the piano?"),
    ("Ludwig van Beethoven: Tell me about Bonn", "Tell me about Bonn"),
    ("Beethoven: \u201cAnd your brother?\u201d", "And your brother?"),
    ("The conversation so far:\n\nYou:   who taught   you?", "who taught you?"),
    ("   \n\n", ""),
    ('""', ""),
    ("Visitor:", ""),
])
def test_the_visitors_question_is_cleaned(written, question):
    assert teacher.clean_question(written, NAME) == question


def test_the_conversation_subset_is_a_hash_of_the_prompt_id_alone():
    ids = [f"p-{i:04d}" for i in range(400)]
    chosen = {i for i in ids if teacher.opens_conversation(i, 0.25)}
    assert chosen == {i for i in reversed(ids) if teacher.opens_conversation(i, 0.25)}  # no order, no state
    assert 0.18 * len(ids) < len(chosen) < 0.32 * len(ids)
    assert not any(teacher.opens_conversation(i, 0.0) for i in ids)
    assert all(teacher.opens_conversation(i, 1.0) for i in ids)
    assert chosen < {i for i in ids if teacher.opens_conversation(i, 0.5)}  # a larger share adds prompts


class Tokens:
    """A stand-in renderer over characters: a token is a character's code point, a chat is its messages as
    `role: content` lines, so what was sent can be read back."""

    end_of_turn = 0
    context_tokens = None

    def chat(self, messages: list[dict], reply_prefix: str = "") -> list[int]:
        return [ord(c) for c in "".join(f"<{m['role']}> {m['content']}\n" for m in messages) + "<assistant>"]

    def prompt(self, user: str, system: str | None = None) -> list[int]:
        return self.chat([*([{"role": "system", "content": system}] if system else []),
                          {"role": "user", "content": user}])

    def decode(self, tokens: list[int]) -> str:
        return "".join(map(chr, tokens)).strip()


class Scripted:
    """A sampler that answers from a script and records every call (prompts as text, parameters)."""

    def __init__(self, silent: tuple[str, ...] = ()):
        self.renderer, self.calls, self.silent = Tokens(), [], silent

    def sample(self, prompts, params, on_batch=None):
        texts = ["".join(map(chr, p)) for p in prompts]
        self.calls.append((texts, params))
        replies = []
        for text in texts:
            first = text.split("<user> ", 1)[1].split("\n", 1)[0]
            turn = text.count("<assistant> ") + 1
            if text.startswith("<system> You are a curious visitor"):
                first = first.removeprefix("Visitor: ")
                turn = text.count(f"\n{NAME}: ") + 1
                replies.append("" if first in self.silent else f'Visitor: "Question {turn} about {first}?"')
            else:
                replies.append(f"Reply {turn} to {first}.")
        if on_batch:
            on_batch(len(prompts))
        return [[ord(c) for c in reply] for reply in replies]


PROMPTS = [{"id": f"bthv-{i:04d}", "prompt": f"Prompt {i}"} for i in range(1, 9)]


def test_a_conversation_goes_turn_by_turn_with_the_whole_history():
    config = phase_config("conversations.share=1", "conversations.turns=3")
    sampler = Scripted(silent=("Prompt 2",))  # the visitor of prompt 2's conversation has nothing to ask
    rows = teacher.generate(config, sampler, CARD, PROMPTS[:3], NAME)
    # turn 1 for every prompt, then one call for the visitors and one for the teacher per later turn
    assert [len(texts) for texts, _ in sampler.calls] == [3, 3, 2, 2, 2]
    seeds = [params.seed for _, params in sampler.calls]
    assert len(set(seeds)) == len(seeds) and seeds[0] == config.pipeline.teacher.seed
    visitor_calls = [texts for texts, _ in sampler.calls[1::2]]
    assert all(CARD not in text and text.startswith("<system> You are a curious visitor talking with " + NAME)
               for texts in visitor_calls for text in texts)
    last = sampler.calls[4][0][0]  # the teacher's prompt for prompt 1's turn 3: the card and every earlier turn
    assert last == "".join(["<system> " + CARD + "\n", "<user> Prompt 1\n", "<assistant> Reply 1 to Prompt 1.\n",
                            "<user> Question 2 about Prompt 1?\n", "<assistant> Reply 2 to Prompt 1.\n",
                            "<user> Question 3 about Prompt 1?\n", "<assistant>"])
    one, two, three = rows
    # each prompt's conversation record: the chat without the card, and the teacher's metering per turn
    assert {k: v for k, v in one.items() if not k.startswith("prompt_tokens")} == {
        "id": "bthv-0001", "prompt": "Prompt 1",
        "messages": [{"role": "user", "content": "Prompt 1"}, {"role": "assistant", "content": "Reply 1 to Prompt 1."},
                     {"role": "user", "content": "Question 2 about Prompt 1?"},
                     {"role": "assistant", "content": "Reply 2 to Prompt 1."},
                     {"role": "user", "content": "Question 3 about Prompt 1?"},
                     {"role": "assistant", "content": "Reply 3 to Prompt 1."}],
        "turns": 3, "reply_tokens": [20, 20, 20], "finished": [True, True, True]}
    assert one["prompt_tokens_with_card"] > one["prompt_tokens_without_card"] > 0
    assert (two["turns"], three["turns"]) == (1, 3) and all(records.problem(row) is None for row in rows)


def test_each_shard_chooses_its_conversations_alone():
    def conversing(prompts, shard):
        rows = teacher.generate(phase_config(shard=shard), Scripted(), CARD, prompts, NAME)
        return {row["id"] for row in rows if row["turns"] > 1}

    together = conversing(PROMPTS, 0)
    assert together == conversing(PROMPTS[:4], 0) | conversing(PROMPTS[4:], 1)
    expected = {p["id"] for p in PROMPTS if teacher.opens_conversation(p["id"], 0.25)}
    assert together == expected


def teacher_row(id_: str, *replies: str, unfinished: tuple[int, ...] = ()) -> dict:
    """A teacher record with one reply per turn (the first is the prompt's)."""
    row = records.opened(id_, f"Question {id_}?", replies[0], len(replies[0].split()), 1 not in unfinished,
                         prompt_tokens_with_card=50, prompt_tokens_without_card=10)
    for k, reply in enumerate(replies[1:], start=2):
        records.add_turn(row, f"And then {k}?", reply, len(reply.split()), k not in unfinished)
    return row


def test_the_audit_cuts_a_conversation_before_its_first_bad_turn():
    rows = [
        teacher_row("a", "I wrote nine symphonies.", "The ninth has a choir. And then I", "As an AI language model, "
                    "I cannot say.", "Bonn was my home.", unfinished=(2,)),
        teacher_row("b", "As an AI I do not compose.", "Vienna, of course."),
        teacher_row("c", "My piano is loud.", "I wrote nine symphonies."),  # turn 2 repeats a's turn 1
        teacher_row("d", "Single turn, and fine."),
        teacher_row("e", "Coffee, sixty beans a cup.", "Schindler, my secretary.", "Karl, my nephew."),
    ]
    kept, dropped, cut, report = audit.audit_records(rows, AuditConfig(min_reply_words=2))
    by_id = {row["id"]: row for row in kept}
    assert [row["id"] for row in dropped] == ["b"] and dropped[0]["reason"] == "out_of_character"
    a = by_id["a"]
    assert (a["turns"], a["cut_at"], a["cut_reason"]) == (2, 3, "out_of_character")
    assert (a["reply_tokens"], a["finished"], a["trimmed"]) == ([4, 8], [True, False], [2])
    assert a["messages"] == [{"role": "user", "content": "Question a?"},
                             {"role": "assistant", "content": "I wrote nine symphonies."},
                             {"role": "user", "content": "And then 2?"},
                             {"role": "assistant", "content": "The ninth has a choir."}]
    assert (by_id["c"]["turns"], by_id["c"]["reply_tokens"], by_id["c"]["cut_reason"]) == (1, [4], "duplicate")
    assert len(by_id["c"]["messages"]) == 2
    assert by_id["d"]["turns"] == 1 and "trimmed" not in by_id["d"] and "cut_at" not in by_id["d"]
    assert by_id["e"]["turns"] == 3 and len(by_id["e"]["messages"]) == 6 and "cut_at" not in by_id["e"]
    assert [(t["id"], t["turn"], t["reason"]) for t in cut] == [("a", 3, "out_of_character"), ("a", 4, "after_cut"),
                                                                 ("c", 2, "duplicate")]
    assert report["dropped"] == {"out_of_character": 1}  # rows dropped, as before conversations
    assert report["dropped_by_turn"] == {"1": {"out_of_character": 1}, "2": {"duplicate": 1},
                                         "3": {"out_of_character": 1}}
    assert (report["rows_in"], report["kept"], report["conversations_in"], report["conversations_kept"],
            report["conversations_cut"]) == (5, 4, 4, 2, 2)
    assert (report["assistant_turns_in"], report["assistant_turns_kept"], report["trimmed_turns"]) == (12, 7, 1)


@pytest.fixture(scope="module")
def renderer():
    from transformers import AutoTokenizer

    from jobs.backends.model_files import model_dir
    from jobs.backends.renderer import Renderer

    return Renderer(AutoTokenizer.from_pretrained(model_dir(load_pipeline_config("ci").model.base)))


def test_a_kept_conversation_trains_on_every_assistant_turn(renderer):
    rows = [teacher_row("a", "I wrote nine symphonies.", "The ninth has a choir.", "As an AI, no.", "Bonn."),
            teacher_row("e", "Coffee, sixty beans a cup.", "Schindler, my secretary.", "Karl, my nephew.")]
    kept, *_ = audit.audit_records(rows, AuditConfig(min_reply_words=2))
    for row in kept:
        tokens, weights = renderer.conversation(row["messages"])
        trained = [token for token, weight in zip(tokens, weights, strict=True) if weight]
        replies = records.replies(row)
        assert len(replies) == row["turns"] == sum(m["role"] == "assistant" for m in row["messages"])
        assert trained == [t for reply in replies for t in renderer.reply(reply)]


def split_rows(count: int, turns: int, prefix: str) -> list[dict]:
    rows = []
    for i in range(count):
        row = records.opened(f"{prefix}{i}", f"{prefix} prompt {i}", f"{prefix}{i}-1", 2, True)
        for k in range(2, turns + 1):
            records.add_turn(row, f"{prefix}{i} question {k}", f"{prefix}{i}-{k}", 2, True)
        rows.append(row)
    return rows


def test_the_split_holds_whole_conversations_out_of_training():
    rows = split_rows(30, 1, "s") + split_rows(6, 4, "long") + split_rows(5, 3, "mid") + split_rows(8, 2, "short")
    files = split.split_rows(rows, SplitConfig(eval_count=5, eval_conversations=8, val_fraction=0.1), 4)
    held = files["eval_conversations.jsonl"]
    assert [r["turns"] for r in held] == [4] * 6 + [3] * 2  # at least 3 turns, the longest first
    trained = {r["id"] for name in ("train.jsonl", "val.jsonl", "eval.jsonl") for r in files[name]}
    assert not {r["id"] for r in held} & trained
    assert len(trained) + len(held) == len(rows)
    assert all(r["turns"] == 1 and len(r["messages"]) == 2 for r in files["eval.jsonl"])
    assert {r["turns"] for r in files["train.jsonl"] + files["val.jsonl"]} == {1, 2, 3}  # the rest train, mixed
    held_prompts = {r["prompt"] for r in held + files["eval.jsonl"]}
    assert not held_prompts & {r["prompt"] for r in files["train.jsonl"] + files["val.jsonl"]}
    assert files == split.split_rows(rows, SplitConfig(eval_count=5, eval_conversations=8, val_fraction=0.1), 4)


def test_the_split_takes_the_longest_conversations_when_none_reaches_three_turns():
    rows = split_rows(20, 1, "s") + split_rows(3, 2, "short")
    files = split.split_rows(rows, SplitConfig(eval_count=4, eval_conversations=2, val_fraction=0.1), 2)
    assert [r["turns"] for r in files["eval_conversations.jsonl"]] == [2, 2]
    with pytest.raises(InputError) as caught:
        split.split_rows(rows, SplitConfig(eval_count=4, eval_conversations=2, val_fraction=0.1), 4)
    assert "only 0 conversations of at least 3 turns" in str(caught.value) and "\n" not in str(caught.value)


def test_without_conversations_the_split_is_as_before():
    rows = split_rows(20, 1, "s")
    files = split.split_rows(rows, SplitConfig(eval_count=4, val_fraction=0.1), 4)
    assert files["eval_conversations.jsonl"] == [] and len(files["eval.jsonl"]) == 4
    import random
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    assert files["eval.jsonl"] == shuffled[:4] and files["val.jsonl"] + files["train.jsonl"] == shuffled[4:]


def test_eval_conversations_need_conversations():
    with pytest.raises(InputError, match=r"split\.eval_conversations needs conversations"):
        load_pipeline_config("ci", overrides=["conversations.share=0"])


def test_the_teacher_answers_turn_three_after_the_earlier_turns_on_the_tiny_model():
    from jobs.backends.local import LocalEngine

    config = phase_config(SETTING, "conversations.share=1", "conversations.turns=3", "teacher.max_new_tokens=16",
                          "conversations.visitor.max_new_tokens=16")
    engine = LocalEngine.for_sampling(config.pipeline.model)
    sent: list[tuple[list[list[int]], SamplingParams]] = []

    class Recording:
        renderer = engine.renderer

        def sample(self, prompts, params, on_batch=None):
            sent.append((prompts, params))
            return engine.sample(prompts, params, on_batch=on_batch)

    prompts = [json.loads(line) for line in
               resources.files("jobs.assets.prompts").joinpath("beethoven.jsonl").read_text().splitlines()[:3]]
    rows = teacher.generate(config, Recording(), CARD, prompts, NAME)
    render = engine.renderer
    assert len({params.seed for _, params in sent}) == len(sent) == 5, "turn 1, then visitor and teacher per turn"
    third = sent[4][0]  # the teacher's prompts for turn 3, one per conversation still going
    went_on = [row for row in rows if row["turns"] == 3]
    assert went_on and len(third) == len(went_on)
    for row, tokens in zip(went_on, third, strict=True):
        history, asked = row["messages"][:4], [row["messages"][4]]  # turns 1 and 2, then turn 3's question
        assert tokens == render.chat([{"role": "system", "content": CARD}, *history, *asked])
        # the token sequence of turn 2's prompt is where turn 3's begins: the history is the one sent before
        second = sent[2][0][[r["id"] for r in rows if r["turns"] > 1].index(row["id"])]
        assert tokens[:len(second)] == second
        text = render.decode(tokens)
        assert all(m["content"] in text for m in history + asked) and CARD in text
    for prompts_sent in (sent[1][0], sent[3][0]):  # the visitor never sees the card
        assert all(CARD not in render.decode(tokens) for tokens in prompts_sent)
    assert dataclasses.asdict(sent[1][1])["max_tokens"] == 16
