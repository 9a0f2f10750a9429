"""Export: a merged HF model folder, the PEFT adapter, and a model card with the figures.

The adapter comes through the backend that trained it (from the store, or downloaded from Tinker); the merge
and its logit-parity check run here, on the local engine, in float32."""

from __future__ import annotations

from jobs.errors import InputError
from jobs.metrics import figure_rows, markdown_table
from jobs.phases.base import PhaseConfig, open_backend, run_unit, scratch_dir
from jobs.store import UnitWriter
from jobs.trained import read_adapter, train_loss

MODEL_CARD = """---
base_model: {base}
library_name: transformers
tags: [character-distillation, lora, peft]
---
# {name}, distilled

A LoRA student of `{base}` that answers as **{name}** *without* the character card in its prompt. It was
trained on replies the same base model gave with the card as its system prompt (run `{run_id}`, profile
`{profile}`). `merged/` is the base with the adapter merged in; `adapter/` is the PEFT adapter alone.

{figures}

Measured on {eval_prompts} held-out prompts through the `{backend}` backend (`model.backend`). Prompt the
model with no system message (its chat template then adds its default system line), as in training.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>/merged")
tokenizer = AutoTokenizer.from_pretrained("<this folder>/merged")
```
"""


def model_card(config: PhaseConfig, name: str, train: dict, ev: dict) -> str:
    """README.md of the export: the train loss and evaluate's figure table, as the report shows them."""
    return MODEL_CARD.format(base=config.pipeline.model.base, name=name, run_id=config.run_id,
                             profile=config.pipeline.profile, eval_prompts=ev["eval_prompts"], backend=ev["backend"],
                             figures=markdown_table([train_loss(train), *figure_rows(ev)]))


def build(config: PhaseConfig, out: UnitWriter) -> None:
    from jobs.backends.merge import export_merged

    store, export = config.store, config.pipeline.export
    work = scratch_dir(config, "export")
    open_backend(config).adapter_files(read_adapter(store), work / "adapter")
    eval_rows = store.read_jsonl("split", "eval.jsonl")[:export.check_prompts]
    check = export_merged(config.pipeline.model, work / "adapter", work / "merged", [r["prompt"] for r in eval_rows])
    if check["logits_max_abs_diff"] > export.logits_atol:
        raise InputError(f"export: merged model's logits differ from base+adapter by {check['logits_max_abs_diff']}"
                         f" (> export.logits_atol={export.logits_atol})")
    card = store.read_json("ingest", "card.json")
    readme = model_card(config, card["name"], store.require("train")["metrics"],
                        store.read_json("evaluate", "metrics.json"))
    out.write_bytes("README.md", readme.encode())
    for folder in ("merged", "adapter"):
        for path in sorted((work / folder).iterdir()):
            out.upload_file(f"{folder}/{path.name}", path)
    out.write_json("export.json", check)
    out.metrics.update({k: v for k, v in check.items() if k != "generated"})


def main(config: PhaseConfig) -> dict:
    return run_unit(config, "export", lambda out: build(config, out))
