"""`make bench`: the local engine against today's baselines, in one process, on this machine.

- teacher: the demo's prompts with the card, sampled with the demo's teacher settings. Baseline: transformers'
  `generate` in float32 with the card re-prefilled in every batch (the engine before this benchmark existed).
  Figure: generated tokens per second.
- train: LoRA SFT on the teacher's replies, the same rows, batch size, LoRA settings and assistant-only loss.
  Baseline: TRL's `SFTTrainer` (prompt-completion rows, `completion_only_loss`). Figure: trained tokens (the
  non-pad tokens that carry loss) per second, the first step of each left out as warm-up.
The engine uses the dtype `model.dtype` resolves to here (auto unless --dtype); the training baseline the same.
Ratios are engine over baseline; only ratios from one run of this script compare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from jobs.assets import builtin
from jobs.backends.base import SamplingParams
from jobs.backends.local import LocalEngine, describe_cpu, resolve_precision
from jobs.backends.model_files import model_dir
from jobs.card import parse_card
from jobs.config import load_pipeline_config
from jobs.phases.student import single_turn
from jobs.phases.train import batch_rows, learning_rate, to_datum
from jobs.store import parse_jsonl


def baseline_teacher(config, prompts: list[list[int]], params: SamplingParams, tokenizer) -> tuple[int, float]:
    """Today's method: HF generate, float32, shortest prompts first, left padding, the card in every row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(config.model.base), dtype=torch.float32).eval()
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    generated = 0
    started = time.perf_counter()
    for start in range(0, len(order), params.batch_size):
        rows = [prompts[i] for i in order[start:start + params.batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        torch.manual_seed(params.seed + start)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, do_sample=True,
                                 temperature=params.temperature, top_p=params.top_p, top_k=None,
                                 repetition_penalty=params.repetition_penalty, pad_token_id=pad, eos_token_id=end)
        for row in out[:, width:].tolist():
            generated += len(row[:row.index(end)] if end in row else row)
    return generated, time.perf_counter() - started


def engine_teacher(config, prompts: list[list[int]], params: SamplingParams, engine) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    replies = engine.sample(prompts, params)
    return replies, time.perf_counter() - started


def baseline_train(config, rows: list[dict], steps: int, dtype: torch.dtype) -> tuple[int, float]:
    """TRL's SFTTrainer; tokens are counted from the labels each step sees (completion tokens, not pads)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train = config.train
    folder = model_dir(config.model.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["reply"]}]} for r in rows])
    timings: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            timings.append(time.perf_counter() - self.started)

    class CountingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
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
    return sum(tokens[1:]), sum(timings[1:])


def engine_train(config, rows: list[dict], steps: int) -> tuple[int, float]:
    train = config.train
    trainer = LocalEngine.for_training(config.model, train)
    data = [to_datum(trainer.renderer, row, train.max_seq_len) for row in rows]
    tokens, seconds = 0, 0.0
    for step in range(steps):
        started = time.perf_counter()
        batch = [data[i] for i in batch_rows(len(data), train.batch_size, step * train.batch_size, train.seed)]
        result = trainer.forward_backward(batch)
        trainer.optim_step(learning_rate(train, step))
        if step:  # the first step is warm-up
            tokens += int(result["tokens"])
            seconds += time.perf_counter() - started
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="demo prompts for the teacher (demo: 240)")
    parser.add_argument("--steps", type=int, default=8, help="training steps for each side (first one is warm-up)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = load_pipeline_config("demo", overrides=[f"model.dtype={args.dtype}"])
    precision = resolve_precision(config.model)
    print(describe_cpu())
    print(f"engine: {precision.device} {precision.dtype}; {args.prompts} prompts, {args.steps} training steps")

    card = parse_card(builtin("builtin:beethoven", "cards", ".yaml"), "builtin:beethoven")
    questions = [row["prompt"] for row in parse_jsonl(builtin("builtin:beethoven", "prompts", ".jsonl"), "prompts")]
    engine = LocalEngine.for_sampling(config.model)
    prompts = [engine.renderer.prompt(q, system=card.teacher_system_prompt()) for q in questions[:args.prompts]]
    params = SamplingParams.from_config(config.teacher)

    base_tokens, base_s = baseline_teacher(config, prompts, params, engine.tokenizer)
    replies, engine_s = engine_teacher(config, prompts, params, engine)
    engine_tokens = sum(map(len, replies))
    rows = [{"prompt": q, "reply": engine.renderer.decode(r)} for q, r in zip(questions, replies, strict=True)]
    rows = [{**row, "messages": single_turn(row["prompt"], row["reply"])} for row in rows]
    del engine

    trl_tokens, trl_s = baseline_train(config, rows, args.steps, precision.torch_dtype)
    own_tokens, own_s = engine_train(config, rows, args.steps)

    table = [("teacher", "HF generate, float32, card re-prefilled", base_tokens, base_s, "generated tokens/s"),
             ("teacher", f"engine, {precision.dtype}, shared prefix", engine_tokens, engine_s, "generated tokens/s"),
             ("train", f"TRL SFTTrainer, {precision.dtype}", trl_tokens, trl_s, "trained tokens/s"),
             ("train", f"engine, {precision.dtype}, packed", own_tokens, own_s, "trained tokens/s")]
    print(f"\n{'work':<8} {'method':<42} {'tokens':>8} {'seconds':>8} {'rate':>9}  unit")
    for work, method, tokens, seconds, unit in table:
        print(f"{work:<8} {method:<42} {tokens:>8} {seconds:>8.1f} {tokens / seconds:>9.1f}  {unit}")
    teacher = (engine_tokens / engine_s) / (base_tokens / base_s)
    train = (own_tokens / own_s) / (trl_tokens / trl_s)
    print(f"\nbench: teacher {teacher:.2f}x, train {train:.2f}x")


if __name__ == "__main__":
    main()
