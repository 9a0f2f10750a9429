"""Interactive tools outside the DAG: chat with the student, review replies side by side.

Both read a finished run from the store (`make run` first) and write back to it with a manifest like any phase
output: chat its transcript under `runs/<run-id>/chat/<time>/`, review its ratings under `runs/<run-id>/review/<time>/`.
"""

from __future__ import annotations

import sys
import textwrap
import time

from jobs.backends.base import SamplingParams
from jobs.errors import InputError
from jobs.metrics import SIMILARITY
from jobs.phases.base import PhaseConfig, open_backend
from jobs.trained import read_adapter


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _require_run(config: PhaseConfig, unit: str) -> None:
    if config.store.manifest(unit) is None:
        raise InputError(f"run {config.run_id} has no finished {unit} phase: run `make run` first "
                         f"(same profile and config)")


def fit_history(renderer, history: list[dict], room: int) -> tuple[list[int], int]:
    """The conversation's tokens up to the student's next turn, dropping the oldest exchanges (a question and
    its reply) until it fits in `room` tokens; how many messages were dropped. The last question always stays."""
    dropped = 0
    while True:
        tokens = renderer.chat(history[dropped:])
        if len(tokens) <= room or len(history) - dropped <= 1:
            return tokens, dropped
        dropped += 2


def chat(config: PhaseConfig) -> None:
    """A conversation with the student: every question goes with the whole conversation before it (no card), as
    far as the model's context holds it; the transcript is saved to the store at the end."""
    _require_run(config, "train")
    card = config.store.read_json("ingest", "card.json")
    name = card["name"]
    student = open_backend(config).sampler(read_adapter(config.store).sampling)
    render = student.renderer
    params = SamplingParams.from_config(config.pipeline.teacher, batch_size=1)
    room = (render.context_tokens or config.pipeline.model.context_tokens) - params.max_tokens
    print(f"Chatting with the distilled {name} of run {config.run_id} (no card in the prompt; it remembers the "
          "conversation). Empty line or Ctrl-D ends.")
    if card.get("greeting"):  # the card's own opening line (first_mes), as character chat front-ends show it
        print(f"{name}> {card['greeting']}  (the card's greeting)\n")
    history: list[dict] = []
    turns = []
    while (line := _ask("you> ")) and line.strip():
        history.append({"role": "user", "content": line.strip()})
        tokens, dropped = fit_history(render, history, room)
        if dropped:
            print(f"  (the conversation outgrew the model's context: its {dropped} oldest messages are forgotten)")
            history = history[dropped:]
        reply = render.decode(student.sample([tokens], params)[0])
        print(f"{name}> {reply}\n")
        turns.append({"sent": list(history), "prompt_tokens": len(tokens), "reply": reply})
        history.append({"role": "assistant", "content": reply})
    if turns:
        unit = f"chat/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        with config.store.writing(unit, fingerprint=unit) as out:
            out.write_jsonl("transcript.jsonl", turns)
            out.metrics["turns"] = len(turns)
        print(f"transcript: s3://{config.store_settings.bucket}/{config.store.key(unit, 'transcript.jsonl')}")


def review(config: PhaseConfig) -> None:
    _require_run(config, "evaluate")
    rows = config.store.read_jsonl("evaluate", "replies.jsonl")
    ratings = []
    print(f"Rate how well the student stays in character, 1 (not at all) to 5 (as the teacher); "
          f"Enter skips, q stops. {len(rows)} held-out prompts.")
    for number, row in enumerate(rows, 1):
        print(f"\n[{number}/{len(rows)}] {row['prompt']}")
        for label in ("teacher", "student", "base"):
            print(textwrap.fill(row[label] or "(empty)", width=100, initial_indent=f"  {label:>8}: ",
                                subsequent_indent=" " * 12))
        answer = _ask("rating> ")
        if answer is None or answer.strip().lower() == "q":
            break
        if not answer.strip():
            continue
        if answer.strip() not in {"1", "2", "3", "4", "5"}:
            print("  (not a rating 1-5: skipped)")
            continue
        ratings.append({"id": row["id"], "prompt": row["prompt"], "rating": int(answer),
                        SIMILARITY.of("student"): row[SIMILARITY.of("student")]})
    if not ratings:
        print("no ratings given; nothing saved")
        return
    unit = f"review/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    with config.store.writing(unit, fingerprint=unit) as out:
        out.write_jsonl("ratings.jsonl", ratings)
        out.metrics.update({"ratings": len(ratings),
                            "mean_rating": round(sum(r["rating"] for r in ratings) / len(ratings), 3)})
    print(f"saved {len(ratings)} ratings (mean {out.metrics['mean_rating']}) to "
          f"s3://{config.store_settings.bucket}/{config.store.key(unit, 'ratings.jsonl')}", file=sys.stdout)
