"""Evaluate: how close the student comes to the teacher, and what dropping the card saves.

On held-out prompts: the student (no card), the base model (no card) and the teacher (the base model with the
card: its replies from the split, and a second sample; with a lorebook's keyed entries where the teacher phase
gave them, `jobs.evaluation.teacher_card`). Each figure is declared in `jobs.metrics` with its unit and direction
(`jobs.evaluation.figures` computes them):
- embedding similarity of each reply to the teacher's, next to the second teacher sample's (the teacher's own
  spread: a greedy student can land above it);
- similarity to the character (its name and topics, short enough for the embedding model) and the share of
  replies out of character (the audit's phrases, e.g. "as an AI"), which show the persona;
- an in-character judge: a logistic regression over sentence embeddings, fitted on the teacher's replies in
  training conversations (every turn) against the base model's replies after the same conversations (sampled as
  the teacher samples, without the card), applied to each role's eval replies; and a second judge on word and
  letter n-grams, fitted on the same replies: the embeddings see a reply's topic, the n-grams its voice;
- per-token KL(teacher with card || model) at the positions of the teacher's replies, for student and base
  (`jobs.distill`), and the share of the base's KL the student removed;
- mean per-token NLL of the teacher's sampled replies under student, base and teacher;
- prompt tokens per request with and without the card, and the cost at `evaluate.prices`;
- latency per request and per prefill, with and without the card, on the same model;
- persona checks on prompts shipped in jobs/assets/persona/checks.yaml (`jobs.evaluation.persona` says how each is
  scored): identity (asked who it is, does it name the character), holding the role under manipulation, the
  knowledge boundary (asked about things after the card's era; skipped for a card that names no year) and
  capability (ordinary questions with checkable answers: what distillation cost, base minus student); student and base
  without the card, the teacher with it, each reply in persona.jsonl with whether it passed;
- the held-out conversations held by each model itself, its own replies as history (judged in character per turn,
  and at turns 3+), and whether a fact asked again two turns later is contradicted (`jobs.evaluation.consistency`);
- with `evaluate.rubric_judge`, the teacher model grading every reply 1-5 on rubric.yaml's dimensions, and its
  agreement with both judges (`jobs.evaluation.rubric`: after the student's parts, on the base model, not cached).

The work is a list of parts (`PARTS`). The base model's parts (without the card, and with it: the teacher) do not
depend on the student: each is computed once per split, model, card and the settings it reads, and read from the
store's cache by every later run on the same data (`jobs.evaluation.cache`); the student's parts run every time.
metrics.json holds the figures, `cached` (the parts read from the cache) and `cached_figures` (the figures made
from those parts alone); replies.jsonl each prompt's replies with their similarity and NLL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jobs import distill, metrics
from jobs.backends.base import Metered
from jobs.card import CharacterCard
from jobs.config import PipelineConfig
from jobs.evaluation import consistency, persona, rubric
from jobs.evaluation.cache import PartCache, common_key, machine
from jobs.evaluation.figures import (
    Judge,
    figures,
    judge_positives,
    judge_turns,
    replayed,
    reply_rows,
    similarity_to_teacher,
    turn_rows,
)
from jobs.evaluation.measure import (
    Measured,
    Prompts,
    kl_to_teacher,
    latency,
    replay,
    replies_in,
    reply_nll,
    sample_replies,
)
from jobs.evaluation.parts import Advance, Context, Part
from jobs.evaluation.teacher_card import TeacherCard
from jobs.log import Progress, get_logger
from jobs.metrics import (
    CAPABILITY_DROP,
    CONSISTENCY_PAIRS,
    CONSISTENT,
    IN_CHARACTER,
    IN_CHARACTER_LATER,
    IN_CHARACTER_LEXICAL,
    IN_CHARACTER_OWN_LATER,
    IN_CHARACTER_TURN_1,
    JUDGE_ACCURACY,
    JUDGE_ACCURACY_BY_TURN,
    KEYS,
    KL,
    KL_CLOSED,
    LATENCY,
    LATENCY_RATIO,
    LEXICAL_JUDGE_ACCURACY,
    NLL,
    OUT_OF_CHARACTER,
    PERSONA_SIMILARITY,
    PREFILL,
    PREFILL_RATIO,
    SIMILARITY,
)
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.records import first_reply
from jobs.store import UnitWriter
from jobs.trained import read_adapter


def reply_figures(role: str, character: str, persona: bool = True) -> tuple[str, ...]:
    """The figures a role's replies to the held-out prompts go into; `character` is its variant of the per-character
    figures (the teacher's persona similarity is its first replies', from the split: `persona` False)."""
    return (SIMILARITY.of(role), *(PERSONA_SIMILARITY.of(character),) * persona, OUT_OF_CHARACTER.of(character),
            IN_CHARACTER.of(role), IN_CHARACTER_LEXICAL.of(role))


def by_turn_figures(role: str) -> tuple[str, ...]:
    return IN_CHARACTER_TURN_1.of(role), IN_CHARACTER_LATER.of(role)


def teacher_sampling(pipeline: PipelineConfig, precision: dict) -> dict:
    return {"teacher": pipeline.teacher.model_dump(mode="json"), "seed": pipeline.evaluate.sampling.seed}


def eval_sampling(pipeline: PipelineConfig, precision: dict) -> dict:
    return {"sampling": pipeline.evaluate.sampling.model_dump(mode="json")}


def top_k(pipeline: PipelineConfig, precision: dict) -> dict:
    return {"kl_top_k": pipeline.evaluate.kl_top_k}


def nothing(pipeline: PipelineConfig, precision: dict) -> None:
    return None


def base_nll(client: Metered, ctx: Context, advance: Advance) -> dict:
    """The NLL of the teacher's replies under the base model without the card and with it (the teacher)."""
    found = {"base": reply_nll(client, ctx.prompts.without_card, ctx.prompts.teacher_replies)}
    advance(1)
    found["teacher"] = reply_nll(client, ctx.prompts.with_card, ctx.prompts.teacher_replies)
    advance(1)
    return {"nll": found}


def student_nll(client: Metered, ctx: Context, advance: Advance) -> dict:
    found = reply_nll(client, ctx.prompts.without_card, ctx.prompts.teacher_replies)
    advance(1)
    return {"nll": {"student": found}}


def teacher_topk(client: Metered, ctx: Context, advance: Advance) -> dict:
    # one pass per run of turns under one system message: each turn read with the one it was sampled with
    found = distill.teacher_topk_runs(client, ctx.prompts.runs, ctx.config.pipeline.evaluate.kl_top_k)
    advance(1)
    return {"teacher_topk": found}


def model_kl(role: str) -> Callable[[Metered, Context, Advance], dict]:
    def compute(client: Metered, ctx: Context, advance: Advance) -> dict:
        found = kl_to_teacher(client, ctx.prompts, ctx.seen.teacher_topk)
        advance(1)
        return {"kl": {role: found}}

    return compute


def judge_replies(client: Metered, ctx: Context, advance: Advance) -> dict:
    """The base model's replies the judge learns from: sampled as the teacher samples, each after the same
    conversation the teacher answered (its first question, and for a conversation every later turn too), so that
    the card is the only difference the judge can learn."""
    turns = replay(client, [r["messages"] for r in ctx.judge_rows], None, ctx.as_teacher(2), advance)
    return {"judge_negatives": [reply for replies in turns.values() for reply in replies]}


def latency_part(client: Metered, ctx: Context, advance: Advance) -> dict:
    # one request at a time, each prefilling its whole prompt (no keys and values kept from an earlier call)
    params = dataclasses.replace(ctx.sampling, batch_size=1, reuse_kv=False)
    return {"latency": latency(client, ctx.prompts, ctx.config.pipeline.evaluate.latency_requests, params, advance)}


def latency_settings(pipeline: PipelineConfig, precision: dict) -> dict:
    # a timing is the machine's too: another machine kind measures again
    return {"latency_requests": pipeline.evaluate.latency_requests, **eval_sampling(pipeline, precision),
            "machine": machine(precision.get("device", ""))}


def latency_steps(ctx: Context) -> int:
    return 2 * len(ctx.prompts.with_card[:ctx.config.pipeline.evaluate.latency_requests])


def replies(role: str, card: bool) -> Callable[[Metered, Context, Advance], dict]:
    """A role's replies to the held-out prompts: the teacher's second sample (with the card, its own sampling
    settings and another seed: its spread, the ceiling a student could reach), else greedy without the card."""
    def compute(client: Metered, ctx: Context, advance: Advance) -> dict:
        prompts, params = (ctx.prompts.with_card, ctx.as_teacher(1)) if card else (ctx.prompts.without_card,
                                                                                   ctx.sampling)
        return {"replies": {role: sample_replies(client, prompts, params, advance)}}

    return compute


def conversations(role: str, card: bool) -> Callable[[Metered, Context, Advance], dict]:
    """The held-out conversations replayed turn by turn by a role (the teacher's second sample with the card)."""
    def compute(client: Metered, ctx: Context, advance: Advance) -> dict:
        system, params = (ctx.teacher.recorded(), ctx.as_teacher(1)) if card else (None, ctx.sampling)
        return {"turns": {role: replay(client, ctx.conversations, system, params, advance)}}

    return compute


def persona_replies(role: str, card: bool) -> Callable[[Metered, Context, Advance], dict]:
    """A role's replies to the persona checks' prompts: greedy, without the card, or with it for the teacher."""
    def compute(client: Metered, ctx: Context, advance: Advance) -> dict:
        system = ctx.teacher.firing() if card else None
        return {"persona": {role: persona.sample(client, ctx.checks, system, ctx.sampling, advance)}}

    return compute


def persona_settings(pipeline: PipelineConfig, precision: dict) -> dict:
    # the prompts come from the checks file, how many of them, and the card (its name is in the common key)
    return {**eval_sampling(pipeline, precision), **checks_settings(pipeline)}


def checks_settings(pipeline: PipelineConfig) -> dict:
    return {"checks": persona.checks_digest(), "per_check": pipeline.evaluate.persona_prompts}


def persona_figures(role: str) -> tuple[str, ...]:
    return (*(metric.of(role) for metric in persona.FIGURE.values()), *(CAPABILITY_DROP.key,) * (role != "teacher"))


def persona_count(ctx: Context) -> int:
    return len(ctx.checks.probes)


def own_conversations(role: str, card: bool) -> Callable[[Metered, Context, Advance], dict]:
    """The held-out conversations held by a role itself (turn 1 is its replay's: it comes after that part), and the
    consistency conversations; sampled as its replay is. The teacher's own conversations are the recorded ones
    (`consistency.recorded_turns`): sampling them again would compute what the teacher phase already did."""
    def compute(client: Metered, ctx: Context, advance: Advance) -> dict:
        params = ctx.as_teacher(1) if card else ctx.sampling
        first = ctx.seen.turns.get(role, {}).get(1, [])
        own = (consistency.recorded_turns(ctx.conversations) if card else
               consistency.own_replay(client, ctx.conversations, None, params, first, advance))
        asked = ctx.teacher.firing() if card else None  # a Firing a pass
        return {"own_turns": {role: own},
                "repeated": {role: consistency.ask_twice(client, ctx.checks.consistency, asked, params, advance)}}

    return compute


def own_settings(sampling: Callable[[PipelineConfig, dict], object]) -> Callable[[PipelineConfig, dict], dict]:
    def settings(pipeline: PipelineConfig, precision: dict) -> dict:
        return {"sampling": sampling(pipeline, precision), **checks_settings(pipeline)}

    return settings


def own_figures(role: str) -> tuple[str, ...]:
    return IN_CHARACTER_OWN_LATER.of(role), CONSISTENT.of(role), CONSISTENCY_PAIRS.of(role)


def own_steps(ctx: Context) -> int:
    return consistency.own_steps(ctx.conversations, ctx.checks)


def teacher_own_steps(ctx: Context) -> int:
    return consistency.ask_steps(ctx.checks)


def prompt_count(ctx: Context) -> int:
    return len(ctx.prompts.with_card)


def conversation_replies(ctx: Context) -> int:
    return replies_in(ctx.conversations)


def one(ctx: Context) -> int:
    return 1


def two(ctx: Context) -> int:
    return 2


def judge_steps(ctx: Context) -> int:
    return replies_in([r["messages"] for r in ctx.judge_rows])


def judge_settings(pipeline: PipelineConfig, precision: dict) -> dict:
    return {"judge_prompts": pipeline.evaluate.judge_prompts, **teacher_sampling(pipeline, precision)}


BASE_PARTS = (
    Part("base replies", replies("base", card=False), prompt_count, eval_sampling, reply_figures("base", "base")),
    Part("base and teacher NLL", base_nll, two, nothing, (NLL.of("base"), NLL.of("teacher"))),
    Part("teacher top-k", teacher_topk, one, top_k, (*KL.keys, KL_CLOSED.key), topk=True),
    Part("base KL", model_kl("base"), one, top_k, (KL.of("base"), KL_CLOSED.key)),
    Part("judge replies", judge_replies, judge_steps, judge_settings,
         (JUDGE_ACCURACY.key, *JUDGE_ACCURACY_BY_TURN.keys, LEXICAL_JUDGE_ACCURACY.key, *IN_CHARACTER.keys,
          *IN_CHARACTER_LEXICAL.keys, *IN_CHARACTER_TURN_1.keys, *IN_CHARACTER_LATER.keys)),
    Part("latency", latency_part, latency_steps, latency_settings,
         (*LATENCY.keys, LATENCY_RATIO.key, *PREFILL.keys, PREFILL_RATIO.key)),
    Part("teacher resampled", replies("teacher_resampled", card=True), prompt_count, teacher_sampling,
         reply_figures("teacher_resampled", "teacher", persona=False)),
    Part("base conversations", conversations("base", card=False), conversation_replies, eval_sampling,
         by_turn_figures("base")),
    Part("teacher resampled conversations", conversations("teacher_resampled", card=True), conversation_replies,
         teacher_sampling, by_turn_figures("teacher_resampled")),
    Part("base persona checks", persona_replies("base", card=False), persona_count, persona_settings,
         persona_figures("base")),
    Part("teacher persona checks", persona_replies("teacher", card=True), persona_count, persona_settings,
         persona_figures("teacher")),
    # after the replays: their turn 1 is the first turn of these (the teacher's own are its recorded conversations)
    Part("base own conversations", own_conversations("base", card=False), own_steps, own_settings(eval_sampling),
         own_figures("base")),
    Part("teacher own conversations", own_conversations("teacher_resampled", card=True), teacher_own_steps,
         own_settings(teacher_sampling), own_figures("teacher_resampled")),
)
STUDENT_PARTS = (
    Part("student conversations", conversations("student", card=False), conversation_replies, eval_sampling,
         by_turn_figures("student")),
    Part("student replies", replies("student", card=False), prompt_count, eval_sampling,
         reply_figures("student", "student")),
    Part("student NLL", student_nll, one, nothing, (NLL.of("student"),)),
    Part("student KL", model_kl("student"), one, top_k, (KL.of("student"), KL_CLOSED.key)),
    Part("student persona checks", persona_replies("student", card=False), persona_count, persona_settings,
         persona_figures("student")),
    Part("student own conversations", own_conversations("student", card=False), own_steps,
         own_settings(eval_sampling), own_figures("student")),
)
PARTS = BASE_PARTS + STUDENT_PARTS
# with evaluate.rubric_judge: the teacher model grades every role's replies, the student's too, so after its parts
RUBRIC_PART = Part("rubric judge", rubric.grade_replies, rubric.steps, nothing, rubric.FEEDS)
TURN_ROLES = ("base", "teacher_resampled", "student")  # turns.jsonl's and conversations.jsonl's order
FIGURES_STAGE = "similarity, judges"


def part_keys(cache: PartCache, pipeline: PipelineConfig, precision: dict) -> dict[str, str]:
    """Each base part's cache entry: the common key, its name and the settings it reads."""
    return {part.name: cache.key(part.name, part.settings(pipeline, precision)) for part in BASE_PARTS}


def from_cache(cached: list[str]) -> list[str]:
    """The figures every part feeding them was read from the cache for (none a student's part feeds)."""
    fed: dict[str, set[str]] = {}
    for part in PARTS:
        for key in part.feeds:
            fed.setdefault(key, set()).add(part.name)
    return [key for key in KEYS if key in fed and fed[key] <= set(cached)]


class Stages:
    """evaluate's progress, a bar per stage, numbered among the stages that run: "evaluate 3/7: judge replies"."""

    def __init__(self, names: list[str]):
        self.names, self.started = names, 0

    def start(self, name: str, steps: int) -> Progress:
        self.started += 1
        return Progress(steps, "evaluate", stage=f"{self.started}/{len(self.names)}: {name}")


def read_cached(cache: PartCache, keys: dict[str, str], hits: list[Part], stages: Stages, seen: Measured) -> list[Part]:
    """Reads the parts found in the cache into `seen`; returns those it could not read (computed after all)."""
    unread = []
    with stages.start(f"read from the cache ({len(hits)} parts)", len(hits)) as bar:
        for part in hits:
            found = cache.get(keys[part.name], part.topk)
            if found is None:
                unread.append(part)
                stages.names.append(part.name)
            else:
                seen.merge(found)
        bar.advance(len(hits))  # a few small objects: one line at the end, not one per part
    return unread


def compute(part: Part, client: Metered, ctx: Context, stages: Stages) -> dict:
    with stages.start(part.name, part.steps(ctx)) as bar:
        found = part.compute(client, ctx, bar.advance)
    ctx.seen.merge(found)
    return found


def build(config: PhaseConfig, out: UnitWriter) -> None:
    store, pipeline, ev = config.store, config.pipeline, config.pipeline.evaluate
    rows = store.read_jsonl("split", "eval.jsonl")
    talk_rows = store.read_jsonl("split", "eval_conversations.jsonl")
    talks = [row["messages"] for row in talk_rows]
    questions = [row["prompt"] for row in rows]
    # training prompts only: the eval replies the judge scores are never the ones it learned from
    train_rows = store.read_jsonl("split", "train.jsonl")
    judge_rows = train_rows[:ev.judge_prompts]
    card = CharacterCard.model_validate(store.read_json("ingest", "card.json"))
    system = card.teacher_system_prompt()
    lore = TeacherCard.read(system, card.lorebook, talk_rows)
    checks = persona.for_run(card, train_rows, pipeline.audit.forbidden, ev.persona_prompts)
    backend = open_backend(config)
    precision = backend.precision()
    cache = PartCache(store, common_key(store.require("split"), pipeline, precision, backend.name, system, card.name,
                                        card.lorebook))
    keys = part_keys(cache, pipeline, precision)
    hits = [part for part in BASE_PARTS if cache.has(keys[part.name])]
    missing = [part for part in BASE_PARTS if part not in hits]
    grading = [RUBRIC_PART] * ev.rubric_judge
    stages = Stages(["read from the cache"] * bool(hits) + [p.name for p in missing + list(STUDENT_PARTS) + grading]
                    + [FIGURES_STAGE])
    seen = Measured(replies={"teacher": [first_reply(r) for r in rows]})
    if hits:
        unread = read_cached(cache, keys, hits, stages, seen)
        missing = [part for part in BASE_PARTS if part in missing or part in unread]  # in order: KL needs the top k
    cached = [part.name for part in BASE_PARTS if part not in missing]
    get_logger().info("evaluate cache", read=cached, computing=[part.name for part in missing])

    ctx: Context | None = None
    if missing:
        base = Metered(backend.sampler())
        ctx = Context(config, Prompts.render(base.renderer, rows, system, card.lorebook), talks, judge_rows, seen,
                      checks, questions, lore)
        for part in missing:
            cache.put(keys[part.name], compute(part, base, ctx, stages))
        seen.usage.update(base.usage)
        del base  # one model in memory at a time
    student = Metered(backend.sampler(read_adapter(store).sampling))
    ctx = ctx or Context(config, Prompts.render(student.renderer, rows, system, card.lorebook), talks, judge_rows,
                         seen, checks, questions, lore)
    for part in STUDENT_PARTS:
        compute(part, student, ctx, stages)
    seen.usage.update(student.usage)
    del student
    for part in grading:  # the grader is the teacher model: the base model, opened again
        grader = Metered(backend.sampler())
        compute(part, grader, ctx, stages)
        seen.usage.update(grader.usage)

    # one order whichever parts came from the cache: the files are the same bytes
    seen.turns = {role: seen.turns[role] for role in TURN_ROLES if role in seen.turns}
    own = {f"{role}_own": seen.own_turns[role] for role in TURN_ROLES if role in seen.own_turns}
    with stages.start(FIGURES_STAGE, 4) as bar:
        similarity = similarity_to_teacher(seen.replies)
        bar.advance(1)
        judge = Judge(judge_positives(judge_rows), seen.judge_negatives, turns=judge_turns(judge_rows))
        lexical = Judge(judge_positives(judge_rows), seen.judge_negatives, lexical=True)
        graded = rubric.Graded(rows, seen, judge, lexical) if grading else None
        bar.advance(1)
        recorded = metrics.record({**figures(seen, similarity, ctx.prompts, card, judge, lexical,
                                             pipeline.audit.forbidden, ev.prices),
                                   **persona.figures(checks, seen.persona),
                                   **consistency.figures(seen.own_turns, seen.repeated, checks, judge),
                                   **(graded.figures() if graded else {})})
        bar.advance(1)
        out.write_jsonl("replies.jsonl", reply_rows(rows, seen, similarity))
        out.write_jsonl("turns.jsonl", turn_rows({**seen.turns, **own}, talks, judge, card, pipeline.audit.forbidden))
        out.write_jsonl("conversations.jsonl", replayed(talks, {**seen.turns, **own}))
        out.write_jsonl("persona.jsonl", persona.rows(checks, seen.persona))
        out.write_jsonl("consistency.jsonl", consistency.rows(checks, seen.repeated))
        if graded:
            out.write_jsonl("rubric.jsonl", graded.rows())
        bar.advance(1)
    written = {**precision, "backend": backend.name, "eval_prompts": len(rows),
               "judge_replies": 2 * len(seen.judge_negatives), **recorded,
               "cached": cached, "cached_figures": from_cache(cached),
               "prices_per_mtok": ev.prices.model_dump(), **seen.usage}
    out.write_json("metrics.json", written)
    out.metrics.update({k: v for k, v in written.items() if not isinstance(v, dict)})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "evaluate", lambda out: build(config, out))
