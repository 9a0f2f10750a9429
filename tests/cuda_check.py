"""The local engine on CUDA (`model.device=cuda`): correctness against transformers, then sampling speed.

For a GPU machine without the project's venv or the model's weights (the device machines of this workplace are
offline and take at most 64 MiB along): SmolLM2-135M's architecture and tokenizer with random weights. Carry
the wheels the machine lacks (transformers 5.24, peft, pydantic, structlog, boto3) and a folder with the model's
config.json and tokenizer files (from ~/.cache/distill/models/...), then

    pip install --no-deps --target /tmp/pylib WHEELS/*.whl
    PYTHONPATH=/tmp/pylib python3 tests/cuda_check.py MODEL_FILES_FOLDER

Prints greedy agreement with `generate`, log-probability and packed-loss differences, and tokens/s of the
engine against `generate` (bf16, 256 prompts sharing a long system prompt, 64 new tokens each)."""
import json
import os
import sys
import time
from pathlib import Path

import torch

root = Path(__file__).resolve().parents[1]
model_files = Path(sys.argv[1])
cache = Path("/tmp/distill-cache")
folder = cache / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
os.environ["DISTILL_CACHE_DIR"] = str(cache)
sys.path.insert(0, str(root))

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

if not (folder / "model.safetensors").exists():
    folder.mkdir(parents=True, exist_ok=True)
    for f in model_files.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)

from jobs.backends.attention import Layout  # noqa: E402
from jobs.backends.base import Datum, SamplingParams  # noqa: E402
from jobs.backends.local import LocalEngine  # noqa: E402
from jobs.backends.precision import resolve_precision  # noqa: E402
from jobs.config import ModelConfig, TrainConfig  # noqa: E402

out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
fp32 = ModelConfig(device="cuda", dtype="float32")
out["auto_precision"] = str(resolve_precision(ModelConfig(device="auto")))
engine = LocalEngine.for_sampling(fp32)
render = engine.renderer
tok = AutoTokenizer.from_pretrained(folder)
questions = ["What is music to you?", "Tell me about Vienna.", "Do you like coffee?", "Who was your teacher?",
             "How do you compose?", "What about your deafness?", "Why the Ninth?", "Any advice for a young pianist?"]
card = "You are Ludwig van Beethoven, composer. Answer in character, briefly, with warmth. " * 4
prompts = [render.prompt(q, system=card) for q in questions]
greedy = SamplingParams(max_tokens=24, temperature=0.0, batch_size=8)
mine = engine.sample(prompts, greedy)
ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
same = 0
for p, m in zip(prompts, mine, strict=True):
    g = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                     eos_token_id=render.end_of_turn, pad_token_id=render.end_of_turn)[0, len(p):].tolist()
    g = [t for t in g if t != render.end_of_turn]
    same += g == m
out["greedy_equal_to_hf_generate"] = f"{same}/{len(prompts)}"
seqs = [p + m for p, m in zip(prompts, mine, strict=True)]
lps = engine.compute_logprobs(seqs)
worst = 0.0
with torch.no_grad():
    for s, lp in zip(seqs, lps, strict=True):
        logits = ref(torch.tensor([s], device="cuda")).logits[0].float().log_softmax(-1)
        want = logits[:-1].gather(1, torch.tensor(s[1:], device="cuda")[:, None]).squeeze(1)
        worst = max(worst, float((want - torch.tensor(lp, device="cuda")).abs().max()))
out["logprobs_max_abs_diff_vs_hf"] = worst
trainer = LocalEngine.for_training(fp32, TrainConfig(lora_rank=8))
batch = [Datum(s, [0.0] * len(p) + [1.0] * (len(s) - len(p))) for s, p in zip(seqs, prompts, strict=True)]
loss = trainer.forward_backward(batch)["loss"]
with torch.no_grad():
    total = weight = 0.0
    for d in batch:
        ids = torch.tensor([d.tokens], device="cuda")
        logits = trainer.model(input_ids=ids, layout=Layout(key_mask=torch.ones_like(ids))).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(d.tokens[1:], device="cuda"),
                                                reduction="none")
        w = torch.tensor(d.weights[1:], device="cuda")
        total += float((nll * w).sum())
        weight += float(w.sum())
out["packed_loss_minus_textbook"] = loss - total / weight
trainer.optim_step(1e-3)

# speed: teacher-shaped sampling, 256 prompts sharing the card, 64 new tokens, engine (bf16) vs HF generate (bf16)
bf16 = LocalEngine.for_sampling(ModelConfig(device="cuda", dtype="bfloat16"))
many = [render.prompt(questions[i % 8] + f" ({i})", system=card * 4) for i in range(256)]
params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, repetition_penalty=1.2, batch_size=128)
bf16.sample(many[:8], params)
torch.cuda.synchronize()
t = time.perf_counter()
replies = bf16.sample(many, params)
torch.cuda.synchronize()
engine_s = time.perf_counter() - t
hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
tok.padding_side = "left"
generated = 0
t = time.perf_counter()
for i in range(0, len(many), 128):
    rows = many[i:i + 128]
    width = max(map(len, rows))
    ids = torch.tensor([[render.end_of_turn] * (width - len(r)) + r for r in rows], device="cuda")
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cuda")
    g = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9,
                    repetition_penalty=1.2, pad_token_id=render.end_of_turn, eos_token_id=render.end_of_turn)
    generated += int((g[:, width:] != render.end_of_turn).sum())
torch.cuda.synchronize()
hf_s = time.perf_counter() - t
engine_tokens = sum(map(len, replies))
out["sampling_256x64_engine_tok_per_s"] = round(engine_tokens / engine_s, 1)
out["sampling_256x64_hf_generate_tok_per_s"] = round(generated / hf_s, 1)
out["sampling_speedup"] = round((engine_tokens / engine_s) / (generated / hf_s), 2)
print(json.dumps(out, indent=1))
Path(os.environ.get("OUT", "/tmp")).joinpath("gpu.json").write_text(json.dumps(out, indent=1))
