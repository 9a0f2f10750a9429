"""A tiny random-weight SmolLM2 for the tests of mechanics, the way TRL tests its trainers.

Engine and stand-in parity, resume, faults, skip, leases and the DAG end to end hold on any weights, so they run on
SmolLM2's config shrunk to 64 hidden, 2 layers, 4 heads (2 of keys and values), with SmolLM2's tokenizer, vocabulary
and chat template, and weights from `from_config` under a fixed seed: ~3M parameters, against the real model's 135M.
Only tests about the real model's quality run on it (marker `slow`, `make test-slow`).

A random model never ends a reply (one token in 49,152 is end-of-turn) and never ends a sentence, so the audit would
drop every reply as truncated and leave the split nothing. Two wired features of the input embedding, read by an
untied output head, give it the shape of replies and nothing more: about one token in ten is followed by a sentence
end (".", "!", "?") most of the time, and a sentence end by end-of-turn. What it says between them stays random.

The model lives in the model cache under `NAME` (`jobs.backends.model_files`: a model in the cache is used as it
is), so every engine, phase and the Tinker stand-in load it by that name, in this process and in the runner's.
It is built once per machine, atomically; change `NAME`'s version when the recipe changes.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

from jobs.backends.model_files import cache_root, model_dir

NAME = "distill-tests/tiny-smollm2-v1"
SETTING = f"model.base={NAME}"  # the setting that puts an engine or a phase on it
# what puts a whole run on it: the model; one-word replies let through (one reply in eight is a single word, so at
# the ci profile's minimum of two the audit could cut too many of its six conversations for the split's two); and
# sampling from the whole vocabulary (top_p 1): a random model's distribution is flat, and the nucleus's sort of its
# thousands of near-equal tokens turns the float noise of another batch shape (the Tinker stand-in's) into another
# token, where a draw in vocabulary order changes only if it lands within that noise of a boundary
SETTINGS = (SETTING, "audit.min_reply_words=1", "teacher.top_p=1.0", "conversations.visitor.top_p=1.0",
            "evaluate.sampling.top_p=1.0")
ARGS = tuple(arg for setting in SETTINGS for arg in ("--set", setting))  # the same, as command-line options
REAL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}
SEED = 0
ENDS = (".", "!", "?")
BEFORE_END_SHARE = 0.1  # of the vocabulary: tokens after which a sentence end is likely
FEATURE, GAIN = 0.1, 3.0  # a wired feature's value in the embedding, and its weight in the head


def folder() -> Path:
    return cache_root() / "models" / NAME.replace("/", "--")


def build(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = model_dir(REAL)
    config = AutoConfig.from_pretrained(source)
    config.update(SHAPE)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    generator = torch.Generator().manual_seed(SEED)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    eos, ends = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(list(ENDS))
    with torch.no_grad():
        # end-of-turn is also the pad token, whose embedding row from_config leaves at zero
        embedding[eos] = torch.randn(embedding.shape[1], generator=generator) * config.initializer_range
        before_end = torch.rand(embedding.shape[0], generator=generator) < BEFORE_END_SHARE
        before_end[[*ends, *tokenizer.all_special_ids, *tokenizer.encode("\n")]] = False  # "\n" opens every reply
        # feature 0: "a sentence end may follow", feature 1: "this is a sentence end"; the residual stream carries
        # them to the head, which turns them into a sentence end's and end-of-turn's logits (~13 against ~0)
        embedding[:, 0], embedding[:, 1] = FEATURE * before_end, 0.0
        embedding[ends, 1] = FEATURE
        head[:, :2] = 0.0
        head[ends, 0] = GAIN
        head[eos, 1] = GAIN
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def tiny_model() -> Path:
    """The tiny model's folder in the model cache, built first if it is not there."""
    target = folder()
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # test sessions side by side build it once
            if not (target / "config.json").exists():
                build(target)
    return target
