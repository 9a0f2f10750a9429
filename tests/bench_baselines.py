"""`make bench`'s baselines and its recording client.

- `HFClient`: what the project did before its engine, as a sampling client the phases' own code can call:
  transformers' `generate` in float32 (shortest prompts first, left padding, every prompt whole: the card and a
  conversation's history prefilled again in every call), and scoring by one padded forward pass over the whole
  vocabulary per batch of sequences;
- `train_trl`: TRL's SFTTrainer on the same rows and settings as the engine's training;
- `Recorder`: passes every call on to a client and keeps it (tokens in and out, seconds), so a case run by the
  engine can be replayed by the baseline on identical prompts and its model FLOPs counted.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from bench_mfu import ModelShapes, Work

from jobs.backends.base import SamplingParams, TopK
from jobs.backends.model_files import model_dir
from jobs.backends.renderer import Renderer
from jobs.config import PipelineConfig
from jobs.records import first_reply

# padded tokens (rows x width) per scoring forward: the float32 logits over the vocabulary are the peak (~200 KB a
# token), as the engine's LOGPROB_TOKENS bounds its own
SCORE_TOKENS = 2048


@dataclass
class Call:
    kind: str  # "sample" or "score"
    sequences: list[list[int]]
    params: SamplingParams | None = None
    starts: list[int] | None = None  # scoring: the first position whose distribution is asked
    replies: list[list[int]] | None = None
    seconds: float = 0.0
    computed: int | None = None  # prompt tokens the local engine ran through the model (its own count), if it says


class Recorder:
    """A sampling client that passes each call on to `client` and keeps it in `calls`."""

    def __init__(self, client):
        self.client, self.renderer = client, client.renderer
        self.calls: list[Call] = []

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None, **options) -> list[list[int]]:
        before, started = getattr(self.client, "computed_prefill_tokens", None), time.perf_counter()
        replies = self.client.sample(prompts, params, on_batch=on_batch, **options)
        seconds = time.perf_counter() - started
        computed = None if before is None else self.client.computed_prefill_tokens - before
        self.calls.append(Call("sample", prompts, params=params, replies=replies, seconds=seconds, computed=computed))
        return replies

    def _scored(self, method: str, sequences: list[list[int]], starts: list[int], *args):
        started = time.perf_counter()
        result = getattr(self.client, method)(sequences, *args)
        self.calls.append(Call("score", sequences, starts=starts, seconds=time.perf_counter() - started))
        return result

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._scored("compute_logprobs", sequences, [1] * len(sequences))

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        return self._scored("topk_logprobs", sequences, starts, starts, k)

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        return self._scored("target_logprobs", sequences, [t.start for t in targets], targets)

    def __getattr__(self, name: str):  # whatever else the wrapped client offers
        return getattr(self.client, name)

    def work(self, shapes: ModelShapes) -> Work:
        """The model FLOPs of every call so far, in order (`bench_mfu`)."""
        work = Work(shapes)
        for call in self.calls:
            if call.kind == "sample":
                assert call.replies is not None, "a sampling call keeps its replies"
                work.sampling(call.sequences, call.replies)
            else:
                assert call.starts is not None, "a scoring call keeps its starts"
                work.scoring(call.sequences, call.starts)
        return work


class HFClient:
    """The base model through transformers alone, float32, its default attention."""

    def __init__(self, config: PipelineConfig, renderer: Renderer, pad: int):
        from transformers import AutoModelForCausalLM

        self.renderer = renderer
        self.model = AutoModelForCausalLM.from_pretrained(model_dir(config.model.base), dtype=torch.float32).eval()
        # the engine's end of turn: both stop where the phases' replies end
        self.end, self.pad = renderer.end_of_turn, pad

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), params.batch_size):
            chunk = order[start:start + params.batch_size]
            rows = [prompts[i] for i in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            torch.manual_seed(params.seed + start)
            sampled = params.temperature > 0
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, do_sample=sampled,
                temperature=params.temperature if sampled else None, top_p=params.top_p if sampled else None,
                top_k=None, repetition_penalty=params.repetition_penalty, pad_token_id=self.pad,
                eos_token_id=self.end)
            for i, row in zip(chunk, out[:, width:].tolist(), strict=True):
                replies[i] = row[:row.index(self.end)] if self.end in row else row
            if on_batch:
                on_batch(len(chunk))
        return replies

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> Iterator[tuple[int, torch.Tensor]]:
        """(i, log-softmax at every position of sequence i), right-padded batches of up to SCORE_TOKENS."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        chunk: list[int] = []
        for index in [*order, None]:
            if chunk and (index is None or (len(chunk) + 1) * len(sequences[index]) > SCORE_TOKENS):
                width = max(len(sequences[i]) for i in chunk)
                ids = torch.tensor([sequences[i] + [self.pad] * (width - len(sequences[i])) for i in chunk])
                mask = torch.tensor([[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in chunk])
                logprobs = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(dim=-1)
                for row, i in enumerate(chunk):
                    yield i, logprobs[row, :len(sequences[i])]
                chunk = []
            if index is not None:
                chunk.append(index)

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        found = {i: rows[:-1].gather(1, torch.tensor(sequences[i][1:])[:, None]).squeeze(1).tolist()
                 for i, rows in self._logprobs(sequences)}
        return [found[i] for i in range(len(sequences))]

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        found = {}
        for i, rows in self._logprobs(sequences):
            values, ids = rows[starts[i] - 1:-1].topk(k, dim=-1)  # position j's distribution is row j - 1
            found[i] = TopK(starts[i], ids.tolist(), values.tolist())
        return [found[i] for i in range(len(sequences))]

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        found = {i: [row[ids].tolist() for row, ids in zip(rows[targets[i].start - 1:-1], targets[i].ids, strict=True)]
                 for i, rows in self._logprobs(sequences)}
        return [found[i] for i in range(len(sequences))]


def train_trl(config: PipelineConfig, rows: list[dict], steps: int, dtype: torch.dtype,
              shapes: ModelShapes) -> tuple[int, float, Work]:
    """TRL's SFTTrainer (prompt-completion rows, completion-only loss); trained tokens counted from the labels each
    step sees (completion tokens, not pads), the first step left out as warm-up."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train = config.train
    folder = model_dir(config.model.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": first_reply(r)}]} for r in rows])
    timings: list[float] = []
    steps_seen: list[tuple[list[list[int]], int]] = []  # each step's rows (real tokens) and loss positions

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            timings.append(time.perf_counter() - self.started)

    class CountingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask", torch.ones_like(ids))
            steps_seen.append(([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)],
                               int((labels[:, 1:] != -100).sum())))
            return super().compute_loss(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=train.batch_size, max_steps=steps,
                         learning_rate=train.learning_rate, lr_scheduler_type="linear", weight_decay=0.0,
                         max_length=train.max_seq_len, completion_only_loss=True, use_cpu=not torch.cuda.is_available(),
                         # TRL turns on bf16 autocast by default: the weights' own dtype, as the engine runs them
                         bf16=False, fp16=False,
                         save_strategy="no", report_to=[], logging_steps=steps, seed=train.seed,
                         dataloader_num_workers=0, disable_tqdm=True)
        lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = CountingTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                  peft_config=lora, callbacks=[Timer()])
        trainer.train()
    work = Work(shapes)
    for batch, loss_positions in steps_seen[1:]:
        work.training(batch, loss_positions)
    return sum(n for _, n in steps_seen[1:]), sum(timings[1:]), work
