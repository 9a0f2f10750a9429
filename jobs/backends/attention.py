"""The local engine's attention: a shared prefix attended once for a whole batch, and packed rows.

Registered with transformers as the `distill` attention implementation. Every forward of the engine passes a
`Layout` (through the model's keyword arguments, which transformers hands to the attention function) saying
how the query block relates to the keys:

- rows of a batch, left-padded, each behind an optional shared prefix whose keys and values were computed
  once (the card's system turn for every teacher prompt). The prefix is attended as one matrix product per
  key-value head for all rows, instead of being copied into every row's cache and read row by row
  (shared-prefix attention, as in Hydragen);
- or one packed sequence of several rows, each attending causally to itself only (training without pads).

With no prefix and no packing this is ordinary causal attention over a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

NAME = "distill"


@dataclass
class SharedPrefix:
    """Keys and values of the prefix per layer, each (kv_heads, prefix_len, head_dim), and its length."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @classmethod
    def from_cache(cls, cache) -> SharedPrefix:
        return cls([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers])


@dataclass
class Layout:
    """How the tokens of one forward pass attend.

    `key_mask` (batch, keys): which cached plus current suffix positions are real tokens (not left pads);
    `segments`: for a packed batch of one row, the (start, end) of each packed sequence.
    """

    key_mask: torch.Tensor | None = None
    prefix: SharedPrefix | None = None
    segments: list[tuple[int, int]] | None = None


def _attend(query, key, value, allowed, scaling: float, prefix_kv=None) -> torch.Tensor:
    """Softmax attention of `query` (B, Hq, q, D) over `key`/`value` (B, Hkv, S, D), where `allowed`
    (B, 1, q, S) is True, and over the shared prefix (Hkv, P, D) when given. Returns (B, q, Hq, D)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # the query heads that share a key-value head become extra query rows: no copy of keys or values
    grouped = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).view(batch, kv_heads, group, q_len, -1) * scaling
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    if prefix_kv is not None:
        prefix_keys, prefix_values = prefix_kv
        # every row's queries against the one prefix: a single (rows x prefix) product per key-value head
        flat = grouped.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)
        prefix_scores = torch.bmm(flat, prefix_keys.transpose(1, 2)) * scaling
        prefix_scores = prefix_scores.view(kv_heads, batch, group, q_len, -1).transpose(0, 1)
        scores = torch.cat([prefix_scores, scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if prefix_kv is not None:
        prefix_len = prefix_keys.shape[1]
        prefix_probs, probs = probs[..., :prefix_len], probs[..., prefix_len:]
        flat_probs = prefix_probs.transpose(0, 1).reshape(kv_heads, batch * group * q_len, prefix_len)
        prefix_out = torch.bmm(flat_probs, prefix_values).view(kv_heads, batch, group * q_len, dim).transpose(0, 1)
    out = torch.matmul(probs.reshape(batch, kv_heads, group * q_len, -1), value)
    if prefix_kv is not None:
        out = out + prefix_out
    return out.view(batch, heads, q_len, dim).transpose(1, 2)


def _causal(q_len: int, k_len: int, device) -> torch.Tensor:
    """(q, k) True where query i (the last q of k positions) may see key j."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, layout: Layout | None = None,
              **_):
    if layout is None:
        raise RuntimeError("the distill attention needs a Layout: run the model through the local engine")
    prefix = layout.prefix
    prefix_kv = (prefix.keys[module.layer_idx], prefix.values[module.layer_idx]) if prefix is not None else None
    if layout.segments is not None:
        parts = []
        for start, end in layout.segments:
            allowed = _causal(end - start, end - start, query.device)[None, None]
            parts.append(_attend(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], allowed,
                                 scaling, prefix_kv))
        return torch.cat(parts, dim=1), None
    q_len, k_len = query.shape[2], key.shape[2]
    causal = _causal(q_len, k_len, query.device)
    # a left pad may only see itself: it has no real key to attend to, and a fully masked row would give NaN
    pad_self = torch.zeros_like(causal)
    pad_self[:, k_len - q_len:] = torch.eye(q_len, dtype=torch.bool, device=query.device)
    assert layout.key_mask is not None, "a Layout without segments has a key_mask: every such forward passes one"
    allowed = causal & layout.key_mask.bool()[:, None, None, :] | pad_self
    return _attend(query, key, value, allowed, scaling, prefix_kv), None


AttentionInterface.register(NAME, attention)
