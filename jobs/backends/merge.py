"""The export's merge: the adapter folded into the base weights as a plain HF folder, checked against the engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from jobs.backends.local import LocalEngine

if TYPE_CHECKING:  # types only: jobs.config imports the backend registry, whose local backend imports the engine
    from jobs.config import ModelConfig


def export_merged(model: ModelConfig, adapter_dir: Path, target: Path, check_texts: list[str]) -> dict:
    """Merge the adapter into the base, save an HF folder, and compare it with base + adapter.

    The check loads the saved folder the way a user would (`AutoModelForCausalLM.from_pretrained`, its default
    attention) and compares its next-token logits with the engine's unmerged model on the given prompts, then
    generates. Both are float32: merging in bf16 moves logits by more than one unit, which would hide a real
    mistake.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = model.model_copy(update={"dtype": "float32"})
    unmerged = LocalEngine.for_sampling(model, adapter_dir, merge=False)
    base, _ = LocalEngine._load_base(model, unmerged.precision)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(target)
    unmerged.tokenizer.save_pretrained(target)
    check_prompts = [unmerged.renderer.prompt(text) for text in check_texts]
    # transformers wraps `to` in functools.wraps(torch.nn.Module.to), whose type still expects `self` first
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    reloaded = reloaded.to(unmerged.device).eval()  # type: ignore[arg-type]
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for prompt in check_prompts:
            a = unmerged.logits(prompt)
            b = reloaded(input_ids=unmerged._tensor([prompt])).logits[0].float()
            max_diff = max(max_diff, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
        sample = reloaded.generate(input_ids=unmerged._tensor([check_prompts[0]]), max_new_tokens=24, do_sample=False,
                                   pad_token_id=unmerged.pad_id, eos_token_id=unmerged.renderer.end_of_turn)
    return {"logits_max_abs_diff": round(max_diff, 5), "argmax_agreement": round(agree / total, 5),
            "positions_checked": total,
            "generated": unmerged.renderer.decode(sample[0, len(check_prompts[0]):].tolist())}
