"""Evaluate's teacher is the teacher that wrote the data: a lorebook's keyed entries in its passes
(`jobs.evaluation.teacher_card`). Over a record's turns (KL targets, the teacher's NLL, the replay) each turn's
system message is rebuilt from the record; on talk without a record (persona checks, own conversations, consistency
talks) entries fire on the keys of the conversation so far; the cache key holds the lorebook; a card without one
gives the prompts, targets and key it gave before. On the tiny model, with the keeper card
(`examples/cards/keeper.v2.json`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from card_png import EXAMPLES
from conftest import phase_config

from jobs import distill, records
from jobs.backends.base import Metered
from jobs.backends.local import LocalEngine
from jobs.card import read_card
from jobs.config import AuditConfig
from jobs.evaluation import consistency, persona
from jobs.evaluation.cache import SPLIT_FILES, PartCache
from jobs.evaluation.measure import Measured, Prompts, reply_nll
from jobs.evaluation.teacher_card import TeacherCard
from jobs.lorebook import Firing, entry_ids, turn_systems
from jobs.phases.evaluate import BASE_PARTS, Context, common_key, part_keys
from jobs.store import ArtifactStore, StoreSettings

KEEPER = json.loads((EXAMPLES / "keeper.v2.json").read_text())
LAMP, FOG = 2, 3  # the entries' positions in the card's character_book.entries
COLD, QUESTION = "Is it cold out here in winter?", "Did the fog ever stop your light?"  # no key; the fog's key
TRIM = "How do you trim the lamp at night?"  # the lamp's key
K = 8  # evaluate.kl_top_k: the random model's tail is near-ties, whose order batching may swap


def keeper(book: dict | None = None):
    """The keeper card, with `book` as its character_book (None: without one)."""
    data = {key: value for key, value in KEEPER["data"].items() if key != "character_book"}
    if book is not None:
        data["character_book"] = book
    return read_card(json.dumps({"spec": "chara_card_v2", "data": data}).encode(), "keeper.json").card


WITH_BOOK = keeper(KEEPER["data"]["character_book"])
WITHOUT_BOOK = keeper(None)


def held_out(book: bool) -> tuple[dict, dict]:
    """A held-out conversation (no key at turn 1, the fog's at turn 2) and a single-turn row asking about the lamp,
    as the teacher phase records them for a card with a lorebook (`book`) or without one."""
    entries = ([], [FOG], [LAMP]) if book else (None, None, None)
    talk = records.opened("c-cold", COLD, "Bitter, and the wind finds every crack.", 9, True, entries[0])
    records.add_turn(talk, QUESTION, "Once, for sixty-one hours without a stop.", 9, True, entries[1])
    lamp = records.opened("q-lamp", TRIM, "With scissors, every four hours.", 8, True, entries[2])
    return talk, lamp


@pytest.fixture(scope="module")
def engine():
    config = phase_config("lorebook-evaluate")
    return LocalEngine.for_sampling(config.pipeline.model.model_copy(update={"dtype": "float32"}))


def context(prompts: Prompts, lore: TeacherCard | None = None, checks: persona.Checks | None = None,
            conversations: list[list[dict]] | None = None) -> Context:
    config = phase_config("lorebook-evaluate", f"evaluate.kl_top_k={K}")
    return Context(config, prompts, conversations or [], [], Measured(replies={}),
                   checks or persona.check_prompts(WITH_BOOK, set(), AuditConfig().forbidden), lore=lore)


def part(name: str):
    return next(p for p in BASE_PARTS if p.name == name)


def test_the_records_entries_are_the_ones_firing_gives():
    # the fixture's entries are what the teacher phase would have recorded for these texts
    lore, book = Firing(WITH_BOOK.lorebook), WITH_BOOK.lorebook
    shared = WITH_BOOK.teacher_system_prompt()
    talk, lamp = held_out(book=True)
    said = [m["content"] for m in talk["messages"]]
    assert [entry_ids(book, lore.system(shared, "c", said[:n])[1]) for n in (1, 3)] == talk["lorebook_entries"]
    assert entry_ids(book, lore.system(shared, "q", [TRIM])[1]) == lamp["lorebook_entries"][0]
    assert [book.entries[i].label for i in (LAMP, FOG)] == ["the lamp and lens", "the fog signal"]


def test_the_teachers_kl_targets_read_each_turn_with_its_recorded_system(engine):
    talk, lamp = held_out(book=True)
    shared, book, render = WITH_BOOK.teacher_system_prompt(), WITH_BOOK.lorebook, engine.renderer
    first, second = turn_systems(shared, book, talk)
    assert first == shared and book.entries[FOG].text in second
    prompts = Prompts.render(render, [talk, lamp], shared, book)
    ctx = context(prompts)
    k = ctx.config.pipeline.evaluate.kl_top_k
    client = Metered(engine)
    ctx.seen.merge(part("teacher top-k").compute(client, ctx, lambda n: None))
    target = ctx.seen.teacher_topk[0]
    messages = talk["messages"]
    one, two = len(render.reply(messages[1]["content"])), len(render.reply(messages[3]["content"]))
    assert len(target.ids) == one + two
    # by hand: turn 1 under its system and the conversation's start, turn 2 under the one with the fog's entry
    by_turn_1 = distill.teacher_topk(engine, [distill.pair(render, messages[:2], first)], k)[0]
    by_turn_2 = distill.teacher_topk(engine, [distill.pair(render, messages, second)], k)[0]
    shared_only = distill.teacher_topk(engine, [distill.pair(render, messages, shared)], k)[0]
    assert target.ids[:one] == by_turn_1.ids[:one] and target.ids[one:] == by_turn_2.ids[one:]
    flat = [v for row in target.logprobs for v in row]
    assert flat == pytest.approx([v for row in by_turn_1.logprobs[:one] + by_turn_2.logprobs[one:] for v in row],
                                 abs=1e-4)
    # the shared system alone gives turn 2 other targets: not the teacher that sampled its reply
    assert max(abs(a - b) for got, alone in zip(target.logprobs[one:], shared_only.logprobs[one:], strict=True)
               for a, b in zip(got, alone, strict=True)) > 1e-2
    # the single-turn row: the lamp's entry, from turn 1
    lamp_system = turn_systems(shared, book, lamp)[0]
    assert book.entries[LAMP].text in lamp_system
    alone = distill.teacher_topk(engine, [distill.pair(render, lamp["messages"], lamp_system)], k)[0]
    assert ctx.seen.teacher_topk[1].ids == alone.ids
    # the models' KL lines up with those targets: a value per position of both turns
    kl = part("base KL").compute(client, ctx, lambda n: None)["kl"]["base"]
    assert [len(row) for row in kl] == [one + two, len(render.reply(lamp["messages"][1]["content"]))]
    # the teacher's NLL of its reply: under the system message the record names
    nll = part("base and teacher NLL").compute(client, ctx, lambda n: None)["nll"]
    reply = [render.reply(records.first_reply(lamp))]
    assert prompts.with_card[1] == render.prompt(TRIM, system=lamp_system)
    assert nll["teacher"][1] == pytest.approx(reply_nll(client, [prompts.with_card[1]], reply)[0], abs=1e-6)
    assert abs(nll["teacher"][1] - reply_nll(client, [render.prompt(TRIM, system=shared)], reply)[0]) > 1e-3


class Recording:
    """The teacher for sampling passes: keeps each prompt's text, answers "Aye."."""

    def __init__(self, renderer):
        self.renderer, self.prompts = renderer, []

    def sample(self, prompts, params, on_batch=None):
        self.prompts += [self.renderer.tokenizer.decode(p) for p in prompts]
        if on_batch:
            on_batch(len(prompts))
        return [self.renderer.reply("Aye.") for _ in prompts]


def test_a_teacher_sampling_prompt_carries_an_entry_whose_key_its_text_has(engine):
    shared, book = WITH_BOOK.teacher_system_prompt(), WITH_BOOK.lorebook
    fog, lamp_text = book.entries[FOG].text, book.entries[LAMP].text
    talk, lamp = held_out(book=True)
    checks = dataclasses.replace(persona.check_prompts(WITH_BOOK, set(), AuditConfig().forbidden),
                                 probes=(persona.Probe("role", QUESTION), persona.Probe("role", COLD)),
                                 consistency=((COLD, QUESTION, COLD), (COLD, "What do you eat?", COLD)))
    ctx = context(Prompts.render(engine.renderer, [talk, lamp], shared, book),
                  TeacherCard.read(shared, book, [talk]), checks, [talk["messages"]])
    # the persona checks: each prompt a conversation of its own, its keys its entries
    client = Recording(engine.renderer)
    part("teacher persona checks").compute(client, ctx, lambda n: None)
    asked_fog, asked_cold = client.prompts
    assert fog in asked_fog and fog not in asked_cold and shared in asked_cold
    # the base's prompts carry no card at all
    base = Recording(engine.renderer)
    part("base persona checks").compute(base, ctx, lambda n: None)
    assert not any(shared in p or fog in p for p in base.prompts)
    # the resampled replies to the held-out prompts: the record's turn-1 system (no entry; the lamp's)
    client = Recording(engine.renderer)
    part("teacher resampled").compute(client, ctx, lambda n: None)
    assert fog not in client.prompts[0] and lamp_text not in client.prompts[0] and lamp_text in client.prompts[1]
    # the replayed held-out conversation: turn 2 with the fog's entry, turn 1 without
    client = Recording(engine.renderer)
    found = part("teacher resampled conversations").compute(client, ctx, lambda n: None)
    assert [fog in p for p in client.prompts] == [False, True]
    # its own conversations are the recorded ones (nothing sampled); the consistency talks: three turns, both talks
    # each turn: the first talk's turn 2 fires the fog and it stays at turn 3; never the second's
    ctx.seen.merge(found)
    client = Recording(engine.renderer)
    own = part("teacher own conversations").compute(client, ctx, lambda n: None)["own_turns"]["teacher_resampled"]
    assert own == {t: [ctx.conversations[0][2 * t - 1]["content"]] for t in (1, 2)}
    assert [fog in p for p in client.prompts] == [False, False, True, False, True, False]


def test_an_entry_an_earlier_question_fired_stays_in_an_own_conversation_that_starts_at_turn_2(engine):
    # scan depth 1: only the visitor's last question is scanned, so the lamp of turn 1 stays only because it fired
    book = keeper({**KEEPER["data"]["character_book"], "scan_depth": 1}).lorebook
    shared = WITH_BOOK.teacher_system_prompt()
    said = [{"role": "user", "content": TRIM}, {"role": "assistant", "content": "With scissors."},
            {"role": "user", "content": COLD}, {"role": "assistant", "content": "Bitter."}]
    client = Recording(engine.renderer)
    card = TeacherCard(shared, book)
    consistency.own_replay(client, [said], card.firing(), None, ["With scissors."])
    lore = Firing(book)  # as the teacher phase fires: turn 1, then turn 2
    lore.system(shared, "c", [TRIM])
    expected = lore.system(shared, "c", [TRIM, "With scissors.", COLD])[0]
    assert book.entries[LAMP].text in expected
    assert client.prompts == [engine.renderer.tokenizer.decode(engine.renderer.chat(
        [{"role": "system", "content": expected}, *said[:3]]))]


SPLIT = {"fingerprint": "f" * 64, "outputs": {name: {"sha256": name} for name in SPLIT_FILES}}
PRECISION = {"device": "cpu", "dtype": "float32"}


def test_the_cache_key_holds_the_lorebook_only_for_a_card_with_one():
    pipeline = phase_config("lorebook-evaluate-keys").pipeline
    store = ArtifactStore(StoreSettings(), "lorebook-evaluate-keys")

    def keys(common: dict) -> dict[str, str]:
        return part_keys(PartCache(store, common), pipeline, precision=PRECISION)

    shared = WITH_BOOK.teacher_system_prompt()
    with_book = keys(common_key(SPLIT, pipeline, PRECISION, "local", shared, WITH_BOOK.name, WITH_BOOK.lorebook))
    same_text = keys(common_key(SPLIT, pipeline, PRECISION, "local", shared, WITH_BOOK.name, None))
    assert all(with_book[name] != same_text[name] for name in with_book)
    other = keeper({**KEEPER["data"]["character_book"], "scan_depth": 1})
    assert keys(common_key(SPLIT, pipeline, PRECISION, "local", shared, WITH_BOOK.name, other.lorebook)) != with_book
    # a card without a lorebook: the key the code gave before lorebooks, from the same inputs
    plain = WITHOUT_BOOK.teacher_system_prompt()
    before = {"split": SPLIT["fingerprint"], "data": {name: SPLIT["outputs"][name]["sha256"] for name in SPLIT_FILES},
              "model": pipeline.model.model_dump(mode="json"), "precision": PRECISION, "backend": "local",
              "system": plain, "card_name": WITHOUT_BOOK.name}
    now = common_key(SPLIT, pipeline, PRECISION, "local", plain, WITHOUT_BOOK.name, WITHOUT_BOOK.lorebook)
    assert WITHOUT_BOOK.lorebook is None and now == before and keys(now) == keys(before)


def test_a_card_without_a_lorebook_gives_the_prompts_and_targets_it_gave_before(engine):
    card, render = WITHOUT_BOOK, engine.renderer
    shared = card.teacher_system_prompt()
    rows = list(held_out(book=False))
    assert not any(records.LOREBOOK_ENTRIES in row for row in rows)
    prompts = Prompts.render(render, rows, shared, card.lorebook)
    # what Prompts.render gave before there were per-turn systems
    assert prompts.with_card == [render.prompt(r["prompt"], system=shared) for r in rows]
    assert prompts.pairs == [distill.pair(render, r["messages"], shared) for r in rows]
    assert prompts.runs == [[p] for p in prompts.pairs]
    ctx = context(prompts, TeacherCard.read(shared, card.lorebook, rows[:1]))
    target = part("teacher top-k").compute(Metered(engine), ctx, lambda n: None)["teacher_topk"]
    assert target == distill.teacher_topk(engine, prompts.pairs, ctx.config.pipeline.evaluate.kl_top_k)
    # every sampling pass gets the one shared string, as before
    assert ctx.teacher.recorded() == ctx.teacher.firing() == shared
    # with a lorebook, where no key occurs: the shared text, byte for byte
    shared = WITH_BOOK.teacher_system_prompt()
    assert TeacherCard(shared, WITH_BOOK.lorebook).firing()(0, [{"role": "user", "content": COLD}]) == shared
