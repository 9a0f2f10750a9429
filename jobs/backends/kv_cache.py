"""Keys and values the local engine keeps between calls, so a conversation's next turn prefills only what is new.

A conversation's turn t+1 prompt is its turn t prompt, the reply just sampled and the next question. Without a
cache every turn re-reads the whole history, so a conversation costs the square of its length. The engine keeps,
for each row it sampled, the keys and values of every token it fed (prompt and reply) as a `RowState`; a later
prompt that starts with the same tokens reuses them up to their longest common prefix (a re-tokenized reply may
part from the sampled tokens near its end) and prefills the rest.

States are kept per shared prefix (`base`: the tokens every row of a call attended to as `attention.SharedPrefix`,
the card's system turn for the teacher), since a row's keys sit at positions after it. A later call whose prompts
all start with a kept base uses that base, so its rows can find their states. Both are evicted least recently
used first beyond a budget of bytes (`DISTILL_KV_CACHE_MB`, default 2048).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from jobs.backends.attention import SharedPrefix

# rows are found by their first tokens after the base: a conversation's opening question makes them its own
KEY_TOKENS = 8
DEFAULT_BUDGET_MB = 2048


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    same = 0
    while same < n and a[same] == b[same]:
        same += 1
    return same


@dataclass
class RowState:
    """The keys and values per layer, each (kv_heads, len(tokens), head_dim), of a row's tokens after its base."""

    base: tuple[int, ...]
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


class KVCache:
    def __init__(self, budget_bytes: int | None = None):
        if budget_bytes is None:
            budget_bytes = int(os.environ.get("DISTILL_KV_CACHE_MB") or DEFAULT_BUDGET_MB) << 20
        self.budget = budget_bytes
        self.bases: OrderedDict[tuple[int, ...], SharedPrefix] = OrderedDict()
        self.rows: OrderedDict[int, RowState] = OrderedDict()  # by id(state), least recently used first
        self._index: dict[tuple[tuple[int, ...], tuple[int, ...]], set[int]] = {}
        self.used = 0
        # what the cache saved: tokens whose keys and values came from it instead of a forward pass
        self.reused_tokens = 0

    # -- shared prefixes
    def base_for(self, prompts: list[list[int]]) -> tuple[tuple[int, ...], SharedPrefix] | None:
        """The longest kept base that every prompt starts with, leaving each at least one token of its own."""
        shortest = min(len(p) for p in prompts) - 1
        best = None
        for tokens, prefix in self.bases.items():
            if len(tokens) <= shortest and (best is None or len(tokens) > len(best[0])) and all(
                    common_prefix(tokens, p) == len(tokens) for p in prompts):
                best = (tokens, prefix)
        if best is not None:
            self.bases.move_to_end(best[0])
        return best

    def add_base(self, tokens: tuple[int, ...], prefix: SharedPrefix) -> None:
        if tokens not in self.bases:
            self.bases[tokens] = prefix
            self.used += _nbytes(prefix.keys) + _nbytes(prefix.values)
            self._evict()

    # -- rows
    def find(self, base: tuple[int, ...], own: list[int]) -> tuple[RowState | None, int]:
        """The kept state after `base` sharing the longest prefix with `own` (the row's tokens after the base),
        and that length, at most len(own) - 1: the last token is always fed, its logits start the reply."""
        if len(own) <= KEY_TOKENS:
            return None, 0
        best, length = None, 0
        for key in self._index.get((base, tuple(own[:KEY_TOKENS])), ()):
            state = self.rows[key]
            same = min(common_prefix(state.tokens, own), len(own) - 1)
            if same > length:
                best, length = state, same
        if best is not None:
            self.rows.move_to_end(id(best))
        return best, length

    def keep(self, state: RowState, replaces: RowState | None = None) -> None:
        """Keeps a row's state; the one it continued (`replaces`) goes, its tokens are the new state's start."""
        if replaces is not None:
            self._drop(id(replaces))
        if len(state.tokens) <= KEY_TOKENS or state.nbytes > self.budget:
            return
        self.rows[id(state)] = state
        self._index.setdefault((state.base, state.tokens[:KEY_TOKENS]), set()).add(id(state))
        self.used += state.nbytes
        self._evict()

    def _drop(self, key: int) -> None:
        state = self.rows.pop(key, None)
        if state is not None:
            self._index[(state.base, state.tokens[:KEY_TOKENS])].discard(key)
            self.used -= state.nbytes

    def _evict(self) -> None:
        while self.used > self.budget and self.rows:
            self._drop(next(iter(self.rows)))
        while self.used > self.budget and len(self.bases) > 1:
            _, prefix = self.bases.popitem(last=False)
            self.used -= _nbytes(prefix.keys) + _nbytes(prefix.values)

    def clear(self) -> None:
        self.bases.clear()
        self.rows.clear()
        self._index.clear()
        self.used = 0
