"""Sampling requests (`asample`): their parsing, and the worker's batches of them.

Each sampled sequence carries its per-token log-probabilities: log p(token | prompt, tokens before it) under the
model's own distribution (temperature 1, no top-p: the distribution `compute_logprobs` scores), from a
`LocalEngine.compute_logprobs` pass over prompt + sequence alone, so they equal `compute_logprobs` of the same
tokens bit for bit and do not depend on what was batched beside them. The first sample's pass also gives the
prompt's log-probabilities (`prompt_logprobs`), so a `compute_logprobs` request costs one pass besides its prefill.
That pass is the price of the log-probabilities: the engine's decoding does not return them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.backends.base import SamplingParams
from workflows.local.tinker.common import Cancelled, UserError, log
from workflows.local.tinker.records import Future, SampleJob
from workflows.local.tinker.wire import parse_targets, sample_response, targets_tensor

if TYPE_CHECKING:
    from workflows.local.tinker.state import Backend


def chunk_tokens(chunk: dict) -> list[int]:
    if chunk.get("type", "encoded_text") != "encoded_text":
        raise UserError("only token (encoded_text) prompts are supported here")
    return [int(t) for t in chunk["tokens"]]


def parse_stop(stop) -> tuple[frozenset[int], tuple[str, ...]]:
    """SamplingParams.stop (None, a string, or a list of strings or of token ids) as (token ids, strings)."""
    if stop is None:
        return frozenset(), ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all((isinstance(s, int) and not isinstance(s, bool) and s >= 0)
                                              or (isinstance(s, str) and s) for s in stops):
        raise UserError(f"stop={stop!r}: a string, or a list of non-empty strings or of token ids")
    return frozenset(s for s in stops if isinstance(s, int)), tuple(s for s in stops if isinstance(s, str))


def cut_at_stop(tokens: list[int], ids: frozenset[int], strings: tuple[str, ...], decode) -> list[int] | None:
    """`tokens` up to and including the first that is a stop id or completes a stop string (its decoded text then
    contains it), or None if none does. The engine stops only at the end-of-turn token, so other stops are found
    in what it sampled: sampling is causal and each row has its own generator, so the tokens before the stop are
    the ones an engine that stopped there would have returned."""
    window = 4 * max(map(len, strings), default=0) + 8  # tokens enough to spell any stop string, bytes split
    for i, token in enumerate(tokens):
        if token in ids or (strings and any(s in decode(tokens[max(0, i + 1 - window):i + 1]) for s in strings)):
            return tokens[:i + 1]
    return None


def parse_sample(backend: Backend, body: dict, entry: dict, future: Future, arrived: float) -> SampleJob:
    """The SampleJob of an asample body (a UserError for what is not supported or malformed)."""
    num = int(body.get("num_samples") or 1)
    params = body.get("sampling_params") or {}
    prompt = [t for chunk in body["prompt"]["chunks"] for t in chunk_tokens(chunk)]
    if body.get("topk_sample_logprobs") or body.get("prompt_alt_tokens_k"):
        raise UserError("top-k logprobs of sampled tokens (topk_sample_logprobs) and alternative prompt tokens "
                        "(prompt_alt_tokens_k) are not supported here")
    if int(params.get("top_k", -1)) not in (-1, 0):
        raise UserError("top_k is not supported here")
    stop_ids, stop_strings = parse_stop(params.get("stop"))
    if not prompt or num < 1:
        raise UserError("an empty prompt or num_samples < 1")
    topk = int(body.get("topk_prompt_logprobs") or 0)
    if topk < 0:
        raise UserError(f"topk_prompt_logprobs must be 0 or greater, not {topk}")
    last_n = body.get("prompt_logprobs_last_n")
    if last_n is not None:
        last_n = int(last_n)
        if not body.get("prompt_logprobs"):
            raise UserError("prompt_logprobs_last_n needs prompt_logprobs")
        if not 1 <= last_n <= len(prompt) - 1:
            raise UserError(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {len(prompt) - 1}, "
                            f"not {last_n}")
    targets = None
    if body.get("target_prompt_logprobs") is not None:
        targets = parse_targets(body["target_prompt_logprobs"], len(prompt))
    seed = params.get("seed")
    if seed is None:
        seed = backend.seed_rng.randrange(2**31)
    seeds = [(int(seed) + j * 2**32) % 2**63 for j in range(num)]
    return SampleJob(future, (entry["base_model"], entry.get("adapter")), prompt, int(params.get("max_tokens") or 16),
                     float(params.get("temperature", 1.0)), float(params.get("top_p", 1.0)), seeds,
                     bool(body.get("prompt_logprobs")), arrived, topk=topk, last_n=last_n, targets=targets,
                     stop_ids=stop_ids, stop_strings=stop_strings)


def sample_batch(backend: Backend, batch: list[SampleJob]) -> None:
    if not batch:
        return
    with backend.lock:
        rows = sum(len(j.seeds) for j in batch)
        backend.stats["sample_batches"] += 1
        backend.stats["sample_rows"] += rows
        backend.stats["largest_sample_batch"] = max(backend.stats["largest_sample_batch"], rows)
        backend.write_stats()
    groups: dict[tuple, list[SampleJob]] = {}
    for job in batch:
        groups.setdefault((job.key, job.max_tokens, job.temperature, job.top_p), []).append(job)
    for (key, max_tokens, temperature, top_p), jobs in groups.items():
        backend.current = [job.future for job in jobs]
        try:
            answers = _sample_group(backend, key, jobs, SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, repetition_penalty=1.0, seed=0,
                batch_size=backend.engine_batch))
        except Cancelled:
            if backend.stopping:
                for job in jobs:
                    job.future.fail("the server is stopping", "server")
            else:
                backend.cancel([job.future for job in jobs], "while sampling")
            continue
        except Exception as error:
            if not isinstance(error, UserError):
                log().exception("sampling failed", error=str(error))
            for job in jobs:
                job.future.fail(str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}",
                                "user" if isinstance(error, UserError) else "server")
            continue
        finally:
            backend.current = []
        for job, answer in zip(jobs, answers, strict=True):
            if isinstance(answer, Exception):
                backend.run(job.future, _raise, answer)
            else:
                job.future.resolve(answer)


def _sample_group(backend: Backend, key: tuple, jobs: list[SampleJob], params: SamplingParams) -> list:
    """One engine call for the group's rows, then per job its SampleResponse bytes (or the UserError it gets)."""
    engine = backend.engines.sampler(key)
    prompts = [job.prompt for job in jobs for _ in job.seeds]
    replies = engine.sample(prompts, params, seeds=[seed for job in jobs for seed in job.seeds])
    end = engine.renderer.end_of_turn
    scores = _score(engine, [job for job in jobs if job.scores])
    answers: list = []
    for job in jobs:
        mine, replies = replies[:len(job.seeds)], replies[len(job.seeds):]
        sequences, prompt_logprobs = [], None
        for j, reply in enumerate(mine):
            tokens, reason = (reply + [end], "stop") if len(reply) < params.max_tokens else (reply, "length")
            if job.stop_ids or job.stop_strings:
                cut = cut_at_stop(reply, job.stop_ids, job.stop_strings, engine.tokenizer.decode)
                tokens, reason = (cut, "stop") if cut is not None else (tokens, reason)
            # one sequence per pass: packed with others, its log-probabilities would change in the last bits with
            # whatever arrived beside it, and an answer must depend only on its request (not on timing or a retry).
            # The first sample's pass scores the prompt too (a causal model: its positions never see the sample)
            scored = engine.compute_logprobs([job.prompt + tokens])[0]
            if j == 0 and job.prompt_logprobs and not job.scores:
                prompt_logprobs = scored[:len(job.prompt) - 1]
            sequences.append((tokens, scored[len(job.prompt) - 1:], reason))
        found = scores.get(id(job), {})
        if isinstance(found, Exception):
            answers.append(found)
        else:
            answers.append(sample_response(sequences, found.pop("prompt_logprobs", prompt_logprobs),
                                           found.get("topk"), found.get("targets")))
    return answers


def _score(engine, jobs: list[SampleJob]) -> dict[int, dict | Exception]:
    """Per job (by id) the sample_response arguments for its prompt_logprobs, top-k and target log-probabilities,
    from a `LocalEngine.position_logprobs` pass over the job's prompt alone (from the first position it needs;
    alone for the reason `_sample_group` gives); a job that names a token outside the vocabulary gets its
    UserError instead."""
    import torch

    found: dict[int, dict | Exception] = {}
    vocab = int(engine.model.config.vocab_size)
    valid = []
    for job in jobs:
        if job.targets and any(token >= vocab for row in job.targets.cells for _, token in row):
            found[id(job)] = UserError(f"target_prompt_logprobs names a token id outside the vocabulary "
                                       f"(0..{vocab - 1})")
        else:
            valid.append(job)
    # prompt log-probabilities and the top-k cover the last `last_n` positions (all but the first by default);
    # targets, row i for position i + 1, from the first row that names one
    scored_from = [len(job.prompt) - job.last_n if job.last_n else 1 for job in valid]
    starts = [min(first if job.prompt_logprobs or job.topk else len(job.prompt),
                  job.targets.first_row + 1 if job.targets else len(job.prompt))
              for job, first in zip(valid, scored_from, strict=True)]
    for job, first, start in zip(valid, scored_from, starts, strict=True):
        [(_, rows)] = engine.position_logprobs([job.prompt], [start])
        mine = rows[first - start:] if job.prompt_logprobs or job.topk else rows[:0]  # start <= first then
        scored: dict = {}
        if job.prompt_logprobs:
            actual = torch.tensor(job.prompt[first:], device=mine.device)
            scored["prompt_logprobs"] = [None] * (first - 1) + mine.gather(1, actual[:, None]).squeeze(1).tolist()
        if job.topk:
            values, ids = mine.topk(min(job.topk, mine.shape[-1]), dim=-1)
            scored["topk"] = (len(job.prompt), ids.shape[-1], ids.tolist(), values.tolist())
        if job.targets:
            answers: list[dict[int, float]] = []
            for row, cells in enumerate(job.targets.cells):  # row i: position i + 1
                if cells:
                    values = rows[row + 1 - start][[token for _, token in cells]].tolist()
                    answers.append({column: value for (column, _), value in zip(cells, values, strict=True)})
                else:
                    answers.append({})
            scored["targets"] = targets_tensor(job.targets, answers)
        found[id(job)] = scored
    return found


def _raise(error: Exception):
    raise error
