"""Character cards in every format: the example cards are one character and give one teacher system prompt;
placeholders, derived topics and the field mapping; each malformed card is one InputError naming the file."""

from __future__ import annotations

import base64
import json

import pytest
from card_png import EXAMPLES, card_png, chunk, example_png, png

from jobs.card import read_card
from jobs.errors import InputError

FORMATS = {"ada.yaml": "yaml", "ada.v2.json": "chara_card_v2", "ada.v3.json": "chara_card_v3",
           "ada.png": "chara_card_v3 in PNG"}
V2 = json.loads((EXAMPLES / "ada.v2.json").read_text())


def read(name: str):
    return read_card((EXAMPLES / name).read_bytes(), name)


def v2(**data) -> bytes:
    return json.dumps({**V2, "data": {**V2["data"], **data}}).encode()


def test_every_example_card_gives_the_yaml_cards_teacher_system_prompt():
    yaml_card = read("ada.yaml").card
    for name, kind in FORMATS.items():
        found = read(name)
        assert found.format == kind
        assert found.card == yaml_card, name  # every field, so the system prompt, topics and greeting too
        assert found.card.teacher_system_prompt() == yaml_card.teacher_system_prompt()
    prompt = yaml_card.teacher_system_prompt()
    # each part in its documented place, placeholders substituted
    assert prompt.index("You are Augusta Ada King") < prompt.index("Ada Lovelace's personality: curious") \
        < prompt.index("Scenario: An evening salon") < prompt.index("Example dialogue:\nUser: Can the Engine") \
        < prompt.index("Style rules:\n- Answer in two to four sentences, in the first person as Ada Lovelace.")
    assert "{{" not in prompt and "<START>" not in prompt


def test_a_png_with_only_a_v2_chunk_is_the_v2_card():
    found = read_card(card_png(chara=(EXAMPLES / "ada.v2.json").read_bytes()), "v2.png")
    assert found.format == "chara_card_v2 in PNG" and found.card == read("ada.yaml").card


def test_the_committed_png_is_the_one_the_helper_writes():
    assert (EXAMPLES / "ada.png").read_bytes() == example_png()  # regenerate with: python tests/card_png.py


def test_mapping_names_each_source_field_and_unused_ones():
    mapping = read("ada.v2.json").mapping
    assert mapping["data.description"] == "system_prompt (after data.system_prompt)"
    assert mapping["data.mes_example"].startswith("example_dialogue")
    assert mapping["data.post_history_instructions"].startswith("style_rules")
    assert mapping["data.first_mes"] == "greeting (not sent to the teacher; `make chat` opens with it)"
    assert mapping["data.creator_notes"] == "not used"
    assert "data.system_prompt" not in mapping  # empty in this card
    assert read("ada.yaml").mapping["topics"] == "topics"


def test_placeholders_v3_nickname_original_and_meta_tags():
    data = {**json.loads((EXAMPLES / "ada.v3.json").read_text())["data"],
            "nickname": "Countess", "system_prompt": "{{original}} Speak as {{Char}} to {{USER}}.",
            "tags": ["female", "NSFW", "mathematics", "horses"]}
    card = read_card(json.dumps({"spec": "chara_card_v3", "data": data}).encode(), "c.json").card
    assert card.system_prompt.startswith("Speak as Countess to User.\n\nYou are Augusta")
    assert card.name == "Ada Lovelace" and "Countess:" in card.example_dialogue
    assert card.topics[:2] == ["mathematics", "horses"]


def test_topics_are_derived_from_the_description_when_too_few_are_declared():
    found = read_card(v2(tags=["poetry"]), "c.json")
    assert found.card.topics[0] == "poetry" and len(found.card.topics) == 6
    assert {"London", "Charles Babbage"} <= set(found.card.topics)  # the names in the description
    assert not {"your", "ada", "lovelace"} & set(found.card.topics)
    assert found.mapping["data.description"].endswith("topics (derived words)")


def test_derived_topics_are_no_markup_user_name_or_sentence_openers():
    description = ("You are Ada, a friend of {{user}}. {{user}}'s questions are about Charles Babbage.\n<START>\n"
                   "- Describe the Analytical Engine in detail.\n\"Explain it,\" she says. RULES: none. You are the "
                   "daughter of Lord Byron's wife, and Charles Babbage's friend.")
    topics = read_card(v2(tags=[], description=description), "c.json").card.topics
    assert topics[:3] == ["Charles Babbage", "Analytical Engine", "Lord Byron"]  # possessives folded in
    assert len(topics) == 6 and not set(topics) & {"Ada", "Lovelace"}  # the card's own name is no topic
    assert not {"User", "User's", "START", "Describe", "Explain", "RULES"} & set(topics)


MALFORMED = {
    "bad JSON": (b'{"spec": "chara_card_v2", "data": {"name": "A",}}',
                 "c.json:1:48: not valid JSON (Expecting property name"),
    "wrong spec": (json.dumps({**V2, "spec": "chara_card_v9"}).encode(),
                   "c.json: spec 'chara_card_v9': expected a Character Card with spec chara_card_v2 or chara_card_v3"),
    "no spec": (json.dumps({"data": V2["data"]}).encode(), "c.json: no 'spec' field"),
    "no data": (json.dumps({"spec": "chara_card_v2"}).encode(), "c.json: card field data is missing"),
    "missing name": (v2(name=None), "c.json: card field data.name Input should be a valid string"),
    "blank name": (v2(name="  "), "c.json: card field data.name Value error, must not be blank"),
    "missing description": (json.dumps({**V2, "data": {k: v for k, v in V2["data"].items() if k != "description"}}
                                       ).encode(), "c.json: card field data.description is missing"),
    "description too short": (v2(description="Hi."), "c.json: card field data.description is too short"),
    "tags not a list": (v2(tags="maths"), "c.json: card field data.tags Input should be a valid list"),
    "JSON array": (b"[1, 2]", "c.json: a character card must be a YAML mapping, Character Card V2/V3 JSON or a PNG"),
    "PNG without a card": (png({"Software": b"paint"}), "c.json: the PNG carries no character card (no tEXt chunk "
                                                         "ccv3 or chara)"),
    "PNG with bad base64": (png({"chara": b"not*base64!"}), "c.json (tEXt chunk 'chara'): not valid base64"),
    "PNG with a bad card": (card_png(chara=b'{"spec": "chara_card_v2"'), "c.json (tEXt chunk 'chara'):1:"),
    "PNG cut off": (example_png()[:40], "c.json: not a valid PNG"),
    "PNG with a damaged chunk": (example_png()[:33] + chunk(b"tEXt", b"chara\0AAAA")[:-1] + b"\0",
                                 "c.json: not a valid PNG (chunk 'tEXt' at byte 33 fails its CRC)"),
    "YAML list": (b"- a\n- b\n", "c.json: a character card must be a YAML mapping"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_card_is_one_line_naming_the_file(case):
    data, message = MALFORMED[case]
    with pytest.raises(InputError) as caught:
        read_card(data, "c.json")
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_base64_of_the_example_is_what_the_png_carries():
    assert base64.b64encode((EXAMPLES / "ada.v2.json").read_bytes()) in example_png()
