"""Interactive tools outside the DAG: chat with the student (seed step 17), review replies side by side (18).

Both read a finished run from the store (`make run` first); review writes its ratings back to the store
under `runs/<run-id>/review/<time>/` with a manifest like any phase output.
"""

from __future__ import annotations

import sys
import textwrap
import time

from jobs.backends.base import SamplingParams
from jobs.errors import InputError
from jobs.metrics import SIMILARITY
from jobs.phases.base import PhaseConfig, open_backend


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def _require_run(config: PhaseConfig, unit: str) -> None:
    if config.store.manifest(unit) is None:
        raise InputError(f"run {config.run_id} has no finished {unit} phase: run `make run` first "
                         f"(same profile and config)")


def chat(config: PhaseConfig) -> None:
    from jobs.phases.train import read_adapter

    _require_run(config, "train")
    name = config.store.read_json("ingest", "card.json")["name"]
    student = open_backend(config).sampler(read_adapter(config).sampling)
    params = SamplingParams.from_config(config.pipeline.teacher, batch_size=1)
    print(f"Chatting with the distilled {name} of run {config.run_id} (no card in the prompt). "
          "Empty line or Ctrl-D ends.")
    while (line := _ask("you> ")) and line.strip():
        reply = student.sample([student.renderer.prompt(line.strip())], params)[0]
        print(f"{name}> {student.renderer.decode(reply)}\n")


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
