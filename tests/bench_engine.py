"""`make bench`: the local engine against today's baselines, in one process, on this machine, and both against the
physical limit: this CPU's float32 matrix-multiply rate at the model's shapes (`bench_mfu`).

- teacher: the demo's prompts with the card, one call, the demo's teacher settings. Baseline: transformers'
  `generate` in float32 with the card re-prefilled in every batch (the engine before this benchmark existed).
  Figure: sampled tokens per second;
- turns: conversations as the teacher phase has them (`jobs.phases.teacher.generate`: the first reply, then a
  visitor's question and the teacher's answer, turn by turn, the whole history in each prompt). Baseline: the same
  calls, on identical prompts and settings, through `generate`, which prefills each prompt whole every turn (as the
  project's teacher did). Figure: sampled tokens per second, every turn's calls together;
- train: LoRA SFT on the teacher's replies, the same rows, batch size, LoRA settings and assistant-only loss.
  Baseline: TRL's `SFTTrainer` (prompt-completion rows, `completion_only_loss`). Figure: trained tokens (the
  non-pad tokens that carry loss) per second, the first step of each left out as warm-up;
- score: the scoring calls evaluate makes on held-out rows and conversations (the NLL of each teacher reply with
  and without the card; `jobs.distill`'s teacher top k and the base's log-probabilities of them). Baseline: one
  padded forward pass over the whole vocabulary per batch, through the same calls. Figure: scored positions/s.
Each row's MFU is its model FLOPs per second (`bench_mfu`: the work the task needs, the same for both methods)
over the measured limit. The engine uses the dtype `model.dtype` resolves to here (auto unless --dtype); the
training baseline the same, the sampling and scoring baseline float32. Ratios are engine over baseline; only
figures from one run of this script compare. The tables go to the `bench` section of docs/RESULTS.md (--results),
with the CPU and the date; the file's other sections are kept (`results_file`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_baselines import HFClient, Recorder, train_trl
from bench_mfu import Limit, ModelShapes, Work, measure_limit
from results_file import RESULTS, machine, replace_section, stamp

from jobs import distill
from jobs.assets import builtin
from jobs.backends.base import Metered, SamplingParams
from jobs.backends.local import LocalEngine
from jobs.backends.model_files import model_dir
from jobs.backends.precision import describe_cpu, resolve_precision
from jobs.card import parse_card
from jobs.config import PipelineConfig, load_pipeline_config
from jobs.errors import InputError
from jobs.inputs import MB, read_capped
from jobs.phases.base import PhaseConfig
from jobs.phases.teacher import SEED_STRIDE, generate
from jobs.phases.train import batch_rows, learning_rate, to_datum
from jobs.records import exchange, first_reply
from jobs.store import StoreSettings, parse_jsonl


@dataclass
class Measured:
    """One method on one case: how much it did (`count` of `unit`) in how long, and the model FLOPs of that."""

    case: str
    method: str
    count: int
    seconds: float
    unit: str
    work: Work

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def mfu(self, limit: Limit) -> float:
        return self.work.flops / self.seconds / 1e9 / limit.gflops


def fresh(engine: LocalEngine) -> LocalEngine:
    """The engine with no keys and values kept from an earlier case."""
    if engine.kv is not None:
        engine.kv.clear()
    return engine


def timed(recorder: Recorder) -> float:
    return sum(call.seconds for call in recorder.calls)


def teacher_single(client, prompts: list[list[int]], params: SamplingParams, method: str,
                   shapes: ModelShapes) -> tuple[Measured, list[list[int]]]:
    recorder = Recorder(client)
    replies = recorder.sample(prompts, params)
    work = recorder.work(shapes)
    return Measured("teacher", method, work.sampled, timed(recorder), "sampled tokens/s", work), replies


def conversation_turns(engine: LocalEngine, hf: HFClient, config: PipelineConfig, questions: list[str], system: str,
                       name: str, shapes: ModelShapes, precision: str) -> tuple[list[Measured], list[dict], list[str]]:
    """The teacher phase's own `generate`, every prompt opening a conversation, run by the engine; then each of its
    sampling calls replayed through HF `generate` on the same prompts and settings."""
    phase = PhaseConfig(run_id="bench", pipeline=config, store_settings=StoreSettings(), shard=0)
    recorder = Recorder(engine)
    metered = Metered(recorder)
    started = time.perf_counter()
    rows = generate(phase, metered, system, [{"id": i, "prompt": q} for i, q in enumerate(questions)], name)
    engine_s = time.perf_counter() - started
    baseline = Recorder(hf)
    for call in recorder.calls:
        assert call.params is not None, "a sampling call keeps its parameters"
        baseline.sample(call.sequences, call.params)
    own, theirs = recorder.work(shapes), baseline.work(shapes)
    calls = call_lines(recorder, baseline, config)
    usage, sampled = metered.usage, max(metered.usage["sample_tokens"], 1)
    computed = usage.get("computed_prefill_tokens")  # the local engine's own count: what it ran through the model
    notes = [f"- prompt tokens sent (`Metered` prefill_tokens): {usage['prefill_tokens']} for "
             f"{usage['sample_tokens']} sampled tokens, {usage['prefill_tokens'] / sampled:.1f} per sampled token; "
             f"HF generate prefills all of them every call",
             "- computed by the engine (shared prefix and kept keys and values left out): "
             + (f"{computed}, {computed / sampled:.1f} per sampled token" if computed is not None else "not reported"),
             f"- an ideal prefix cache (the model FLOPs' count) computes {own.prefill}, "
             f"{own.prefill / max(own.sampled, 1):.1f} per sampled token"]
    return [Measured("turns", "HF generate, float32, history re-prefilled", theirs.sampled, timed(baseline),
                     "sampled tokens/s", theirs),
            Measured("turns", f"engine, {precision}, teacher.generate, kept KV", own.sampled, engine_s,
                     "sampled tokens/s", own)], rows, notes + calls


def call_lines(engine: Recorder, baseline: Recorder, config: PipelineConfig) -> list[str]:
    """One markdown row per sampling call of the conversations: which turn and role, and both methods' seconds."""
    roles = {}
    for turn in range(1, config.conversations.turns + 1):
        roles[config.teacher.seed + SEED_STRIDE * 2 * (turn - 1)] = f"turn {turn} teacher"
        roles[config.conversations.visitor.seed + SEED_STRIDE * (2 * (turn - 1) - 1)] = f"turn {turn} visitor"
    lines = ["", "| call | rows | prompt tokens | engine computed | sampled | engine s | HF generate s |",
             "|---|---|---|---|---|---|---|"]
    for own, theirs in zip(engine.calls, baseline.calls, strict=True):
        assert own.params is not None and own.replies is not None, "a sampling call keeps its parameters and replies"
        lines.append(f"| {roles.get(own.params.seed, 'call')} | {len(own.sequences)} | "
                     f"{sum(map(len, own.sequences))} | {'-' if own.computed is None else own.computed} | "
                     f"{sum(map(len, own.replies))} | {own.seconds:.1f} | {theirs.seconds:.1f} |")
    return lines


def score(client, rows: list[dict], system: str, k: int, method: str, shapes: ModelShapes) -> Measured:
    """The scoring calls evaluate makes on held-out rows: each teacher reply's log-probabilities after its prompt
    without and with the card (NLL), the teacher's top k at every assistant position of each conversation, and the
    model's log-probabilities of those tokens without the card (KL)."""
    recorder = Recorder(client)
    metered = Metered(recorder)
    render = client.renderer
    replies = [render.reply(first_reply(row)) for row in rows]
    for card in (None, system):
        metered.compute_logprobs([render.prompt(row["prompt"], system=card) + reply
                                  for row, reply in zip(rows, replies, strict=True)])
    pairs = [distill.pair(render, row["messages"], system) for row in rows]
    distill.model_logprobs(metered, pairs, distill.teacher_topk(metered, pairs, k))
    work = recorder.work(shapes)
    return Measured("score", method, work.scored, timed(recorder), "scored positions/s", work)


def engine_train(config: PipelineConfig, rows: list[dict], steps: int, shapes: ModelShapes) -> tuple[int, float, Work]:
    train = config.train
    trainer = LocalEngine.for_training(config.model, train)
    data = [to_datum(trainer.renderer, row, train.max_seq_len) for row in rows]
    tokens, seconds, work = 0, 0.0, Work(shapes)
    for step in range(steps):
        started = time.perf_counter()
        batch = [data[i] for i in batch_rows(len(data), train.batch_size, step * train.batch_size, train.seed)]
        result = trainer.forward_backward(batch)
        trainer.optim_step(learning_rate(train, step))
        if step:  # the first step is warm-up
            tokens += int(result["tokens"])
            seconds += time.perf_counter() - started
            work.training([d.tokens for d in batch], sum(1 for d in batch for w in d.weights[1:] if w > 0))
    return tokens, seconds, work


def table(limit: Limit, measured: list[Measured]) -> list[str]:
    lines = ["| case | method | count | seconds | rate | unit | model GFLOP | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        lines.append(f"| {m.case} | {m.method} | {m.count} | {m.seconds:.1f} | {m.rate:.1f} | {m.unit} | "
                     f"{m.work.flops / 1e9:.0f} | {m.work.flops / m.seconds / 1e9:.1f} | {m.mfu(limit):.1%} |")
    return lines


def limit_lines(limit: Limit) -> list[str]:
    lines = [f"limit: {limit.gflops:.1f} GFLOPS float32 at {limit.rows} rows (one forward's linear layers and output "
             f"head, FLOP-weighted), {limit.decode_gflops:.1f} at a decode step's 64 rows; {limit.threads} threads", "",
             "| weights (in x out) | GFLOPS |", "|---|---|"]
    return lines + [f"| {name} | {rate:.1f} |" for name, rate in limit.per_shape.items()]


def write_results(path: Path, cpu: str, setup: str, limit: Limit, measured: list[Measured], notes: list[str],
                  last: str) -> None:
    text = "\n".join(["## `make bench`: the local engine against its baselines", "", stamp(machine()), "",
                      "Written by `tests/bench_engine.py` (`make bench`). How the model FLOPs are counted: "
                      "`tests/bench_mfu.py`.", "", f"- {cpu}", f"- {setup}", "", *limit_lines(limit), "",
                      *table(limit, measured), "",
                      "Conversations (`teacher.generate`; HF generate replays its sampling calls, identical prompts):",
                      "", *notes, "",
                      f"`{last}`"])
    replace_section(path, "bench", text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="demo prompts for the teacher (demo: 240)")
    parser.add_argument("--conversations", type=int, default=24, help="prompts that open a conversation")
    parser.add_argument("--turns", type=int, help="assistant turns of a conversation (default: the demo's)")
    parser.add_argument("--max-tokens", type=int, help="tokens sampled per teacher reply and visitor question "
                                                        "(default: the demo's)")
    parser.add_argument("--score-rows", type=int, default=40,
                        help="single-turn rows scored (default 40), besides the conversations")
    parser.add_argument("--steps", type=int, default=8, help="training steps for each side (first one is warm-up)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    parser.add_argument("--limit-seconds", type=float, default=0.5, help="seconds per shape measuring the limit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file: its bench section is replaced")
    parser.add_argument("--card", type=Path, help="a card file (YAML, V2/V3 JSON, PNG; default: the demo's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="demo overrides")
    args = parser.parse_args(argv)
    for name in ("prompts", "conversations", "limit_seconds"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.score_rows < 0:
        raise InputError("--score-rows must be 0 or more")
    if args.steps < 2:
        raise InputError("--steps must be at least 2: the first step of each side is warm-up")
    return args


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    overrides = [f"model.dtype={args.dtype}", "conversations.share=1.0", *args.set]
    if args.turns is not None:
        overrides.append(f"conversations.turns={args.turns}")
    if args.max_tokens is not None:
        overrides += [f"teacher.max_new_tokens={args.max_tokens}",
                      f"conversations.visitor.max_new_tokens={args.max_tokens}"]
    return load_pipeline_config("demo", overrides=overrides)


def run(args: argparse.Namespace) -> str:
    warnings.filterwarnings("ignore")
    config = pipeline_config(args)
    precision = resolve_precision(config.model)
    card = (parse_card(read_capped(str(args.card), config.ingest.max_input_mb * MB), str(args.card)) if args.card
            else parse_card(builtin("builtin:beethoven", "cards", ".yaml"), "builtin:beethoven"))
    questions = [row["prompt"] for row in parse_jsonl(builtin("builtin:beethoven", "prompts", ".jsonl"), "prompts")]
    if max(args.prompts, args.conversations) > len(questions):
        raise InputError(f"--prompts and --conversations: at most the {len(questions)} demo prompts")
    questions = questions[:args.prompts]
    system = card.teacher_system_prompt()
    # as the teacher phase's sampler has it (jobs.backends.local_backend): rows' keys and values kept between calls;
    # each case starts with none kept (`fresh`), so no case reuses another's. Loading sets torch's threads.
    engine = LocalEngine.for_sampling(config.model, kv_cache=True)
    cpu = describe_cpu()
    print(cpu)
    from transformers import AutoConfig

    shapes = ModelShapes.from_config(AutoConfig.from_pretrained(model_dir(config.model.base)))
    limit = measure_limit(shapes, args.limit_seconds)
    print("\n".join(limit_lines(limit)), flush=True)
    setup = (f"engine: {precision.device} {precision.dtype}; {args.prompts} prompts, {args.conversations} "
             f"conversations of {config.conversations.turns} turns, {args.score_rows} + {args.conversations} rows "
             f"scored, {args.steps} training steps; {shapes}")
    print(setup, flush=True)

    prompts = [engine.renderer.prompt(q, system=system) for q in questions]
    params = SamplingParams.from_config(config.teacher)
    hf = HFClient(config, engine.renderer, engine.pad_id)
    measured = []
    base, _ = teacher_single(hf, prompts, params, "HF generate, float32, card re-prefilled", shapes)
    own, replies = teacher_single(fresh(engine), prompts, params, f"engine, {precision.dtype}, shared prefix", shapes)
    measured += [base, own]
    turns, talks, notes = conversation_turns(fresh(engine), hf, config, questions[:args.conversations], system,
                                             card.name, shapes, precision.dtype)
    measured += turns
    rows = [{"prompt": q, "messages": exchange(q, engine.renderer.decode(r))}
            for q, r in zip(questions, replies, strict=True)]
    held_out = rows[:args.score_rows] + talks  # the teacher's conversation records (`jobs.records`)
    k = config.evaluate.kl_top_k
    measured.append(score(hf, held_out, system, k, "HF forward, float32, padded, whole vocabulary", shapes))
    measured.append(score(fresh(engine), held_out, system, k, f"engine, {precision.dtype}, packed, shared prefix",
                          shapes))
    del engine, hf

    trl_tokens, trl_s, trl_work = train_trl(config, rows, args.steps, precision.torch_dtype, shapes)
    own_tokens, own_s, own_work = engine_train(config, rows, args.steps, shapes)
    measured += [Measured("train", f"TRL SFTTrainer, {precision.dtype}", trl_tokens, trl_s, "trained tokens/s",
                          trl_work),
                 Measured("train", f"engine, {precision.dtype}, packed", own_tokens, own_s, "trained tokens/s",
                          own_work)]
    print("\n" + "\n".join(table(limit, measured)) + "\n\n" + "\n".join(notes))

    def ratio(case: str) -> float:
        baseline, engine_row = (m for m in measured if m.case == case)
        return engine_row.rate / baseline.rate

    last = f"bench: teacher {ratio('teacher'):.2f}x, turns {ratio('turns'):.2f}x, train {ratio('train'):.2f}x"
    write_results(args.results, cpu, setup, limit, measured, notes, last)
    print(f"\nwrote {args.results}")
    return last


def main(argv: list[str] | None = None) -> int:
    try:
        last = run(parse_args(argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
