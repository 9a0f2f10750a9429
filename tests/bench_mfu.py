"""`make bench`'s yardsticks: this CPU's matrix-multiply rate at the model's shapes, and the model FLOPs of a piece of
work, so that each method's speed can be read as a share of what the hardware can do (MFU).

Model FLOPs are the work the task needs, counted the same for every method that does it (so two methods' MFU
compare as their speeds do), never the work an implementation happens to do:
- a forward pass costs 2 x (the decoder's linear weights) per token it computes, 4 x layers x (heads x head_dim)
  per key each token attends (QK^T and AV), and 2 x hidden x vocab per position whose next-token logits are needed;
  the embedding lookup and the norms count nothing;
- a token is computed once: sampling counts each prompt's tokens past the longest prefix it shares with anything
  computed before in the same case (an ideal prefix cache: the card once, a conversation's history once, its new
  question only), then each sampled token; scoring counts a call's shared prefix once and each sequence's rest;
- training counts forward and backward over every real (non-pad) token, a batch's shared prefix once: the base is
  frozen under LoRA, so the backward computes activation gradients only (2x the forward's linear work, not 4x:
  4N per token rather than 6N), the attention's backward twice its forward, and the output head twice at each
  position that carries loss. LoRA's own small matrices count nothing.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# rows of the matrix products the limit is measured at: a packed prefill or training forward, and a decode step
LIMIT_ROWS = 512
DECODE_ROWS = 64


@dataclass(frozen=True)
class ModelShapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShapes:
        """From a transformers config of a Llama-style decoder (SmolLM2)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=head_dim,
                   vocab=config.vocab_size)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_weights(self) -> int:
        """Weights of every decoder layer's linear layers together (the output head not included)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def forward_flops(self, tokens: int, keys: int, logits: int) -> float:
        """`tokens` computed, `keys` attended by them all together, `logits` positions through the output head."""
        attention = 4 * self.layers * self.heads * self.head_dim * keys
        return 2 * self.layer_weights * tokens + attention + 2 * self.hidden * self.vocab * logits

    def train_flops(self, tokens: int, keys: int, logits: int) -> float:
        """Forward and backward, frozen base weights: linear work x2, attention x3, output head x2."""
        attention = 4 * self.layers * self.heads * self.head_dim * keys
        return 4 * self.layer_weights * tokens + 3 * attention + 4 * self.hidden * self.vocab * logits


@dataclass(frozen=True)
class Limit:
    """The CPU's float32 matrix-multiply rate at the model's weight shapes (torch's own GEMM, this process's
    threads): each shape's best time over repeated calls, then all of one forward's linear layers and its output
    head weighted by their FLOPs."""

    rows: int
    gflops: float  # at `rows` rows: the MFU denominator
    decode_gflops: float  # at DECODE_ROWS rows: a decode step's batch
    per_shape: dict[str, float]  # GFLOPS of each distinct weight shape at `rows` rows
    threads: int


def best_seconds(rows: int, inp: int, out: int, seconds: float) -> float:
    """The fastest of repeated `F.linear` calls (rows x inp times inp x out): the least disturbed by other work."""
    x, w = torch.randn(rows, inp), torch.randn(out, inp)
    F.linear(x, w)  # warm-up: allocation, the kernel's first dispatch
    best, calls, started = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        begun = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - begun)
        calls += 1
    return best


def measure_limit(shapes: ModelShapes, seconds: float, rows: int = LIMIT_ROWS) -> Limit:
    weights = {**{name: dims for name, dims in shapes.linears().items()}, "lm_head": (shapes.hidden, shapes.vocab)}
    counts = {name: shapes.layers for name in shapes.linears()} | {"lm_head": 1}
    distinct = sorted(set(weights.values()))

    def rate(at: int) -> tuple[float, dict[tuple[int, int], float]]:
        times = {dims: best_seconds(at, *dims, seconds) for dims in distinct}
        flops = sum(counts[n] * 2 * at * a * b for n, (a, b) in weights.items())
        return flops / sum(counts[n] * times[dims] for n, dims in weights.items()) / 1e9, times

    gflops, times = rate(rows)
    decode, _ = rate(DECODE_ROWS)
    per_shape = {"/".join(n for n, d in weights.items() if d == dims) + f" {dims[0]}x{dims[1]}":
                 2 * rows * dims[0] * dims[1] / times[dims] / 1e9 for dims in distinct}
    return Limit(rows, gflops, decode, per_shape, torch.get_num_threads())


def keys_between(start: int, end: int) -> int:
    """Keys attended by the tokens at positions start..end-1 together, each attending itself and all before it."""
    return (end * (end + 1) - start * (start + 1)) // 2


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_prefix(rows: list[list[int]]) -> int:
    """Tokens at the start of every row (of two or more), leaving each row at least one of its own."""
    if len(rows) < 2:
        return 0
    length = min(map(len, rows)) - 1
    for row in rows[1:]:
        length = common_prefix(rows[0][:length], row)
    return length


class PrefixCache:
    """Every sequence computed so far, sorted: the longest prefix a new sequence shares with any of them lies with
    one of its two neighbours in that order."""

    def __init__(self):
        self.sequences: list[tuple[int, ...]] = []

    def known(self, tokens: list[int]) -> int:
        key = tuple(tokens)
        at = bisect.bisect_left(self.sequences, key)
        return max((common_prefix(key, self.sequences[j]) for j in (at - 1, at) if 0 <= j < len(self.sequences)),
                   default=0)

    def add(self, tokens: list[int]) -> None:
        bisect.insort(self.sequences, tuple(tokens))


@dataclass
class Work:
    """A case's model FLOPs (module docstring), and the tokens an ideal engine computes for it."""

    shapes: ModelShapes
    flops: float = 0.0
    prefill: int = 0  # prompt tokens computed (sampling, scoring, training rows)
    sampled: int = 0
    scored: int = 0  # positions whose distribution (scoring) or loss (training) is needed
    cache: PrefixCache = field(default_factory=PrefixCache)

    def sampling(self, prompts: list[list[int]], replies: list[list[int]]) -> None:
        for prompt, reply in zip(prompts, replies, strict=True):
            # the prompt's last token always runs: its logits choose the first reply token
            start = min(self.cache.known(prompt), len(prompt) - 1)
            self.prefill += len(prompt) - start
            self.flops += self.shapes.forward_flops(len(prompt) - start, keys_between(start, len(prompt)), 1)
            end = len(prompt) + len(reply)
            self.sampled += len(reply)
            self.flops += self.shapes.forward_flops(len(reply), keys_between(len(prompt), end), len(reply))
            self.cache.add(prompt + reply)

    def scoring(self, sequences: list[list[int]], starts: list[int]) -> None:
        """One call over `sequences`, each's distribution needed from position starts[i] on (1: every token)."""
        shared = shared_prefix(sequences)
        tokens = shared + sum(len(s) - shared for s in sequences)
        keys = keys_between(0, shared) + sum(keys_between(shared, len(s)) for s in sequences)
        logits = sum(len(s) - start for s, start in zip(sequences, starts, strict=True))
        self.prefill += tokens
        self.scored += logits
        self.flops += self.shapes.forward_flops(tokens, keys, logits)

    def training(self, rows: list[list[int]], loss_positions: int) -> None:
        """One batch: forward and backward over its rows, loss at `loss_positions` positions."""
        shared = shared_prefix(rows)
        tokens = shared + sum(len(r) - shared for r in rows)
        keys = keys_between(0, shared) + sum(keys_between(shared, len(r)) for r in rows)
        self.prefill += tokens
        self.scored += loss_positions
        self.flops += self.shapes.train_flops(tokens, keys, loss_positions)
