"""Lorebooks (`jobs.lorebook`): which entries fire on what, the case rules, the budget; the book read from V2, V3 and
PNG cards; bad books refused in one line; and the teacher inserting and logging keyed entries on the tiny model."""

from __future__ import annotations

import json

import pytest
from card_png import EXAMPLES, card_png
from conftest import phase_config

from jobs.card import CharacterCard, read_card
from jobs.errors import InputError
from jobs.lorebook import DEFAULT_SCAN_DEPTH, DEFAULT_TOKEN_BUDGET, Entry, Firing, Lorebook, active_entries
from jobs.phases import teacher
from jobs.phases.report import lorebook_rows

KEEPER = EXAMPLES / "keeper.v2.json"
V2 = json.loads(KEEPER.read_text())


def book(*entries: dict, **settings) -> Lorebook:
    return Lorebook.model_validate({"entries": list(entries), **settings})


def entry(name: str, keys: list[str], **fields) -> dict:
    return {"name": name, "keys": keys, "content": f"About {name}.", "insertion_order": 0, "enabled": True, **fields}


def fired(lore: Lorebook, *messages: str) -> list[str]:
    return [e.label for e in active_entries(lore, list(messages))]


def test_an_entry_fires_on_its_key_and_not_otherwise():
    lore = book(entry("lamp", ["lamp", "lens"]), entry("fog", ["fog"]))
    assert fired(lore, "How do you trim the LAMP?") == ["lamp"]  # any case by default
    assert fired(lore, "A lens and some fog?") == ["lamp", "fog"]
    assert fired(lore, "How is the weather?") == []
    # only the last scan_depth messages are scanned
    assert fired(lore, "the lamp", *["nothing"] * DEFAULT_SCAN_DEPTH) == []
    assert fired(book(entry("lamp", ["lamp"]), scan_depth=3), "the lamp", "x", "y") == ["lamp"]


def test_case_sensitive_keys_and_regex_keys():
    lore = book(entry("queen", ["Alder Queen"], case_sensitive=True),
                entry("year", ["/18[89]\\d/"], use_regex=True), entry("ship", ["^brig"], use_regex=True))
    assert fired(lore, "the Alder Queen sank") == ["queen"]
    assert fired(lore, "the alder queen sank") == []
    assert fired(lore, "in 1883, a Brig") == ["year"]  # "^brig" is anchored: not at the start
    assert fired(lore, "BRIG in 1700") == ["ship"]  # a regex key ignores case unless case_sensitive


def test_a_selective_entry_needs_a_secondary_key_too():
    lore = book(entry("gale", ["gale", "storm"], selective=True, secondary_keys=["great", "1881"]),
                entry("weather", ["storm"], selective=False, secondary_keys=["never"]))
    assert fired(lore, "Was the storm bad?") == ["weather"]  # not selective: its secondary keys do not matter
    assert fired(lore, "The great storm?") == ["gale", "weather"]
    assert fired(lore, "The gale", "of 1881") == ["gale"]  # keys anywhere in the scanned messages


def test_constant_entries_are_always_there_and_disabled_ones_never():
    lore = book(entry("rock", [], constant=True, position="before_char"), entry("watch", [], constant=True),
                entry("ghost", ["ghost"], enabled=False), entry("also off", [], enabled=False))
    assert [e.label for e in lore.constants()] == ["rock", "watch"]
    assert fired(lore, "a ghost!") == []
    card = read_card(KEEPER.read_bytes(), "keeper.v2.json").card
    shared = card.teacher_system_prompt()
    assert shared.startswith("[Setting: Skerrow is a rock") and shared.endswith("in the log every four hours.")
    assert "drowned sailor" not in shared and "paraffin lamp" not in shared  # disabled, and keyed
    assert fired(card.lorebook, "Any ghost on the rock?") == []


def test_the_budget_drops_the_lowest_priority_entries_first():
    size = 100  # estimated tokens: 200 bytes of content each
    big = [entry(f"e{i}", [f"k{i}"], content="x" * 2 * size, priority=p, insertion_order=-i)
           for i, p in enumerate([5, 9, 1, 7])]
    lore = book(*big, token_budget=2 * size)
    assert fired(lore, "k0 k1 k2 k3") == ["e3", "e1"]  # the two of highest priority, in insertion order
    # without a priority the insertion order ranks them; the constants' share comes off the budget first
    ranked = book(*[{**e, "priority": None} for e in big], {"content": "c" * 2 * size, "constant": True},
                  token_budget=3 * size)
    assert fired(ranked, "k0 k1 k2 k3") == ["e1", "e0"]
    assert book(entry("a", ["a"])).budget == DEFAULT_TOKEN_BUDGET


def test_a_fired_entry_stays_for_the_rest_of_its_conversation():
    lore = book(entry("lamp", ["lamp"]), entry("fog", ["fog"]))
    firing = Firing(lore)
    assert firing.system("CARD", "c1", ["the lamp?"]) == ("CARD\n\nAbout lamp.", [lore.entries[0]])
    assert firing.system("CARD", "c2", ["hello"]) == ("CARD", [])  # a conversation without keys: the card alone
    later = firing.system("CARD", "c1", ["the lamp?", "It burns.", "and", "then", "fog?"])[0]
    assert later == "CARD\n\nAbout lamp.\n\nAbout fog."  # the earlier entry kept, and where it was: a prefix
    assert firing.counts == {"lamp": 2, "fog": 1}


def keeper_card(spec: str = "chara_card_v2", **book_fields) -> bytes:
    data = {**V2["data"], "character_book": {**V2["data"]["character_book"], **book_fields}}
    return json.dumps({"spec": spec, "data": data}).encode()


def test_v2_v3_and_png_cards_with_a_book_are_read():
    v2 = read_card(KEEPER.read_bytes(), "keeper.v2.json")
    v3 = read_card(keeper_card("chara_card_v3"), "keeper.v3.json")
    png = read_card((EXAMPLES / "keeper.png").read_bytes(), "keeper.png")
    assert (v2.format, v3.format, png.format) == ("chara_card_v2", "chara_card_v3", "chara_card_v2 in PNG")
    assert v2.card == v3.card == png.card
    lore = v2.card.lorebook
    assert lore is not None and len(lore.entries) == 9 and (lore.depth, lore.budget) == (4, 640)
    assert "Ewan Tallis's only child" in lore.entries[7].content  # placeholders filled in entries too
    assert v2.mapping["data.character_book"].startswith("lorebook: 2 constant entries")
    assert {"lamp", "Alder Queen", "gale"} <= set(v2.card.topics)  # entry keys are synthesis topics
    assert "original character" not in v2.card.topics  # a meta tag of two words
    # card.json round trip; a card without a book dumps as before there were books
    assert CharacterCard.model_validate(v2.card.model_dump()) == v2.card
    assert "lorebook" not in read_card((EXAMPLES / "ada.v2.json").read_bytes(), "ada").card.model_dump()


def test_a_yaml_card_carries_the_same_book_as_lorebook():
    text = ("name: Ewan Tallis\nsystem_prompt: You keep the Skerrow Light in 1897, {{user}}.\n"
            "lorebook:\n  token_budget: 300\n  entries:\n"
            "    - {keys: [lamp], content: '{{char}} trims the wicks.', insertion_order: 1}\n")
    found = read_card(text.encode(), "keeper.yaml")
    assert found.card.lorebook.entries[0].text == "Ewan Tallis trims the wicks."
    assert found.mapping["lorebook"].startswith("lorebook: 0 constant entries in the teacher's system prompt, 1 keyed")
    assert "lamp" in found.card.topics
    with pytest.raises(InputError, match=r"^keeper\.yaml: card field lorebook\.entries\.0 Value error"):
        read_card(text.replace("keys: [lamp], ", "").encode(), "keeper.yaml")


def test_the_committed_png_is_the_v2_card():
    assert (EXAMPLES / "keeper.png").read_bytes() == card_png(chara=KEEPER.read_bytes())


def test_nulls_and_unknown_fields_of_community_books_are_defaults():
    lore = book({"keys": ["x"], "content": "X.", "case_sensitive": None, "priority": None, "secondary_keys": None,
                 "extensions": {"depth": 4}, "id": 3, "position": None}, scan_depth=None, extensions={})
    assert lore.entries[0].secondary_keys == () and lore.depth == DEFAULT_SCAN_DEPTH


def test_v3_decorators_are_dropped_from_the_text():
    assert Entry(keys=("a",), content="@@depth 4\n@@role system\nThe text.").text == "The text."


BAD = {
    "entries not a list": ({"entries": {"a": 1}}, "card field data.character_book.entries Input should be a valid"),
    "no entries": ({"entries": None}, "card field data.character_book.entries is missing"),
    "entry without keys": ({"entries": [{"content": "x", "keys": []}]},
                           "card field data.character_book.entries.0 Value error, an enabled entry that is not "
                           "constant needs keys"),
    "entry without content": ({"entries": [{"keys": ["a"]}]},
                              "card field data.character_book.entries.0.content is missing"),
    "bad regex": ({"entries": [{"keys": ["(a"], "content": "x", "use_regex": True}]},
                  "card field data.character_book.entries.0 Value error, key '(a' is not a regular expression"),
    "bad position": ({"entries": [{"keys": ["a"], "content": "x", "position": "top"}]},
                     "card field data.character_book.entries.0.position Input should be 'before_char' or"),
    "book not an object": ("lore", "card field data.character_book Input should be a valid dictionary"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_book_is_one_line_naming_the_card_field(case):
    book_tree, message = BAD[case]
    data = {**V2["data"], "character_book": book_tree}
    with pytest.raises(InputError) as caught:
        read_card(json.dumps({"spec": "chara_card_v2", "data": data}).encode(), "c.json")
    assert str(caught.value).startswith(f"c.json: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_disabled_entry_needs_no_keys():
    assert book({"keys": [], "content": "x", "enabled": False}).keyed() == []


def test_the_report_lists_each_entry_and_how_often_it_fired():
    card = read_card(KEEPER.read_bytes(), "keeper.v2.json").card.model_dump()
    shards = [{"rows": 4, "followups": 2, "lorebook_fired": {"the lamp and lens": 3}},
              {"rows": 4, "followups": 0, "lorebook_fired": {"the lamp and lens": 1, "the fog signal": 2}}]
    rows = dict(lorebook_rows(card, shards))
    assert rows["lorebook entry Skerrow rock"] == "constant, before the card: in every teacher prompt"
    assert rows["lorebook entry the lamp and lens"] == "keyed (lamp, lens, paraffin, wick): in 4 of 10 teacher prompts"
    assert rows["lorebook entry the Great Gale"].endswith("with one of 1881, great, worst): in 0 of 10 teacher prompts")
    assert rows["lorebook entry draft: a ghost story"] == "not used (disabled)"
    assert lorebook_rows({"name": "x"}, shards) == []


PROMPTS = [{"id": "k-1", "prompt": "How do you trim the lamp at night?"},
           {"id": "k-2", "prompt": "Is it cold out here in winter?"},
           {"id": "k-3", "prompt": "What became of the Alder Queen?"}]


def test_the_teacher_inserts_and_logs_keyed_entries_on_the_tiny_model():
    from structlog.testing import capture_logs

    from jobs.backends.base import SamplingParams
    from jobs.backends.local import LocalEngine
    from jobs.backends.sampling import shared_prefix_length
    from jobs.log import get_logger

    config = phase_config("lorebook", "conversations.share=1", "conversations.turns=2", "teacher.max_new_tokens=8",
                          "conversations.visitor.max_new_tokens=8", "teacher.temperature=0")
    card = read_card(KEEPER.read_bytes(), "keeper.v2.json").card
    shared = card.teacher_system_prompt()
    engine = LocalEngine.for_sampling(config.pipeline.model, kv_cache=True)
    sent: list[list[list[int]]] = []

    class Recording:
        renderer = engine.renderer

        def sample(self, prompts, params, on_batch=None):
            sent.append(prompts)
            return engine.sample(prompts, params, on_batch=on_batch)

    get_logger()  # configured before the capture, which swaps the processors for the test's
    with capture_logs() as logs:
        rows = teacher.generate(config, Recording(), shared, PROMPTS, card.name, card.lorebook)
    lines = {(line["id"], line["turn"]): line["entries"] for line in logs if line["event"] == "lorebook entries"}
    assert lines[("k-1", 1)] == ["the lamp and lens"] and lines[("k-3", 1)] == ["the Alder Queen"]
    assert ("k-2", 1) not in lines  # no key: nothing inserted, nothing logged
    assert lines[("k-1", 2)][0] == "the lamp and lens"  # still there at turn 2
    render = engine.renderer
    first = sent[0]
    assert first[1] == render.prompt(PROMPTS[1]["prompt"], system=shared)  # without a key, the card alone
    lamp = next(e for e in card.lorebook.entries if e.label == "the lamp and lens")
    assert first[0] == render.prompt(PROMPTS[0]["prompt"], system=f"{shared}\n\n{lamp.text}")
    # the card is the prefix the rows share; and each reply is the one the prompt gets alone (greedy parity)
    assert shared[-40:] in render.decode(first[0][:shared_prefix_length(first)])
    params = SamplingParams.from_config(config.pipeline.teacher)
    for row, prompt in zip(rows, first, strict=True):  # share_prefix=False: no shared prefix, no kept keys
        assert row["messages"][1]["content"] == render.decode(engine.sample([prompt], params, share_prefix=False)[0])
    # the shard's figures, replayed from the records, are what generation counted
    counts = teacher.fired_counts(card.lorebook, rows)
    assert counts["the lamp and lens"] == 2 and counts["the Alder Queen"] == 2 and counts["the fog signal"] >= 0
    assert sum(counts.values()) == sum(len(entries) for entries in lines.values())
