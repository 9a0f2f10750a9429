"""The character card: who the teacher plays.

Three formats, told apart by their bytes (not the file name): the project's YAML card; Character Card V2/V3
JSON (`spec: chara_card_v2` / `chara_card_v3`, fields under `data`); and such a card in a PNG's `tEXt` chunk
(`ccv3` for V3, `chara` for V2, base64 JSON). Each becomes one `CharacterCard`; `read_card` also says which
source field went where (README: "Your own character"). `{{char}}` and `{{user}}` are substituted in every text.
A V2/V3 `character_book` (YAML: `lorebook`, the same shape) becomes the card's lorebook (`jobs.lorebook`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from jobs.assets import builtin
from jobs.config import IngestConfig
from jobs.errors import InputError
from jobs.inputs import decode_text, load_yaml
from jobs.lorebook import Lorebook, system_prompt
from jobs.lorebook import topics as lorebook_topics
from jobs.store import StoreSettings, fetch_source

USER_NAME = "User"  # what {{user}} becomes: the teacher talks to one anonymous user
SPECS = ("chara_card_v2", "chara_card_v3")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEYWORDS = ("ccv3", "chara")  # V3's chunk first: a V3 writer keeps a V2 copy in `chara` for old readers
MIN_TOPICS = 6  # fewer declared topics (YAML `topics`, V2/V3 `tags`) are filled up from the description
MAX_LOREBOOK_TOPICS = 12  # topics a lorebook adds (its highest-ranked keyed entries' keys), past the declared ones
MIN_SYSTEM_CHARS = 20
# V2/V3 tags that say what kind of card it is, not what the character talks about (a tag of these words alone,
# e.g. "original character")
META_TAGS = frozenset("""
    male female nsfw sfw oc original character human english roleplay rp bot chatbot ai other non-binary anime
""".split())
STOPWORDS = frozenset("""
    a about above after again against all also always am an and any are as at be because been before being below
    between both but by can could did do does doing down during each every few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just know like many may me
    might more most much must my myself never no nor not now of off often on once only or other our ours
    ourselves out over own people same says she should since so some still such than that the their theirs them
    themselves then there these they this those through to too under until up upon very was way we well were
    what when where which while who whom why will with would yet you your yours yourself yourselves user char
    speak speaks answer answers always never first person years behind
""".split())


class CharacterCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    system_prompt: str = Field(min_length=MIN_SYSTEM_CHARS)
    personality: str = ""
    scenario: str = ""
    example_dialogue: str = ""
    style_rules: list[str] = []
    topics: list[str] = []
    greeting: str = ""
    lorebook: Lorebook | None = None

    @field_validator("name", "system_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @model_serializer(mode="wrap")
    def _without_a_missing_book(self, handler):
        # a card without a lorebook dumps as it did before there were lorebooks: its card.json, and every key
        # made from it, stay the same
        dumped = handler(self)
        if dumped.get("lorebook") is None:
            dumped.pop("lorebook", None)
        return dumped

    def teacher_system_prompt(self) -> str:
        """The text every teacher prompt's system message starts with, in this order: the lorebook's constant
        entries placed before_char, the prompt, the personality, the scenario, the example dialogue, the style
        rules (empty parts left out), the constant entries placed after_char. A conversation's keyed entries
        follow it (`jobs.lorebook.with_entries`)."""
        rules = "".join(f"\n- {rule}" for rule in self.style_rules)
        parts = [self.system_prompt,
                 f"{self.name}'s personality: {self.personality}" if self.personality else "",
                 f"Scenario: {self.scenario}" if self.scenario else "",
                 f"Example dialogue:\n{self.example_dialogue}" if self.example_dialogue else "",
                 f"Style rules:{rules}" if rules else ""]
        return system_prompt("\n\n".join(part for part in parts if part), self.lorebook)


class _V2Data(BaseModel):
    """The fields of Character Card V2 (and V3, which adds to them) that ingest reads; others are ignored."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    tags: list[str] = []
    nickname: str = ""  # V3: what {{char}} stands for when set
    character_book: Lorebook | None = None

    @field_validator("name", "description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


# V2/V3 field -> the CharacterCard field it fills (README: "Your own character"); fields not listed are not read
V2_MAPPING = {
    "data.name": "name",
    "data.system_prompt": "system_prompt (first paragraph; {{original}} dropped)",
    "data.description": "system_prompt (after data.system_prompt)",
    "data.personality": "personality",
    "data.scenario": "scenario",
    "data.mes_example": "example_dialogue (<START> lines dropped)",
    "data.post_history_instructions": "style_rules (one rule a line)",
    "data.first_mes": "greeting (not sent to the teacher; `make chat` opens with it)",
    "data.tags": "topics (meta tags such as 'female' or 'nsfw' dropped)",
    "data.nickname": "{{char}} (V3)",
    "data.character_book": "lorebook (constant entries in the teacher's system prompt, keyed ones when a key occurs)",
}


@dataclass(frozen=True)
class ReadCard:
    card: CharacterCard
    format: str  # yaml, chara_card_v2, chara_card_v3; "... in PNG" when embedded
    mapping: dict[str, str]  # source field -> where it went, for the fields the card fills


def card_bytes(ingest: IngestConfig, settings: StoreSettings) -> bytes:
    if ingest.card.startswith("builtin:"):
        return builtin(ingest.card, "cards", ".yaml")
    return fetch_source(settings, ingest.card, ingest.max_input_mb)


def parse_card(data: bytes, where: str) -> CharacterCard:
    return read_card(data, where).card


def read_card(data: bytes, where: str) -> ReadCard:
    """The card in `data`, whichever format; bad input is one InputError naming `where` and the fault."""
    if data.startswith(PNG_SIGNATURE):
        keyword, payload = _png_card(data, where)
        inner = f"{where} (tEXt chunk {keyword!r})"
        try:
            text = base64.b64decode(b"".join(payload.split()), validate=True)  # wrapped lines are fine
        except (binascii.Error, ValueError):
            raise InputError(f"{inner}: not valid base64") from None
        read = _chara_card(text, inner)
        return ReadCard(read.card, f"{read.format} in PNG", read.mapping)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return _chara_card(data, where)
    return _yaml_card(data, where)


def _yaml_card(data: bytes, where: str) -> ReadCard:
    tree = load_yaml(data, where)
    if not isinstance(tree, dict):
        raise InputError(f"{where}: a character card must be a YAML mapping, Character Card V2/V3 JSON or a PNG "
                         "with one")
    card = _validated(CharacterCard, tree, where)
    finished = _finished(card.model_dump(), card.name, card.system_prompt)
    mapping = {field: field for field, value in tree.items() if value}
    _topics_noted(mapping, card.topics, finished["topics"], card.lorebook, "lorebook", "system_prompt")
    if card.lorebook is not None:
        mapping["lorebook"] = card.lorebook.summary() + mapping["lorebook"].removeprefix("lorebook")
    return ReadCard(_validated(CharacterCard, finished, where), "yaml", mapping)


def _chara_card(data: bytes, where: str) -> ReadCard:
    try:
        tree = json.loads(decode_text(data, where))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(tree, dict):
        raise InputError(f"{where}: a character card must be a JSON object")
    spec = tree.get("spec")
    if spec not in SPECS:
        found = "no 'spec' field" if spec is None else f"spec {spec!r}"
        raise InputError(f"{where}: {found}: expected a Character Card with spec {' or '.join(SPECS)}")
    if not isinstance(tree.get("data"), dict):
        raise InputError(f"{where}: card field data is missing or not an object")
    fields = _validated(_V2Data, tree["data"], where, "data.")
    system = "\n\n".join(part.strip() for part in (fields.system_prompt.replace("{{original}}", ""),
                                                    fields.description) if part.strip())
    if len(system) < MIN_SYSTEM_CHARS:
        raise InputError(f"{where}: card field data.description is too short: with data.system_prompt it makes "
                         f"{len(system)} characters of system prompt, under {MIN_SYSTEM_CHARS}")
    rules = [line.strip().lstrip("-*• ").strip() for line in fields.post_history_instructions.splitlines()]
    dialogue = "\n".join(line for line in fields.mes_example.strip().splitlines() if line.strip() != "<START>")
    card = {"name": fields.name.strip(), "system_prompt": system, "personality": fields.personality.strip(),
            "scenario": fields.scenario.strip(), "example_dialogue": re.sub(r"\n{3,}", "\n\n", dialogue).strip(),
            "style_rules": [rule for rule in rules if rule], "greeting": fields.first_mes.strip(),
            "topics": [tag.strip() for tag in fields.tags if not set(tag.lower().split()) <= META_TAGS],
            "lorebook": fields.character_book.model_dump() if fields.character_book else None}
    mapping = {source: target for source, target in V2_MAPPING.items()
               if getattr(fields, source.removeprefix("data."))}
    mapping |= {f"data.{key}": "not used" for key, value in (fields.model_extra or {}).items() if value}
    if fields.character_book is not None:
        mapping["data.character_book"] = fields.character_book.summary()
    finished = _finished(card, fields.nickname.strip() or card["name"], fields.description)
    _topics_noted(mapping, card["topics"], finished["topics"], fields.character_book, "data.character_book",
                  "data.description")
    return ReadCard(_validated(CharacterCard, finished, where), spec, mapping)


def _finished(card: dict, char: str, description: str) -> dict:
    """The card's fields with placeholders substituted, and topics: the declared ones, the lorebook's, then words of
    the description (and the lorebook's constant entries) up to MIN_TOPICS."""
    def fill(text: str) -> str:
        text = re.sub(r"\{\{char\}\}", lambda _: char, text, flags=re.IGNORECASE)
        return re.sub(r"\{\{user\}\}", USER_NAME, text, flags=re.IGNORECASE).strip()

    book = Lorebook.model_validate(card["lorebook"]).filled(fill) if card.get("lorebook") else None
    done = {key: [fill(v) for v in value] if isinstance(value, list) else fill(value) if key != "name" else value
            for key, value in card.items() if key != "lorebook"}
    topics: list[str] = list(dict.fromkeys(done["topics"]))
    taken = {t.lower() for t in topics}
    if book is not None:
        topics += [t for t in lorebook_topics(book, MAX_LOREBOOK_TOPICS) if t.lower() not in taken]
        description = "\n\n".join([description, *(e.text for e in book.constants())])
    if len(topics) < MIN_TOPICS:
        taken = {t.lower() for t in topics}
        names = {w.lower() for w in re.findall(r"\w+", f"{card['name']} {char}")}
        derived = [t for t in derived_topics(fill(description)) if t.lower() not in taken
                   and not names & {w.lower() for w in t.split()}]
        topics += derived[:MIN_TOPICS - len(topics)]
    done["topics"] = topics
    if book is not None:
        done["lorebook"] = book.model_dump()
    return done


def _topics_noted(mapping: dict[str, str], declared: list[str], topics: list[str], book: Lorebook | None,
                  book_field: str, description_field: str) -> None:
    """Notes in `mapping` where the topics past the declared ones came from."""
    from_book = [t for t in lorebook_topics(book, MAX_LOREBOOK_TOPICS) if t in topics] if book else []
    if from_book and set(from_book) - set(declared):
        mapping[book_field] += ", topics (entry keys)"
    if len(set(topics) - set(declared) - set(from_book)):
        mapping[description_field] += ", topics (derived words)"


# capitalised words in a row ("Augustus De Morgan"), possibly possessive ("Babbage's")
NAME = re.compile(r"\b([A-Z][\w'\u2019-]+(?: (?:de |van |von |of )?[A-Z][\w'\u2019-]+)*)")
# a capitalised word opens a sentence when only these stand between it and a sentence end (or the text's start)
SENTENCE_ENDS = ".!?:;\n"
OPENERS = " \t\"'\u201c\u201d\u2018\u2019*_#>()[]-\u2022\u2013\u2014"  # quotes, brackets, bullets, markdown
MARKUP = re.compile(r"<[^<>\n]*>|\{\{[^{}\n]*\}\}")  # <START>, HTML tags, unfilled placeholders


def derived_topics(text: str) -> list[str]:
    """Topics a description suggests, most frequent first: the names in it (capitalised words not opening a
    sentence, e.g. "Charles Babbage"), then its longer ordinary words. Markup (`<START>`), the user's name and
    words in capitals alone ("RULES") are no topics."""
    text = MARKUP.sub(" ", text)
    names: Counter[str] = Counter()
    for m in NAME.finditer(text):
        name = re.sub(r"['\u2019]s$", "", m.group(1))
        before = text[max(0, m.start() - 40):m.start()].rstrip(OPENERS)
        opens = not before or before[-1] in SENTENCE_ENDS
        if opens or name.lower() in STOPWORDS or name == USER_NAME or name.isupper():
            continue
        names[name] += 1
    words = Counter(w for w in re.findall(r"\b[a-z][a-z'-]{4,}\b", text) if w not in STOPWORDS)
    return [t for t, _ in names.most_common()] + [w for w, _ in words.most_common()]


def _validated(model: type[BaseModel], tree: dict, where: str, prefix: str = ""):
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = prefix + ".".join(str(p) for p in first["loc"])
        message = "is missing" if first["type"] == "missing" else first["msg"]
        raise InputError(f"{where}: card field {field} {message}") from None


def _png_card(data: bytes, where: str) -> tuple[str, bytes]:
    """(keyword, base64 text) of the card's tEXt chunk, read with the standard library; every chunk's CRC is
    checked, so a damaged file is refused rather than half read."""
    found: dict[str, bytes] = {}
    position = len(PNG_SIGNATURE)
    while position < len(data):
        if position + 12 > len(data):
            raise InputError(f"{where}: not a valid PNG (cut off at byte {position})")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        crc = data[position + 8 + length:position + 12 + length]
        if len(crc) < 4:
            raise InputError(f"{where}: not a valid PNG (chunk {kind!r} cut off at byte {position})")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise InputError(f"{where}: not a valid PNG (chunk {kind.decode('latin-1')!r} at byte {position} fails "
                             "its CRC)")
        if kind == b"tEXt":
            name, _, text = body.partition(b"\0")
            found.setdefault(name.decode("latin-1").lower(), text)
        if kind == b"IEND":
            break
        position += 12 + length
    for keyword in PNG_KEYWORDS:
        if keyword in found:
            return keyword, found[keyword]
    raise InputError(f"{where}: the PNG carries no character card (no tEXt chunk {' or '.join(PNG_KEYWORDS)})")
