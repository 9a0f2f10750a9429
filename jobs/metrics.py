"""Every figure evaluate writes to metrics.json, declared once: its key, label, unit and which way is better.

`record` rounds evaluate's figures as their units say and refuses a figure not declared here; `figure_rows` is
the figure table that the report and the model card both show. A new metric is its line here and the evaluate
function that computes it. `OPTIONAL` metrics are measured only where a setting turns them on (the rubric judge:
`evaluate.rubric_judge`): metrics.json and the table hold them where measured, all of them, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Better = Literal["higher", "lower", "neither"]
ARROWS: dict[Better, str] = {"higher": "↑", "lower": "↓", "neither": ""}


class Row(NamedTuple):
    """One line of a figure table."""

    label: str
    value: str
    unit: str = ""
    better: str = ""  # an arrow from ARROWS


@dataclass(frozen=True)
class Unit:
    name: str
    digits: int | None  # decimals kept in metrics.json; None keeps the value as computed (dollars are tiny)
    shown: str  # the table's format spec

    def round(self, value: float | None) -> float | None:
        return value if value is None or self.digits is None else round(value, self.digits)

    def format(self, value: float | None) -> str:
        return "n/a" if value is None else format(value, self.shown)


COSINE = Unit("cosine", 4, ".3f")
SHARE = Unit("share", 4, ".1%")
NATS = Unit("nats/token", 4, ".3f")
TOKENS = Unit("tokens", 1, ",.0f")
RATIO = Unit("x", 3, ".2f")
SECONDS = Unit("s", 4, ".3f")
DOLLARS = Unit("$", None, ".6f")
COUNT = Unit("prompts", None, ",.0f")
SCORE = Unit("of 5", 2, ".2f")  # a grade from 1 to 5
KAPPA = Unit("kappa", 3, ".2f")  # Cohen's kappa: 1 full agreement, 0 what chance gives


@dataclass(frozen=True)
class Metric:
    """A figure of metrics.json. A key with `{}` declares a family: one key per variant (a role, with or without
    the card), shown in one table row."""

    key: str
    label: str
    unit: Unit
    better: Better
    variants: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key.format(v) for v in self.variants) or (self.key,)

    def of(self, variant: str) -> str:
        """One variant's key: `SIMILARITY.of("student") == "similarity_student"`."""
        if variant not in self.variants:
            raise KeyError(f"metric {self.key} has no variant {variant!r} (it has: {', '.join(self.variants)})")
        return self.key.format(variant)

    def row(self, figures: dict[str, float | None]) -> Row:
        variants = " / ".join(v.replace("_", " ") for v in self.variants)
        label = f"{self.label}: {variants}" if variants else self.label
        value = " / ".join(self.unit.format(figures[key]) for key in self.keys)
        return Row(label, value, self.unit.name, ARROWS[self.better])


ROLES = ("student", "base", "teacher")  # the teacher is the base model with the card as its system prompt
CARD = ("with_card", "without_card")
# evaluate's persona checks (`jobs.evaluation.persona`), on prompts shipped in jobs/assets/persona/checks.yaml
PERSONA_CHECKS = ("identity", "holding_role", "knowledge_boundary", "capability")
# the rubric judge's dimensions (`jobs.evaluation.rubric`; their scales in jobs/assets/persona/rubric.yaml), and the
# judges its in-character grade is compared with, reply by reply
RUBRIC_DIMENSIONS = ("in_character", "voice", "knowledge_boundary")
RUBRIC_COMPARED_JUDGES = ("embedding", "lexical")

# in table order. What dropping the card saves (reduction, ratios of with ÷ without) is better higher: it is what
# the student is for
SIMILARITY = Metric("similarity_{}", "similarity to teacher (a second teacher sample: its own spread)", COSINE,
                    "higher", ("student", "base", "teacher_resampled"))
PERSONA_SIMILARITY = Metric("persona_similarity_{}", "similarity to the character (name, topics)", COSINE, "higher",
                            ROLES)
OUT_OF_CHARACTER = Metric("out_of_character_{}", 'replies out of character ("as an AI"...)', SHARE, "lower", ROLES)
IN_CHARACTER = Metric("in_character_{}", "judged in character (a classifier of teacher vs base replies)", SHARE,
                      "higher", ("student", "base", "teacher_resampled"))
LATER_TURN = 3  # the first turn of the figures "turns 3+"
IN_CHARACTER_TURN_1 = Metric("in_character_turn_1_{}", "judged in character in held-out conversations, turn 1",
                             SHARE, "higher", IN_CHARACTER.variants)
IN_CHARACTER_LATER = Metric("in_character_turn_3_on_{}", "judged in character in held-out conversations, turns 3+",
                            SHARE, "higher", IN_CHARACTER.variants)
# the same conversations held by each model itself, its own replies as history (`jobs.evaluation.consistency`)
IN_CHARACTER_OWN_LATER = Metric("in_character_own_turn_3_on_{}", "judged in character in its own conversations (its "
                                "own replies as history; the teacher's: its recorded ones), turns 3+", SHARE,
                                "higher", IN_CHARACTER.variants)
JUDGE_ACCURACY = Metric("judge_accuracy", "the judge's accuracy on replies it did not learn from (cross-validated)",
                        SHARE, "higher")
# how well it tells the teacher from the base after the same history: the base catches up at later turns
JUDGE_ACCURACY_BY_TURN = Metric("judge_accuracy_{}", "the judge's accuracy (cross-validated) by conversation "
                                "turn", SHARE, "higher", ("turn_1", "turn_3_on"))
# a second judge on words and letter sequences instead of sentence embeddings: the embeddings see what a reply is
# about, the n-grams how it is said (tense, person, function words, punctuation), so it tells the teacher's voice
# from a reply that only shares its topics
IN_CHARACTER_LEXICAL = Metric("in_character_lexical_{}", "judged in character by a classifier of word and letter "
                              "n-grams (the voice, not the topic)", SHARE, "higher", IN_CHARACTER.variants)
LEXICAL_JUDGE_ACCURACY = Metric("lexical_judge_accuracy", "the n-gram judge's accuracy on replies it did not learn "
                                "from (cross-validated)", SHARE, "higher")
KL = Metric("kl_{}", "KL(teacher with card ‖ model) per token of the teacher's replies", NATS, "lower",
            ("student", "base"))
KL_CLOSED = Metric("kl_closed", "KL closed: share of the base's KL to the teacher that the student removed", SHARE,
                   "higher")
# the teacher's replies are samples (temperature, repetition penalty): a student fitted to them can score them
# better than the teacher's own distribution does, so these NLLs are not a distance to the teacher (KL is)
NLL = Metric("nll_{}", "NLL of the teacher's sampled replies", NATS, "lower", ROLES)
# the persona checks: student and base without the card, the teacher (the base model) with it; each a share of the
# check's prompts whose replies pass its rule (`jobs.evaluation.persona` says how each is scored)
IDENTITY = Metric("identity_{}", "identity: asked who it is, names the character or its self-description", SHARE,
                  "higher", ROLES)
HOLDS_ROLE = Metric("holds_role_{}", "holds the role under manipulation (no out-of-character phrase, no AI admission)",
                    SHARE, "higher", ROLES)
KNOWLEDGE_BOUNDARY = Metric("knowledge_boundary_{}", "knowledge boundary: asked about things after its era, answers "
                            "without modern terms and in character", SHARE, "higher", ROLES)
CAPABILITY = Metric("capability_{}", "capability: ordinary questions answered right (student and base without the "
                    "card)", SHARE, "higher", ROLES)
CAPABILITY_DROP = Metric("capability_drop", "capability drop: base minus student on the ordinary questions (the "
                         "cost of distillation)", SHARE, "lower")
PERSONA_PROMPTS = Metric("persona_prompts_{}", "persona check prompts (n, for each role)", COUNT, "neither",
                         PERSONA_CHECKS)
CONSISTENT = Metric("consistent_{}", "consistent: a fact asked again two turns later is not contradicted", SHARE,
                    "higher", IN_CHARACTER.variants)
CONSISTENCY_PAIRS = Metric("consistency_pairs_{}", "facts compared across turns (n)", COUNT, "neither",
                           IN_CHARACTER.variants)
PROMPT_TOKENS = Metric("prompt_tokens_{}", "prompt tokens per request", TOKENS, "lower", CARD)
TOKEN_REDUCTION = Metric("token_reduction", "token reduction (prompt tokens saved without the card)", SHARE, "higher")
REPLY_TOKENS = Metric("reply_tokens", "reply tokens per request (the teacher's)", TOKENS, "neither")
COST_PER_REQUEST = Metric("cost_per_request_{}", "cost per request", DOLLARS, "lower", CARD)
COST_RATIO = Metric("cost_ratio", "cost ratio per request (with ÷ without card)", RATIO, "higher")
PROMPT_COST_RATIO = Metric("prompt_cost_ratio", "cost ratio of the prompt tokens alone", RATIO, "higher")
LATENCY = Metric("latency_{}_s", "latency per request", SECONDS, "lower", CARD)
LATENCY_RATIO = Metric("latency_ratio", "latency ratio per request (with ÷ without card)", RATIO, "higher")
PREFILL = Metric("prefill_{}_s", "prefill latency per request", SECONDS, "lower", CARD)
PREFILL_RATIO = Metric("prefill_ratio", "prefill latency ratio (with ÷ without card)", RATIO, "higher")
# the rubric judge (`evaluate.rubric_judge`): the teacher model grades each held-out reply of each role 1-5 per
# dimension; a grade it gave in no readable form is left out (counted, never guessed)
RUBRIC_IN_CHARACTER = Metric("rubric_in_character_{}", "rubric judge (the teacher model grades, 1-5): in character",
                             SCORE, "higher", IN_CHARACTER.variants)
RUBRIC_VOICE = Metric("rubric_voice_{}", "rubric judge: the character's voice", SCORE, "higher",
                      IN_CHARACTER.variants)
RUBRIC_BOUNDARY = Metric("rubric_knowledge_boundary_{}", "rubric judge: keeps to what the character can know", SCORE,
                         "higher", IN_CHARACTER.variants)
RUBRIC_GRADED = Metric("rubric_graded_{}", "replies the rubric judge graded on every dimension (n)", COUNT, "neither",
                       IN_CHARACTER.variants)
RUBRIC_UNREAD = Metric("rubric_unread_{}", "rubric grades not read from the grader's answer (n, left out)", COUNT,
                       "lower", IN_CHARACTER.variants)
# higher: the cheap judges (every run has them) then say what the larger grader says
RUBRIC_AGREEMENT = Metric("rubric_agreement_{}", "the rubric judge's in character (a grade at its threshold or "
                          "above) agrees with the embedding / n-gram judge, per reply", SHARE, "higher",
                          RUBRIC_COMPARED_JUDGES)
RUBRIC_KAPPA = Metric("rubric_kappa_{}", "the rubric judge's agreement with the embedding / n-gram judge beyond "
                      "chance (Cohen's kappa)", KAPPA, "higher", RUBRIC_COMPARED_JUDGES)
RUBRIC_COMPARED = Metric("rubric_compared", "replies the agreement is counted on (n, every role's with an in "
                         "character grade)", COUNT, "neither")

METRICS = (SIMILARITY, PERSONA_SIMILARITY, OUT_OF_CHARACTER, IN_CHARACTER, IN_CHARACTER_TURN_1, IN_CHARACTER_LATER,
           IN_CHARACTER_OWN_LATER,
           JUDGE_ACCURACY, JUDGE_ACCURACY_BY_TURN, IN_CHARACTER_LEXICAL, LEXICAL_JUDGE_ACCURACY, KL, KL_CLOSED, NLL,
           IDENTITY, HOLDS_ROLE, KNOWLEDGE_BOUNDARY, CAPABILITY, CAPABILITY_DROP, PERSONA_PROMPTS, CONSISTENT,
           CONSISTENCY_PAIRS,
           PROMPT_TOKENS, TOKEN_REDUCTION,
           REPLY_TOKENS, COST_PER_REQUEST, COST_RATIO, PROMPT_COST_RATIO, LATENCY, LATENCY_RATIO, PREFILL,
           PREFILL_RATIO)
KEYS = tuple(key for metric in METRICS for key in metric.keys)
# after METRICS in the table
OPTIONAL = (RUBRIC_IN_CHARACTER, RUBRIC_VOICE, RUBRIC_BOUNDARY, RUBRIC_GRADED, RUBRIC_UNREAD, RUBRIC_AGREEMENT,
            RUBRIC_KAPPA, RUBRIC_COMPARED)
OPTIONAL_KEYS = tuple(key for metric in OPTIONAL for key in metric.keys)


def measured(figures: dict) -> tuple[Metric, ...]:
    """The metrics these figures hold: every one of METRICS, and the optional ones where they were measured."""
    return METRICS + OPTIONAL * any(key in figures for key in OPTIONAL_KEYS)


def record(figures: dict[str, float | None]) -> dict[str, float | None]:
    """The figures in table order, rounded as their units say; every registered key must be there (the optional
    ones all or none), and no other."""
    expected = {key for metric in measured(figures) for key in metric.keys}
    unknown, missing = sorted(set(figures) - expected), sorted(expected - set(figures))
    if unknown or missing:
        raise ValueError(f"figures do not match jobs.metrics: not registered {unknown}, not computed {missing}")
    return {key: metric.unit.round(figures[key]) for metric in measured(figures) for key in metric.keys}


def figure_rows(figures: dict[str, float | None]) -> list[Row]:
    """Evaluate's figure table, a row a metric measured: what the report and the model card both show."""
    return [metric.row(figures) for metric in measured(figures)]


HEADER = Row("figure", "value", "unit", "better")


def markdown_table(rows: list[Row]) -> str:
    lines = [HEADER, Row("---", "---", "---", "---"), *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)
