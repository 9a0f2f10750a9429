"""The local engine: transformers + peft on CPU, playing both Tinker clients for the embedded default.

Sampling is batched with left padding and a repetition penalty; training is LoRA (fp32 adapter over a
bf16 base) with AdamW, loss on the weighted (assistant) tokens only, each batch padded to its longest row.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from jobs.backends.base import Datum, SamplingParams
from jobs.backends.model_files import model_dir
from jobs.backends.renderer import Renderer
from jobs.config import ModelConfig, TrainConfig

ADAPTER_FILE = "adapter_model.safetensors"
LOGPROB_BATCH = 8


def _set_threads() -> None:
    # the local runner gives each parallel step a share of the cores through DISTILL_THREADS
    threads = int(os.environ.get("DISTILL_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)


class LocalEngine:
    def __init__(self, model, tokenizer, trainable: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = Renderer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._optimizer = None
        if not trainable:
            self.model.eval()

    # -- construction
    @staticmethod
    def _load_base(model: ModelConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _set_threads()
        folder = model_dir(model.base)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, model.dtype))
        return base, tokenizer

    @classmethod
    def for_sampling(cls, model: ModelConfig, adapter_dir: Path | None = None) -> LocalEngine:
        base, tokenizer = cls._load_base(model)
        if adapter_dir is not None:
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, adapter_dir)
        return cls(base, tokenizer, trainable=False)

    @classmethod
    def for_training(cls, model: ModelConfig, train: TrainConfig) -> LocalEngine:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(train.seed)  # LoRA's initial A matrices come from this
        base, tokenizer = cls._load_base(model)
        lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        engine = cls(get_peft_model(base, lora), tokenizer, trainable=True)
        engine.model.train()
        return engine

    # -- sampling
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        # shortest first, so rows in a batch share a length and padding stays small
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), params.batch_size):
            chunk = order[start:start + params.batch_size]
            ids, mask = self._pad([prompts[i] for i in chunk], left=True)
            torch.manual_seed(params.seed + start)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens,
                do_sample=params.temperature > 0, temperature=params.temperature or None,
                top_p=params.top_p if params.temperature > 0 else None, top_k=None,
                repetition_penalty=params.repetition_penalty, pad_token_id=self.pad_id,
                eos_token_id=self.renderer.end_of_turn)
            for row, index in enumerate(chunk):
                generated = out[row, ids.shape[1]:].tolist()
                if self.renderer.end_of_turn in generated:
                    generated = generated[:generated.index(self.renderer.end_of_turn)]
                results[index] = [t for t in generated if t != self.pad_id]
            if on_batch:
                on_batch(len(chunk))
        return results

    @torch.no_grad()
    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        results = []
        for start in range(0, len(sequences), LOGPROB_BATCH):
            chunk = sequences[start:start + LOGPROB_BATCH]
            ids, mask = self._pad(chunk, left=False)
            logprobs = self._token_logprobs(ids, mask)
            results += [logprobs[row, :len(seq) - 1].float().tolist() for row, seq in enumerate(chunk)]
        return results

    def _token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(ids[:, i+1] | ids[:, :i+1]), shape (batch, length - 1), computed in fp32."""
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids, mask

    # -- training
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def forward_backward(self, batch: list[Datum]) -> dict[str, float]:
        ids, mask = self._pad([d.tokens for d in batch], left=False)
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        for i, datum in enumerate(batch):
            weights[i, :len(datum.weights)] = torch.tensor(datum.weights)
        target_weights = weights[:, 1:]
        nll = -self._token_logprobs(ids, mask)
        total = target_weights.sum().clamp(min=1.0)
        loss = (nll * target_weights).sum() / total
        loss.backward()
        return {"loss": float(loss.detach()), "tokens": float(total)}

    def optim_step(self, learning_rate: float) -> None:
        self._ensure_optimizer()
        for group in self._optimizer.param_groups:
            group["lr"] = learning_rate
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

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

        set_peft_model_state_dict(self.model, load_file(path / ADAPTER_FILE))
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        if state["optimizer"] is not None:
            self._ensure_optimizer()
            self._optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def _ensure_optimizer(self) -> None:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW([p for _, p in self._trainable()], lr=0.0, weight_decay=0.0)


def export_merged(model: ModelConfig, adapter_dir: Path, target: Path, check_texts: list[str]) -> dict:
    """Merge the adapter into the base, save an HF folder, and compare it with base + adapter.

    The check loads the saved folder the way a user would (`AutoModelForCausalLM.from_pretrained`) and
    compares its next-token logits with the unmerged model's on the given prompts, then generates. Both
    are float32: merging in bf16 moves logits by more than one unit, which would hide a real mistake.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _set_threads()
    model = model.model_copy(update={"dtype": "float32"})
    unmerged = LocalEngine.for_sampling(model, adapter_dir)
    merged = PeftModel.from_pretrained(LocalEngine._load_base(model)[0], adapter_dir).merge_and_unload()
    merged.save_pretrained(target)
    unmerged.tokenizer.save_pretrained(target)
    check_prompts = [unmerged.renderer.prompt(text) for text in check_texts]
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, model.dtype)).eval()
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for prompt in check_prompts:
            ids = torch.tensor([prompt])
            a = unmerged.model(input_ids=ids).logits.float()
            b = reloaded(input_ids=ids).logits.float()
            max_diff = max(max_diff, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[1]
        sample = reloaded.generate(input_ids=torch.tensor([check_prompts[0]]), max_new_tokens=24, do_sample=False,
                                   pad_token_id=unmerged.pad_id, eos_token_id=unmerged.renderer.end_of_turn)
    return {"logits_max_abs_diff": round(max_diff, 5), "argmax_agreement": round(agree / total, 5),
            "positions_checked": total, "generated": unmerged.renderer.decode(sample[0, len(check_prompts[0]):].tolist())}
