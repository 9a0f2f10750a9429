"""Evaluate (seed steps 14-16): how close the student comes to the teacher, and what dropping the card saves.

On held-out prompts: student (no card), base (no card) and the teacher's own replies. Figures: embedding
similarity to the teacher, next to a second teacher sample scored against the first (the teacher's own
spread: a greedy student can land above it); similarity to the character (its name and topics, short enough
for the embedding model) and the share of replies out of character (the audit's phrases, e.g. "as an AI"),
which show the persona; mean per-token NLL of the teacher's replies
under student, base and the teacher itself (base with card), and the share of the base-to-teacher gap the student closed; prompt
tokens per request with and without the card, the cost ratio at the configured prices; latency per
request with and without the card on the same model.
"""

from __future__ import annotations

import statistics
import time

from jobs.backends.base import Metered, SamplingParams
from jobs.card import CharacterCard
from jobs.log import Progress
from jobs.phases.base import PhaseConfig, open_backend, run_unit
from jobs.store import UnitWriter


def reply_nll(client, prompts: list[list[int]], replies: list[list[int]]) -> list[float]:
    """Mean NLL per reply token of each reply after its prompt."""
    logprobs = client.compute_logprobs([p + r for p, r in zip(prompts, replies, strict=True)])
    return [-sum(lp[-len(r):]) / len(r) for lp, r in zip(logprobs, replies, strict=True)]


def token_weighted(values: list[float], replies: list[list[int]]) -> float:
    return sum(v * len(r) for v, r in zip(values, replies, strict=True)) / sum(len(r) for r in replies)


def time_requests(client, prompts: list[list[int]], params) -> dict:
    """Seconds per single request (generation) and per prompt forward pass (prefill), after a warm-up."""
    client.sample(prompts[:1], params)
    generate, prefill, new_tokens = [], [], []
    for prompt in prompts:
        started = time.perf_counter()
        out = client.sample([prompt], params)
        generate.append(time.perf_counter() - started)
        new_tokens.append(len(out[0]))
        started = time.perf_counter()
        client.compute_logprobs([prompt])
        prefill.append(time.perf_counter() - started)
    return {"request_s": statistics.mean(generate), "prefill_s": statistics.mean(prefill),
            "new_tokens": statistics.mean(new_tokens)}


def build(config: PhaseConfig, out: UnitWriter) -> None:
    from jobs.backends.embeddings import cosine_to_reference
    from jobs.phases.train import read_adapter

    store, ev = config.store, config.pipeline.evaluate
    rows = store.read_jsonl("split", "eval.jsonl")
    card = CharacterCard.model_validate(store.read_json("ingest", "card.json"))
    system = card.teacher_system_prompt()
    backend = open_backend(config)
    params = SamplingParams.from_config(ev.sampling)
    single = SamplingParams.from_config(ev.sampling, batch_size=1)
    bar = Progress(7, "evaluate")

    base = Metered(backend.sampler())
    render = base.renderer
    no_card = [render.prompt(r["prompt"]) for r in rows]
    with_card = [render.prompt(r["prompt"], system=system) for r in rows]
    targets = [render.reply(r["reply"]) for r in rows]
    base_replies = [render.decode(t) for t in base.sample(no_card, params)]
    bar.advance(1, step="base replies")
    nll_base = reply_nll(base, no_card, targets)
    nll_teacher = reply_nll(base, with_card, targets)
    bar.advance(1, step="base and teacher NLL")
    n = min(ev.latency_requests, len(rows))
    latency_with, latency_without = time_requests(base, with_card[:n], single), time_requests(base, no_card[:n], single)
    bar.advance(1, step="latency")
    resample = SamplingParams.from_config(config.pipeline.teacher.model_copy(update={"seed": ev.sampling.seed + 1}))
    teacher_again = [render.decode(t) for t in base.sample(with_card, resample)]
    bar.advance(1, step="teacher resampled")
    usage = dict(base.usage)
    del base  # one model in memory at a time

    student = Metered(backend.sampler(read_adapter(config).sampling))
    student_replies = [render.decode(t) for t in student.sample(no_card, params)]
    bar.advance(1, step="student replies")
    nll_student = reply_nll(student, no_card, targets)
    bar.advance(1, step="student NLL")
    usage = {key: usage[key] + student.usage[key] for key in usage}
    del student

    teacher_texts = [r["reply"] for r in rows]
    sim_student = cosine_to_reference(student_replies, teacher_texts)
    sim_base = cosine_to_reference(base_replies, teacher_texts)
    sim_ceiling = cosine_to_reference(teacher_again, teacher_texts)
    card_text = [f"{card.name}: {', '.join(card.topics)}" if card.topics else card.name] * len(rows)
    persona = {name: statistics.mean(cosine_to_reference(texts, card_text)) for name, texts in
               (("student", student_replies), ("base", base_replies), ("teacher", teacher_texts))}
    forbidden = config.pipeline.audit.forbidden
    out_of_character = {name: statistics.mean(any(p in t.lower() for p in forbidden) for t in texts) for name, texts in
                        (("student", student_replies), ("base", base_replies), ("teacher", teacher_again))}
    bar.advance(1, step="similarity")

    nll = {name: token_weighted(values, targets)
           for name, values in (("student", nll_student), ("base", nll_base), ("teacher", nll_teacher))}
    gap = nll["base"] - nll["teacher"]
    tokens_with, tokens_without = statistics.mean(map(len, with_card)), statistics.mean(map(len, no_card))
    reply_tokens = statistics.mean(map(len, targets))
    prices = ev.prices

    def cost(prompt_tokens: float) -> float:  # dollars per request; the same reply length for both
        return (prompt_tokens * prices.input_per_mtok + reply_tokens * prices.output_per_mtok) / 1e6

    metrics = {
        **backend.precision(), "backend": backend.name, "eval_prompts": len(rows),
        "similarity_student": round(statistics.mean(sim_student), 4),
        "similarity_base": round(statistics.mean(sim_base), 4),
        "similarity_teacher_resampled": round(statistics.mean(sim_ceiling), 4),
        **{f"persona_similarity_{k}": round(v, 4) for k, v in persona.items()},
        **{f"out_of_character_{k}": round(v, 4) for k, v in out_of_character.items()},
        "nll_student": round(nll["student"], 4), "nll_base": round(nll["base"], 4),
        "nll_teacher": round(nll["teacher"], 4),
        "nll_gap_closed": round((nll["base"] - nll["student"]) / gap, 4) if gap > 0 else None,
        "prompt_tokens_with_card": round(tokens_with, 1), "prompt_tokens_without_card": round(tokens_without, 1),
        "token_reduction": round(1 - tokens_without / tokens_with, 4),
        "reply_tokens": round(reply_tokens, 1),
        "cost_per_request_with_card": cost(tokens_with), "cost_per_request_without_card": cost(tokens_without),
        "cost_ratio": round(cost(tokens_with) / cost(tokens_without), 3),
        "prompt_cost_ratio": round(tokens_with / tokens_without, 3),
        "latency_with_card_s": round(latency_with["request_s"], 4),
        "latency_without_card_s": round(latency_without["request_s"], 4),
        "latency_ratio": round(latency_with["request_s"] / latency_without["request_s"], 3),
        "prefill_with_card_s": round(latency_with["prefill_s"], 4),
        "prefill_without_card_s": round(latency_without["prefill_s"], 4),
        "prefill_ratio": round(latency_with["prefill_s"] / latency_without["prefill_s"], 3),
        "prices_per_mtok": prices.model_dump(),
        **usage,
    }
    out.write_jsonl("replies.jsonl", [
        {"id": r["id"], "prompt": r["prompt"], "teacher": r["reply"], "student": s, "base": b, "teacher_resampled": t,
         "similarity_student": ss, "similarity_base": sb, "similarity_teacher_resampled": st,
         "nll_student": ns, "nll_base": nb, "nll_teacher": nt}
        for r, s, b, t, ss, sb, st, ns, nb, nt in zip(rows, student_replies, base_replies, teacher_again, sim_student,
                                                      sim_base, sim_ceiling, nll_student, nll_base, nll_teacher,
                                                      strict=True)])
    out.write_json("metrics.json", metrics)
    out.metrics.update({k: v for k, v in metrics.items() if not isinstance(v, dict)})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "evaluate", lambda out: build(config, out))
