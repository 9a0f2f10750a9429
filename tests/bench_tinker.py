"""Benchmark (not a test): how close the Tinker backend comes to the latency-bound ideal.

The local Tinker stand-in is started with `--latency L`: every request's result is ready no sooner than L
seconds after it arrived. The backend is then timed through its own classes, as the phases use them:
- teacher sampling: N short prompts with at most C requests in flight (`tinker.max_in_flight`). Were latency
  the only cost, N / C rounds of L seconds each: ideal samples/s = N / (ceil(N / C) * L);
- training: S steps of forward_backward + optim_step submitted back to back, each step waiting for its loss
  before the next (as `jobs.phases.train` does). Ideal: one step per L seconds.
Prints both against their ideal; the goal is at least 90%. The requests are kept small (a few tokens
sampled, short rows trained) so that the engine's own compute stays well below L, as it is on the hosted
service where L is queueing and network time.

    .venv/bin/python tests/bench_tinker.py [--latency 5] [--in-flight 32] [--prompts 96] [--steps 6]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from jobs.assets import builtin
from jobs.backends.base import Datum, SamplingParams
from jobs.backends.precision import describe_cpu
from jobs.config import ModelConfig, TinkerConfig, TrainConfig
from jobs.store import parse_jsonl
from workflows.local.tinker import TinkerServer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=5.0, help="seconds added to every request (default 5)")
    p.add_argument("--in-flight", type=int, default=32, help="sampling requests in flight (default 32)")
    p.add_argument("--prompts", type=int, default=96, help="prompts sampled (default 96)")
    p.add_argument("--max-tokens", type=int, default=4, help="tokens sampled per prompt (default 4)")
    p.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    p.add_argument("--base", default=ModelConfig().base, help="base model (default: the pipeline's)")
    args = p.parse_args()

    from jobs.backends.tinker_backend import TinkerBackend

    questions = [row["prompt"] for row in parse_jsonl(builtin("builtin:beethoven", "prompts", ".jsonl"), "prompts")]
    with tempfile.TemporaryDirectory() as folder, TinkerServer(Path(folder), latency=args.latency) as server:
        os.environ.update(server.env())
        backend = TinkerBackend(ModelConfig(base=args.base), TinkerConfig(max_in_flight=args.in_flight))
        sampler = backend.sampler()
        render = sampler.renderer
        prompts = [render.prompt(questions[i % len(questions)]) for i in range(args.prompts)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.9)
        sampler.sample(prompts[:2], params)  # warm-up: the server loads its sampling engine
        started = time.perf_counter()
        sampler.sample(prompts, params)
        sample_s = time.perf_counter() - started
        sample_ideal = args.prompts / (math.ceil(args.prompts / args.in_flight) * args.latency)

        trainer = backend.trainer(TrainConfig(lora_rank=8))
        reply = render.reply("Ja, ja, so ist es.")
        rows = [Datum(p + reply, [0.0] * len(p) + [1.0] * len(reply)) for p in prompts[:4]]
        trainer.forward_backward(rows).result()  # warm-up: the first step builds the optimizer
        trainer.optim_step(1e-4).result()
        started = time.perf_counter()
        for _ in range(args.steps):
            pending, stepped = trainer.forward_backward(rows), trainer.optim_step(1e-4)
            pending.result()
            stepped.result()
        train_s = time.perf_counter() - started
        stats = server.stats()

    samples_per_s, steps_per_s = args.prompts / sample_s, args.steps / train_s
    print(f"{describe_cpu()}; injected latency {args.latency:g}s per request")
    print(f"teacher sampling: {samples_per_s:.2f} samples/s, ideal {sample_ideal:.2f} "
          f"({args.prompts} prompts, {args.in_flight} in flight): {samples_per_s / sample_ideal:.0%} of ideal")
    print(f"training: {steps_per_s:.3f} steps/s, ideal {1 / args.latency:.3f} ({args.steps} steps of "
          f"forward_backward + optim_step): {steps_per_s * args.latency:.0%} of ideal")
    print(f"server: {stats}")


if __name__ == "__main__":
    main()
