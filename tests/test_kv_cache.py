"""The keys and values the local engine keeps between calls: what it finds and evicts, and on the tiny test model
that the teacher's greedy conversations come out token for token the same with the cache as without it, while later
turns prefill only what is new."""

from __future__ import annotations

import json
from importlib import resources

import tiny_model
import torch

from jobs.backends.base import Metered
from jobs.backends.kv_cache import KEY_TOKENS, KVCache, RowState
from jobs.backends.local import LocalEngine
from jobs.config import load_pipeline_config
from jobs.phases import teacher
from jobs.phases.base import PhaseConfig
from jobs.store import StoreSettings

NAME = "Ludwig van Beethoven"
CARD = ("You are Ludwig van Beethoven, the composer, in Vienna in 1824. You are deaf and proud, and you say so. "
        "You speak of your symphonies, your nephew Karl, your walks in the woods and your quarrels with publishers.")


def state(tokens: list[int], base: tuple[int, ...] = (), per_token: int = 4) -> RowState:
    """A row state of one layer whose keys hold each token's id (so a test can see which tokens were kept)."""
    keys = torch.tensor(tokens, dtype=torch.float32).repeat(1, per_token, 1).transpose(1, 2)  # (1, n, per_token)
    return RowState(base, tuple(tokens), [keys], [keys.clone()])


def test_a_row_is_found_by_its_longest_common_prefix_and_never_whole():
    cache = KVCache(budget_bytes=1 << 20)
    first = list(range(100, 120))
    cache.keep(state(first))
    cache.keep(state(first[:12] + [7, 7, 7]))
    found, length = cache.find((), first[:15] + [1, 2, 3])
    assert found is not None and found.tokens == tuple(first) and length == 15
    # a prompt that is all kept tokens still feeds its last one: its logits start the reply
    assert cache.find((), first)[1] == len(first) - 1
    # another base, or other first tokens, find nothing
    assert cache.find((1, 2), first) == (None, 0)
    assert cache.find((), [5] * KEY_TOKENS + first) == (None, 0)


def test_a_continued_row_replaces_its_state_and_the_budget_evicts_the_least_recently_used():
    one = state(list(range(100, 120)))  # 20 tokens x 4 floats x 2 (keys, values) = 640 bytes
    cache = KVCache(budget_bytes=3 * one.nbytes)
    cache.keep(one)
    longer = state(list(range(100, 130)))
    cache.keep(longer, replaces=one)
    assert list(cache.rows.values()) == [longer] and cache.used == longer.nbytes
    other = state(list(range(200, 220)))
    cache.keep(other)
    cache.find((), list(range(100, 125)))  # `longer` is used: `other` is now the least recently used
    cache.keep(state(list(range(300, 320))))
    assert other not in cache.rows.values() and longer in cache.rows.values()
    assert cache.used <= cache.budget


def conversation_config(**overrides: str) -> PhaseConfig:
    settings = {"model.base": tiny_model.NAME, "conversations.share": "1", "conversations.turns": "4",
                "teacher.max_new_tokens": "20", "teacher.temperature": "0", "teacher.repetition_penalty": "1.2",
                "conversations.visitor.max_new_tokens": "16", "conversations.visitor.temperature": "0", **overrides}
    return PhaseConfig(run_id="kv", pipeline=load_pipeline_config("ci", overrides=[f"{k}={v}" for k, v in
                                                                                  settings.items()]),
                       store_settings=StoreSettings(), shard=0)


def test_greedy_conversations_are_token_identical_with_and_without_the_kept_cache():
    config = conversation_config()
    prompts = [json.loads(line) for line in
               resources.files("jobs.assets.prompts").joinpath("beethoven.jsonl").read_text().splitlines()[:8]]
    runs = {}
    for keep in (True, False):
        engine = LocalEngine.for_sampling(config.pipeline.model, kv_cache=keep)
        metered = Metered(engine)
        rows = teacher.generate(config, metered, CARD, prompts, NAME)
        runs[keep] = rows, metered.usage, engine
    (kept_rows, kept_usage, kept_engine), (plain_rows, plain_usage, _) = runs[True], runs[False]
    assert sum(row["turns"] - 1 for row in plain_rows) >= 8, "the conversations went on for several turns"
    assert kept_rows == plain_rows  # every question and reply, turn by turn
    # the same prompts were sent, but later turns ran only their new tokens through the model
    assert kept_usage["prefill_tokens"] == plain_usage["prefill_tokens"]
    # (of what the uncached engine ran: under half with SmolLM2's replies, 0.54 with the tiny model's shorter ones)
    assert kept_usage["computed_prefill_tokens"] < 0.6 * plain_usage["computed_prefill_tokens"]
    assert kept_engine.kv is not None and kept_engine.kv.reused_tokens > 0
