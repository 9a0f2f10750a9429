"""The local engine: transformers + peft, playing both Tinker clients for the embedded default.

Where the time goes, and what the engine does about it:
- precision (`jobs.backends.precision`): bf16 only where the hardware computes it natively, float32 elsewhere;
- sampling: the prompts of one call usually share a long prefix (the card's system turn). Its keys and
  values are computed once and attended by every row through `attention.SharedPrefix`, so each batch
  prefills only its questions. Decoding is a plain loop over a KV cache: rows that finish leave the batch;
- training and log-probabilities: the rows of a batch are packed into one sequence with no padding, each row
  attending only to itself (`attention.Layout.segments`) and to the prefix all rows share, computed once;
  training computes logits only at the positions whose loss weight is non-zero.
The adapter is fp32 (rank and alpha from the train config, all linear layers, no dropout) over the base; the
export merges it into the base (`jobs.backends.merge`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from jobs.backends import attention
from jobs.backends.attention import Layout, SharedPrefix
from jobs.backends.base import ADAPTER_WEIGHTS, Datum, LossFn, SamplingParams, TopK
from jobs.backends.kv_cache import KVCache, RowState
from jobs.backends.model_files import model_dir
from jobs.backends.precision import Precision, resolve_precision, set_threads
from jobs.backends.renderer import Renderer
from jobs.backends.sampling import MIN_SHARED_PREFIX, choose_tokens, shared_prefix_length
from jobs.log import get_logger

if TYPE_CHECKING:  # types only: jobs.config imports the backend registry, whose local backend imports this engine
    from jobs.config import ModelConfig, TrainConfig

# tokens per packed forward in compute_logprobs: the float32 log-softmax over the vocabulary is the peak
LOGPROB_TOKENS = 1024


@dataclass
class Decoded:
    """A row's reply and, where the engine keeps them, the keys and values of the tokens it fed."""

    reply: list[int]
    tokens: tuple[int, ...] = ()
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


class LocalEngine:
    def __init__(self, model, tokenizer, precision: Precision, trainable: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        self.device = torch.device(precision.device)
        self.renderer = Renderer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._optimizer: torch.optim.AdamW | None = None  # made by the first optim_step or load_state
        # keys and values kept between calls (`kv_cache`): only where the weights never change
        self.kv: KVCache | None = None
        # prompt tokens run through the model by `sample`: the rest came from a shared prefix or the kept cache
        self.computed_prefill_tokens = 0
        if not trainable:
            self.model.eval()

    # -- construction
    @staticmethod
    def _load_base(model: ModelConfig, precision: Precision):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        set_threads()
        folder = model_dir(model.base)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.torch_dtype,
                                                    attn_implementation=attention.NAME)
        # transformers wraps `to` in functools.wraps(torch.nn.Module.to), whose type still expects `self` first
        base = base.to(precision.device)  # type: ignore[arg-type]
        get_logger().info("engine loaded", model=model.base, device=precision.device, dtype=precision.dtype,
                          threads=torch.get_num_threads())
        return base, tokenizer

    @classmethod
    def for_sampling(cls, model: ModelConfig, adapter_dir: Path | None = None, kv_cache: bool = False,
                     merge: bool = True) -> LocalEngine:
        """An engine with fixed weights; with `kv_cache` it keeps each sampled row's keys and values, so a prompt
        that continues an earlier one (a conversation's next turn) prefills only its new tokens.

        An adapter is merged into float32 weights (`merge`): unmerged, every linear layer adds two small products
        per step, which made sampling the student ~8x slower than the base on a 2-core CPU. bf16 weights keep it
        apart: rounding W + BA to bf16 would drop most of the adapter's small update."""
        precision = resolve_precision(model)
        base, tokenizer = cls._load_base(model, precision)
        if adapter_dir is not None:
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, adapter_dir)
            if merge and precision.dtype == "float32":
                base = base.merge_and_unload()
        engine = cls(base, tokenizer, precision, trainable=False)
        engine.kv = KVCache() if kv_cache else None
        return engine

    @classmethod
    def for_training(cls, model: ModelConfig, train: TrainConfig) -> LocalEngine:
        from peft import LoraConfig, get_peft_model

        precision = resolve_precision(model)
        torch.manual_seed(train.seed)  # LoRA's initial A matrices come from this
        base, tokenizer = cls._load_base(model, precision)
        lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        engine = cls(get_peft_model(base, lora), tokenizer, precision, trainable=True)
        engine.model.train()
        return engine

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # -- sampling
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None,
               share_prefix: bool = True, seeds: list[int] | None = None) -> list[list[int]]:
        """Completion tokens (end-of-turn stripped) for each prompt. Row i samples with its own generator, seeded
        with `seeds[i]` (default `params.seed + i`), so its reply depends on its prompt, the parameters and its
        seed only: not on the other prompts of the call, their order or `params.batch_size` (up to the float
        rounding of batched matrix products, which has not been seen to change a token in float32).

        With a kept cache (`kv_cache`, and `params.reuse_kv`), a prompt that starts with the tokens of a row sampled
        before (its prompt and reply) reuses their keys and values; `share_prefix=False` uses none of it."""
        if seeds is None:
            seeds = [params.seed + i for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        kv = self.kv if share_prefix and params.reuse_kv else None
        prefix_len, prefix = self._shared_prefix(prompts, kv) if share_prefix else (0, None)
        base = tuple(prompts[0][:prefix_len])
        # shortest first, so rows in a batch share a length and padding stays small
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), params.batch_size):
            chunk = order[start:start + params.batch_size]
            generators = [torch.Generator(device=self.device).manual_seed(seeds[i]) for i in chunk]
            rows = [prompts[i] for i in chunk]
            found: list[tuple[RowState | None, int]] = (
                [kv.find(base, row[prefix_len:]) for row in rows] if kv else [(None, 0)] * len(rows))
            states = self._decode(rows, prefix_len, prefix, params, generators, found, remember=kv is not None)
            for index, state, (reused, _) in zip(chunk, states, found, strict=True):
                results[index] = state.reply
                if kv is not None:
                    kv.keep(RowState(base, state.tokens, state.keys, state.values), replaces=reused)
            if on_batch:
                on_batch(len(chunk))
        return results

    def _shared_prefix(self, prompts: list[list[int]], kv: KVCache | None) -> tuple[int, SharedPrefix | None]:
        """The prefix every prompt shares and its keys and values: a kept one if the prompts all start with it
        (so their rows find what they kept after it), else computed (and kept)."""
        if kv is not None and (kept := kv.base_for(prompts)) is not None:
            return len(kept[0]), kept[1]
        length = shared_prefix_length(prompts)
        if not length:
            return 0, None
        prefix = self._prefix(prompts[0][:length])[0]
        self.computed_prefill_tokens += length
        if kv is not None:
            kv.add_base(tuple(prompts[0][:length]), prefix)
        return length, prefix

    def _prefix(self, tokens: list[int], logprobs: bool = False) -> tuple[SharedPrefix, torch.Tensor | None]:
        """The prefix's keys and values, and with `logprobs` the log-softmax at each of its positions."""
        from transformers import DynamicCache

        cache = DynamicCache()
        ids = self._tensor([tokens])
        out = self.model(input_ids=ids, position_ids=torch.arange(len(tokens), device=self.device)[None],
                         cache=cache, use_cache=True, layout=Layout(key_mask=torch.ones_like(ids)),
                         logits_to_keep=0 if logprobs else 1)
        return SharedPrefix.from_cache(cache), out.logits[0].float().log_softmax(dim=-1) if logprobs else None

    def _decode(self, rows: list[list[int]], prefix_len: int, prefix: SharedPrefix | None, params: SamplingParams,
                generators: list[torch.Generator], found: list[tuple[RowState | None, int]],
                remember: bool = False) -> list[Decoded]:
        """Each row's reply, and the keys and values of every token it fed after the prefix. `found` gives, per
        row, kept keys and values of its first tokens after the prefix (state, how many), which are not fed again:
        they stand right-aligned before the row's new tokens, left pads before both and between them. With `remember`,
        each row's fed keys and values come back with its reply."""
        own = [row[prefix_len:] for row in rows]
        reused = [length for _, length in found]
        ids, key_mask = self._left_pad([tokens[length:] for tokens, length in zip(own, reused, strict=True)])
        self.computed_prefill_tokens += int(key_mask.sum())
        # real tokens continue the prefix's and the kept tokens' positions; pads are never attended
        positions = prefix_len + self._tensor(reused)[:, None] + (key_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache, kept_mask = self._kept(found)
        if self.kv is not None:
            self.kv.reused_tokens += sum(reused)
        key_mask = torch.cat([kept_mask, key_mask], dim=1)
        # every token each row has seen, for the repetition penalty; short rows repeat their first token
        width = max(map(len, rows))
        history = self._tensor([row + row[:1] * (width - len(row)) for row in rows])
        live = torch.arange(len(rows), device=self.device)  # which rows are still generating
        replies: list[list[int]] = [[] for _ in rows]
        done: dict[int, Decoded] = {}
        for step in range(params.max_tokens):
            logits = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                                layout=Layout(key_mask=key_mask, prefix=prefix), logits_to_keep=1).logits[:, -1]
            tokens = choose_tokens(logits, history, params, generators)
            for row, token in zip(live.tolist(), tokens.tolist(), strict=True):
                if token != self.renderer.end_of_turn:
                    replies[row].append(token)
            going = tokens != self.renderer.end_of_turn
            if step == params.max_tokens - 1 or not going.any():
                break
            if not going.all():  # finished rows leave the batch and its cache
                if remember:
                    for slot in (~going).nonzero().squeeze(1).tolist():
                        row = int(live[slot])
                        done[row] = self._fed(cache, key_mask, slot, own[row] + replies[row], replies[row])
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, tokens, key_mask, positions, history = (t[keep] for t in (live, tokens, key_mask, positions,
                                                                                 history))
                generators = [generators[i] for i in keep.tolist()]
            ids = tokens[:, None]
            history = torch.cat([history, ids], dim=1)
            key_mask = torch.cat([key_mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        for slot, row in enumerate(live.tolist() if remember else []):
            done[row] = self._fed(cache, key_mask, slot, own[row] + replies[row], replies[row])
        return [done.get(row) or Decoded(replies[row]) for row in range(len(rows))]

    def _kept(self, found: list[tuple[RowState | None, int]]) -> tuple[Any, torch.Tensor]:
        """A decoding cache holding each row's reused keys and values right-aligned, and their mask."""
        from transformers import DynamicCache

        width = max(length for _, length in found)
        mask = torch.zeros((len(found), width), dtype=torch.long, device=self.device)
        if not width:
            return DynamicCache(), mask
        example = next(state for state, length in found if state is not None and length)
        layers = []
        for layer in range(len(example.keys)):
            heads, _, dim = example.keys[layer].shape
            keys = example.keys[layer].new_zeros((len(found), heads, width, dim))
            values = torch.zeros_like(keys)
            for i, (state, length) in enumerate(found):
                if state is not None and length:
                    keys[i, :, width - length:] = state.keys[layer][:, :length]
                    values[i, :, width - length:] = state.values[layer][:, :length]
            layers.append((keys, values))
        for i, (_, length) in enumerate(found):
            mask[i, width - length:] = 1 if length else 0
        return DynamicCache(ddp_cache_data=layers), mask

    @staticmethod
    def _fed(cache, key_mask: torch.Tensor, slot: int, tokens: list[int], reply: list[int]) -> Decoded:
        """Row `slot`'s reply and the keys and values of the tokens it fed (its own prompt tokens, then the reply
        but the last token sampled, which was never fed), copied out of the batch's cache."""
        real = key_mask[slot].bool()
        count = int(real.sum())
        return Decoded(reply, tuple(tokens[:count]), [layer.keys[slot][:, real] for layer in cache.layers],
                       [layer.values[slot][:, real] for layer in cache.layers])

    @torch.no_grad()
    def compute_logprobs(self, sequences: list[list[int]], share_prefix: bool = True) -> list[list[float]]:
        prefix_len = shared_prefix_length(sequences) if share_prefix else 0
        prefix: SharedPrefix | None = None
        shared: list[float] = []
        first: torch.Tensor | None = None
        if prefix_len:
            prefix, table = self._prefix(sequences[0][:prefix_len], logprobs=True)
            assert table is not None, "_prefix returns the log-softmax when asked for logprobs"
            targets = self._tensor(sequences[0][1:prefix_len])
            shared = table[:-1].gather(1, targets[:, None]).squeeze(1).tolist()
            first = table[-1]  # predicts each row's first token after the prefix
        results: list[list[float]] = []
        chunk: list[list[int]] = []
        tokens = 0
        for sequence in sequences:
            if chunk and tokens + len(sequence) - prefix_len > LOGPROB_TOKENS:
                results += self._packed_logprobs(chunk, prefix_len, prefix)
                chunk, tokens = [], 0
            chunk.append(sequence)
            tokens += len(sequence) - prefix_len
        if chunk:
            results += self._packed_logprobs(chunk, prefix_len, prefix)
        if first is None:
            return results
        return [shared + [float(first[seq[prefix_len]])] + row for seq, row in zip(sequences, results, strict=True)]

    @torch.no_grad()
    def position_logprobs(self, sequences: list[list[int]], starts: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, log-softmax over the vocabulary at positions starts[i]..len-1 of sequence i: one row a position,
        the distribution of the token there), a chunk of rows per forward pass behind their shared prefix."""
        prefix_len = min(shared_prefix_length(sequences), min(starts) - 1)
        if prefix_len < MIN_SHARED_PREFIX:
            prefix_len = 0
        prefix = self._prefix(sequences[0][:prefix_len])[0] if prefix_len else None
        chunk: list[int] = []
        for index in range(len(sequences) + 1):
            if chunk and (index == len(sequences) or sum(len(sequences[i]) - prefix_len for i in chunk)
                          + len(sequences[index]) - prefix_len > LOGPROB_TOKENS):
                tokens, positions, segments, _ = self._pack([sequences[i][prefix_len:] for i in chunk],
                                                            offset=prefix_len)
                keep = torch.zeros(tokens.shape[1], dtype=torch.bool, device=self.device)
                for (start, end), i in zip(segments, chunk, strict=True):
                    keep[start + starts[i] - 1 - prefix_len:end - 1] = True
                logprobs = self.model(input_ids=tokens, position_ids=positions,
                                      layout=Layout(segments=segments, prefix=prefix),
                                      logits_to_keep=keep[None]).logits.float().log_softmax(dim=-1)
                offset = 0
                for i in chunk:
                    count = len(sequences[i]) - starts[i]
                    yield i, logprobs[offset:offset + count]
                    offset += count
                chunk = []
            if index < len(sequences):
                chunk.append(index)

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        found: dict[int, TopK] = {}
        for i, logprobs in self.position_logprobs(sequences, starts):
            values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            found[i] = TopK(starts[i], ids.tolist(), values.tolist())
        return [found[i] for i in range(len(sequences))]

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        found: dict[int, list[list[float]]] = {}
        for i, logprobs in self.position_logprobs(sequences, [t.start for t in targets]):
            found[i] = [row[ids].tolist() for row, ids in zip(logprobs, targets[i].ids, strict=True)]
        return [found[i] for i in range(len(sequences))]

    def _packed_logprobs(self, rows: list[list[int]], start: int, prefix: SharedPrefix | None) -> list[list[float]]:
        """log p(row[i+1] | row[:i+1]) for i >= start, the rows' own parts packed into one forward pass behind
        the shared prefix `row[:start]`."""
        tokens, positions, segments, targets = self._pack([row[start:] for row in rows], offset=start)
        logits = self.model(input_ids=tokens, position_ids=positions,
                            layout=Layout(segments=segments, prefix=prefix)).logits[0].float()
        logprobs = -F.cross_entropy(logits, targets, reduction="none")
        return [logprobs[a:b - 1].tolist() for a, b in segments]

    def _pack(self, rows: list[list[int]],
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], torch.Tensor]:
        """One sequence of all rows: tokens (1, T), positions restarting at `offset` per row, the (start, end)
        of each row, and each position's next token (the row's last position gets a dummy 0)."""
        flat: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int]] = []
        targets: list[int] = []
        for row in rows:
            segments.append((len(flat), len(flat) + len(row)))
            flat += row
            positions += range(offset, offset + len(row))
            targets += row[1:] + [0]
        return self._tensor([flat]), self._tensor([positions]), segments, self._tensor(targets)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows right-aligned in one tensor, and the mask of their real tokens."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = self._tensor(row)
            mask[i, width - len(row):] = 1
        return ids, mask

    # -- training
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def forward_backward(self, batch: list[Datum], reduction: str = "mean", logprobs: bool = False,
                         loss_fn: LossFn = "cross_entropy") -> dict:
        """The batch's weighted loss (`Datum` says what it is at a position), its gradients accumulated. Position i
        predicts token i with weight `weights[i]`. The rows are packed without padding, logits are computed only
        where a weight is non-zero, and a prefix that every row shares without loss on it (the chat template's
        system line) is computed once for the batch, its gradients flowing back from every row.

        reduction "mean" (the local backend): the weighted mean, sum(w * loss) / max(sum(w), 1). "sum" (Tinker's
        losses): sum(w * loss) itself, so its loss and gradients are the mean's times the total weight.
        Returns {"loss", "tokens" (the total weight)}, and with `logprobs` also "logprobs": per datum, the
        log-probability of each of its tokens after the first (len(tokens) - 1 values) at the positions with a
        non-zero weight, and 0.0 at the others (their logits are never computed); with soft targets also
        "candidate_logprobs": per datum, one row per token after the first, the log-probability of each of its
        `candidates` there (0.0 where the weight is zero)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        prefix_len = shared_prefix_length([d.tokens for d in batch])
        if any(any(d.weights[1:prefix_len + 1]) for d in batch):
            prefix_len = 0
        prefix = self._prefix(batch[0].tokens[:prefix_len])[0] if prefix_len else None
        tokens, positions, segments, targets = self._pack([d.tokens[prefix_len:] for d in batch], offset=prefix_len)

        def flat(values: list[list[float]]) -> torch.Tensor:
            """Per-datum values at positions 1.. (aligned to `tokens`) as one packed column, 0 on each row's last."""
            column = torch.zeros(tokens.shape[1], dtype=torch.float32, device=self.device)
            for (start, end), row in zip(segments, values, strict=True):
                column[start:end - 1] = torch.tensor(row[prefix_len + 1:], device=self.device)
            return column

        weights = flat([d.weights for d in batch])
        keep = weights > 0
        logits = self.model(input_ids=tokens, position_ids=positions, layout=Layout(segments=segments, prefix=prefix),
                            logits_to_keep=keep[None]).logits.float()
        target_logprobs = -F.cross_entropy(logits, targets[keep], reduction="none")
        if loss_fn == "importance_sampling":
            ratio = (target_logprobs - flat([d.sampled_logprobs or [] for d in batch])[keep]).exp()
            per_position = -ratio * flat([d.advantages or [] for d in batch])[keep]
        elif batch[0].candidates is not None:
            candidates, probs = self._soft_targets(batch, prefix_len)
            chosen = logits.log_softmax(dim=-1).gather(1, candidates)
            per_position = -(chosen * probs).sum(dim=1)
        else:
            per_position = -target_logprobs
        total = weights.sum()
        loss = (per_position * weights[keep]).sum()
        if reduction == "mean":
            loss = loss / total.clamp(min=1.0)
        loss.backward()
        result: dict[str, float | list[list[float]] | list[list[list[float]]]] = {
            "loss": float(loss.detach()), "tokens": float(total.clamp(min=1.0) if reduction == "mean" else total)}
        if logprobs:
            packed = torch.zeros(tokens.shape[1], dtype=torch.float32, device=self.device)
            packed[keep] = target_logprobs.detach()
            result["logprobs"] = [[0.0] * prefix_len + packed[start:end - 1].tolist() for start, end in segments]
            if loss_fn == "cross_entropy" and batch[0].candidates is not None:
                result["candidate_logprobs"] = self._unpack_rows(batch, segments, keep, chosen.detach(), prefix_len)
        return result

    @staticmethod
    def _unpack_rows(batch: list[Datum], segments: list[tuple[int, int]], keep: torch.Tensor, rows: torch.Tensor,
                     prefix_len: int) -> list[list[list[float]]]:
        """`rows` (one per kept position, in packing order) back per datum: for tokens[1:], each position's
        first len(candidates) values, zeros where the position was not kept."""
        kept, values = keep.tolist(), rows.tolist()
        index = [-1] * len(kept)
        count = 0
        for column, flag in enumerate(kept):
            if flag:
                index[column], count = count, count + 1
        out = []
        for (start, _), datum in zip(segments, batch, strict=True):
            mine = []
            for j, candidates in enumerate((datum.candidates or [])[1:]):  # position j predicts token j + 1
                column = start + j - prefix_len
                row = values[index[column]] if j >= prefix_len and kept[column] else None
                mine.append(row[:len(candidates)] if row is not None else [0.0] * len(candidates))
            out.append(mine)
        return out

    def _soft_targets(self, batch: list[Datum], prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates and their target probabilities at every weighted position, in packing order, as
        (positions, k) tensors; shorter rows are padded with probability 0."""
        rows = [(ids, probs) for d in batch for w, ids, probs in
                zip(d.weights[prefix_len + 1:], (d.candidates or [])[prefix_len + 1:], (d.probs or [])[prefix_len + 1:],
                    strict=True) if w > 0]
        width = max((len(ids) for ids, _ in rows), default=1)  # no weighted position: (0, 1), a zero loss
        candidates = self._tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]).reshape(len(rows), width)
        probs = torch.tensor([p + [0.0] * (width - len(p)) for _, p in rows], dtype=torch.float32, device=self.device)
        return candidates, probs.reshape(len(rows), width)

    def optim_step(self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> None:
        """One AdamW step (torch's, decoupled weight decay) on the LoRA parameters with these hyperparameters,
        after clipping the gradients' global norm to `grad_clip_norm` (0: no clipping); then clears gradients."""
        optimizer = self._ensure_optimizer()
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable()], grad_clip_norm)
        for group in optimizer.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._trainable()}

    def save_state(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)  # adapter_model.safetensors + adapter_config.json
        torch.save({"optimizer": self._optimizer.state_dict() if self._optimizer else None,
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, path / "trainer_state.pt")

    def load_state(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(path / ADAPTER_WEIGHTS, device=self.precision.device))
        state = torch.load(path / "trainer_state.pt", weights_only=False, map_location=self.device)
        if state["optimizer"] is not None:
            self._ensure_optimizer().load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate(state["python_rng"])

    def _ensure_optimizer(self) -> torch.optim.AdamW:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW([p for _, p in self._trainable()], lr=0.0, weight_decay=0.0)
        return self._optimizer

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits at every position of one sequence, float32 (the export check)."""
        with torch.no_grad():
            ids = self._tensor([tokens])
            return self.model(input_ids=ids, layout=Layout(key_mask=torch.ones_like(ids))).logits[0].float()
