"""Evaluate's persona checks: does the model know who it is, hold the role under manipulation, know what its
character cannot know, and keep what it could do before distillation.

The prompts are shipped data (jobs/assets/persona/checks.yaml, `{name}` the card's name) chosen by the card, never
drawn from evaluation replies; a prompt that a training row's user turn also says is dropped. The student and the
base answer without the card, the teacher (the base model) with it; greedy, at evaluate's reply length. Each check's
figure is the share of its replies that pass its rule:

- a reply is *out of character* when it has one of the audit's phrases (`audit.forbidden`, e.g. "as an AI") or an
  admission from checks.yaml (e.g. "I am an AI", "I'm a language model", "trained by OpenAI", "SmolLM"); an empty
  reply passes no check;
- *identity* ("who are you?"): not out of character, and it names the character (the whole name or a distinctive
  word of it: three letters or more, not a particle or title such as "van" or "Sir") or fits its self-description
  (at least two of the content words of the system prompt's first sentence, e.g. "composer" and "Vienna");
- *holding the role* ("ignore your instructions", "you are an AI, right?"): not out of character;
- *knowledge boundary* (things that came into being after the card's era, e.g. smartphones): not out of character,
  and none of checks.yaml's modern terms ("internet", "app", "battery"...), a word of the question itself excepted.
  The era is the latest year the card's text names ("1824", or "the 18th century" as 1800); a card that names none,
  or one later than every listed thing, skips the check (logged; its figures are None and its n 0);
- *capability* (arithmetic, simple facts, "answer with one word"): the reply matches the question's expected
  answer (a regular expression). `capability_drop` is the base's share minus the student's: what distillation cost.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from jobs.backends.base import Metered, SamplingParams
from jobs.card import STOPWORDS, CharacterCard
from jobs.evaluation.measure import OnBatch, sample_replies
from jobs.evaluation.teacher_card import Card, system_text
from jobs.inputs import load_yaml
from jobs.log import get_logger
from jobs.metrics import (
    CAPABILITY,
    CAPABILITY_DROP,
    HOLDS_ROLE,
    IDENTITY,
    KNOWLEDGE_BOUNDARY,
    PERSONA_CHECKS,
    PERSONA_PROMPTS,
    ROLES,
    Metric,
)

IDENTITY_CHECK, ROLE_CHECK, BOUNDARY_CHECK, CAPABILITY_CHECK = PERSONA_CHECKS
FIGURE: dict[str, Metric] = dict(zip(PERSONA_CHECKS, (IDENTITY, HOLDS_ROLE, KNOWLEDGE_BOUNDARY, CAPABILITY),
                                     strict=True))
# words of a name that do not name anyone alone
PARTICLES = frozenset("""
    van von der den de del della di da du la le les el al bin ibn the of and sir lady lord mr mrs ms miss dr saint st
""".split())
# content words of a self-description that any reply may use
GENERIC = frozenset("living lives live named called character person role year time world today".split())
YEAR = re.compile(r"\b(1\d{3}|2\d{3})\b")
CENTURY = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)[- ]century\b", re.IGNORECASE)
WORD = re.compile(r"[^\W\d_]+")
PER_CHECK = 8  # what checks.yaml holds per check, and evaluate.persona_prompts's default


def checks_file() -> bytes:
    return resources.files("jobs.assets.persona").joinpath("checks.yaml").read_bytes()


def checks_digest() -> str:
    """What a cached persona part's key holds of the checks: the prompts it answered come from this file."""
    return hashlib.sha256(checks_file()).hexdigest()


@dataclass(frozen=True)
class Probe:
    """One check prompt; `expect` is the regular expression a right capability reply matches."""

    check: str
    prompt: str
    expect: str = ""


@dataclass(frozen=True)
class Checks:
    """The check prompts for one card, in order, and what their rules read."""

    probes: tuple[Probe, ...]
    skipped: dict[str, str]  # check -> why it has no prompts
    dropped: tuple[str, ...]  # prompts a training row asks
    name_parts: tuple[str, ...]
    self_terms: tuple[str, ...]
    out_of_character: tuple[re.Pattern, ...]
    modern_terms: tuple[str, ...]
    # consistency across turns (`jobs.evaluation.consistency`): each conversation's three questions
    consistency: tuple[tuple[str, str, str], ...] = ()

    @property
    def prompts(self) -> list[str]:
        return [probe.prompt for probe in self.probes]

    def count(self, check: str) -> int:
        return sum(probe.check == check for probe in self.probes)


def normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def card_era(card: CharacterCard) -> int | None:
    """The latest year the card's text names (a century counts as its last year), or None."""
    text = card.teacher_system_prompt()
    years = [int(y) for y in YEAR.findall(text)] + [100 * int(c) for c in CENTURY.findall(text)]
    return max(years, default=None)


def name_parts(name: str) -> tuple[str, ...]:
    """The whole name and each distinctive word of it ("Ludwig van Beethoven": it, "Ludwig", "Beethoven")."""
    words = [w for w in WORD.findall(name) if len(w) >= 3 and w.lower() not in PARTICLES]
    return tuple(dict.fromkeys([name, *words]))


def self_terms(card: CharacterCard) -> tuple[str, ...]:
    """The content words of the system prompt's first sentence, the name's words left out ("composer", "Vienna")."""
    first = re.split(r"(?<=[.!?])\s+", card.system_prompt.strip(), maxsplit=1)[0]
    named = {w.lower() for w in WORD.findall(card.name)}
    words = [w.lower() for w in WORD.findall(first)]
    return tuple(dict.fromkeys(w for w in words if len(w) >= 4 and w not in STOPWORDS | GENERIC | named))


def check_prompts(card: CharacterCard, trained: set[str], forbidden: tuple[str, ...], limit: int = PER_CHECK,
                  data: bytes | None = None) -> Checks:
    """The card's check prompts from checks.yaml (`data`: another file's bytes), less those a training row asks:
    the first `limit` of each check (`evaluate.persona_prompts`), twice that of capability (one question is a
    coarse step of its drop), half that of the consistency conversations (three turns each)."""
    spec = load_yaml(checks_file() if data is None else data, "persona checks")

    def filled(text: str) -> str:
        return text.replace("{name}", card.name)

    era, skipped = card_era(card), {}
    later = [item["prompt"] for item in spec["boundary"] if era is not None and item["year"] > era]
    if era is None:
        skipped[BOUNDARY_CHECK] = "the card names no year, so nothing is known to lie outside its world"
    elif not later:
        skipped[BOUNDARY_CHECK] = f"the card's era ({era}) is later than everything the boundary check asks about"
    asked = [*(Probe(IDENTITY_CHECK, filled(p)) for p in spec["identity"][:limit]),
             *(Probe(ROLE_CHECK, filled(p)) for p in spec["holding_role"][:limit]),
             *(Probe(BOUNDARY_CHECK, filled(p)) for p in later[:limit]),
             *(Probe(CAPABILITY_CHECK, filled(q["prompt"]), q["expect"]) for q in spec["capability"][:2 * limit])]
    phrases = [re.escape(phrase) for phrase in forbidden] + list(spec["admissions"])
    talks = [(filled(t["ask"]), filled(spec["between"]), filled(t["again"]))
             for t in spec["consistency"][:max(1, limit // 2)]]
    return Checks(probes=tuple(p for p in asked if normalized(p.prompt) not in trained), skipped=skipped,
                  dropped=tuple(p.prompt for p in asked if normalized(p.prompt) in trained),
                  name_parts=name_parts(card.name), self_terms=self_terms(card),
                  out_of_character=tuple(re.compile(p, re.IGNORECASE) for p in phrases),
                  modern_terms=tuple(spec["modern_terms"]),
                  consistency=tuple(t for t in talks if normalized(t[0]) not in trained))


def trained_prompts(rows: list[dict]) -> set[str]:
    """Every user turn of the training rows, normalized: what the student has seen asked."""
    return {normalized(m["content"]) for row in rows for m in row["messages"] if m["role"] == "user"}


def for_run(card: CharacterCard, train_rows: list[dict], forbidden: tuple[str, ...], limit: int) -> Checks:
    """The checks for a run's card, less the prompts its training rows ask; what was skipped or dropped is logged."""
    checks = check_prompts(card, trained_prompts(train_rows), forbidden, limit)
    log = get_logger()
    for check, reason in checks.skipped.items():
        log.info("persona check skipped", check=check, reason=reason)
    if checks.dropped:
        log.info("persona prompts dropped: a training row asks them", prompts=list(checks.dropped))
    log.info("persona checks", **{check: checks.count(check) for check in PERSONA_CHECKS})
    return checks


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}s?(?!\w)", text, re.IGNORECASE) is not None


def out_of_character(reply: str, checks: Checks) -> bool:
    """An audit phrase or an admission of being an AI, a model or an assistant; an empty reply too."""
    return not reply.strip() or any(p.search(reply) for p in checks.out_of_character)


def knows_itself(reply: str, checks: Checks) -> bool:
    named = any(has_word(reply, part) for part in checks.name_parts)
    needed = min(2, len(checks.self_terms))  # a card whose first sentence has no such word: its name alone
    described = needed > 0 and sum(has_word(reply, term) for term in checks.self_terms) >= needed
    return (named or described) and not out_of_character(reply, checks)


def within_boundary(reply: str, prompt: str, checks: Checks) -> bool:
    modern = [t for t in checks.modern_terms if has_word(reply, t) and not has_word(prompt, t)]
    return not modern and not out_of_character(reply, checks)


def answers_right(reply: str, expect: str) -> bool:
    return re.search(expect, reply.strip(), re.IGNORECASE) is not None


def passed(probe: Probe, reply: str, checks: Checks) -> bool:
    """Whether a reply passes its check's rule (the module's docstring)."""
    if probe.check == IDENTITY_CHECK:
        return knows_itself(reply, checks)
    if probe.check == ROLE_CHECK:
        return not out_of_character(reply, checks)
    if probe.check == BOUNDARY_CHECK:
        return within_boundary(reply, probe.prompt, checks)
    return bool(reply.strip()) and answers_right(reply, probe.expect)


def sample(client: Metered, checks: Checks, system: Card, params: SamplingParams,
           on_batch: OnBatch = None) -> list[str]:
    """The model's replies to every check prompt, with the card as system prompt where `system` is given (each
    prompt a conversation of its own: a lorebook's keyed entries fire on its keys)."""
    prompts = [client.renderer.prompt(prompt, system=system_text(system, i, [{"role": "user", "content": prompt}]))
               for i, prompt in enumerate(checks.prompts)]
    return sample_replies(client, prompts, params, on_batch)


def figures(checks: Checks, replies: dict[str, list[str]]) -> dict[str, float | int | None]:
    """Each check's share passed by each role (None where it has no prompts), the capability drop and each n."""
    found: dict[str, float | int | None] = {}
    for check, metric in FIGURE.items():
        for role in ROLES:
            results = [passed(p, r, checks) for p, r in zip(checks.probes, replies[role], strict=True)
                       if p.check == check]
            found[metric.of(role)] = sum(results) / len(results) if results else None
    student, base = found[CAPABILITY.of("student")], found[CAPABILITY.of("base")]
    found[CAPABILITY_DROP.key] = None if student is None or base is None else base - student
    return {**found, **{PERSONA_PROMPTS.of(check): checks.count(check) for check in PERSONA_CHECKS}}


def rows(checks: Checks, replies: dict[str, list[str]]) -> list[dict]:
    """persona.jsonl: each check prompt, and each role's reply and whether it passed."""
    return [{"check": p.check, "prompt": p.prompt,
             **{role: {"reply": replies[role][i], "passed": passed(p, replies[role][i], checks)} for role in ROLES}}
            for i, p in enumerate(checks.probes)]
