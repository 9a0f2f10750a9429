"""The base models the stand-in serves and the local engines it loads for them.

A base model is a name a client passes (`create_lora_training_client(base_model=...)`): the project's own models
(`jobs.backends.model_files`: SmolLM2 from its PyPI package, or anything already in the model cache), or a local
HF causal-LM folder given with `--model [NAME=]DIR` (served as NAME, by default the folder's absolute path). Such a
folder is linked into the model cache under NAME (`model_files`' rule: a model in the cache is used as it is), so
that every engine loads it the same way. Nothing is ever downloaded here: a name that is in none of these is
refused with a 400.

Every engine carries a forward pre-hook that raises `Cancelled` when `should_stop()` says so: the engines run one
forward pass per decoded token, so sampling stops within a token of its clients going away or of SIGTERM.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.backends import model_files
from jobs.backends.cache import cached_model_dir
from jobs.backends.tinker_backend import LORA_ALPHA  # the hosted service's fixed alpha, declared once
from jobs.config import ModelConfig, TrainConfig
from workflows.local.tinker.common import Cancelled, UserError, log

SAMPLER_CACHE = 4  # sampling engines kept loaded


def parse_model_arg(value: str) -> tuple[str, Path]:
    """`--model [NAME=]DIR` as (name, folder); the folder must hold a transformers causal LM."""
    name, _, folder = value.rpartition("=") if "=" in value else ("", "", value)
    path = Path(folder).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {value}: {path} has no config.json (a Hugging Face model folder is needed)")
    config = json.loads((path / "config.json").read_text())
    if not any(arch.endswith("ForCausalLM") for arch in config.get("architectures") or []):
        raise ValueError(f"--model {value}: {path} is not a causal LM (architectures: {config.get('architectures')})")
    return name or str(path), path


def link_local_model(name: str, folder: Path) -> None:
    """Make `name` resolve to `folder` through the model cache (a symlink there, replaced if it pointed elsewhere;
    a real folder of that name is never touched)."""
    entry = cached_model_dir(name)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.is_symlink():
        if entry.resolve() == folder:
            return
        entry.unlink()
    elif entry.exists():
        raise ValueError(f"--model {name}={folder}: the model cache already holds a different {name} at {entry}")
    entry.symlink_to(folder, target_is_directory=True)


class Engines:
    def __init__(self, dtype: str, should_stop: Callable[[], bool], local_models: dict[str, Path] | None = None):
        self.dtype, self.should_stop = dtype, should_stop
        self.local_models = dict(local_models or {})
        for name, folder in self.local_models.items():
            link_local_model(name, folder)
        self.samplers: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._checked: set[str] = set()

    def names(self) -> list[str]:
        return sorted({*model_files.PACKAGED_GGUF, *self.local_models})

    def folder(self, base: str) -> Path:
        """The local folder of `base`, or a UserError (never a download)."""
        if base in self.local_models:
            return self.local_models[base]
        cached = cached_model_dir(base)
        if not (cached / "config.json").exists() and base not in model_files.PACKAGED_GGUF:
            raise UserError(f"base model {base!r} is not served here: this stand-in serves "
                            f"{', '.join(self.names())} and the models in {cached.parent} "
                            f"(start it with --model NAME=DIR to serve a local folder)")
        try:
            return model_files.model_dir(base)
        except Exception as error:
            raise UserError(f"base model {base!r} is not available offline: {error}") from error

    def check(self, base: str) -> None:
        if base not in self._checked:
            self.folder(base)
            self._checked.add(base)

    def _config(self, base: str) -> ModelConfig:
        self.check(base)
        return ModelConfig(base=base, dtype=self.dtype, device="cpu")

    def _hooked(self, engine):
        def stop_here(_module, _args):
            if self.should_stop():
                raise Cancelled("stopped between two forward passes")

        engine.model.register_forward_pre_hook(stop_here)
        return engine

    def trainer(self, base: str, rank: int, seed: int):
        from jobs.backends.local import LocalEngine

        return self._hooked(LocalEngine.for_training(self._config(base), TrainConfig(lora_rank=rank,
                                                                                      lora_alpha=LORA_ALPHA,
                                                                                      seed=seed)))

    def sampler(self, key: tuple[str, str | None]):
        """The engine for (base model, adapter folder or None), kept among the last SAMPLER_CACHE used."""
        from jobs.backends.local import LocalEngine

        if key in self.samplers:
            self.samplers.move_to_end(key)
            return self.samplers[key]
        base, adapter = key
        engine = self._hooked(LocalEngine.for_sampling(self._config(base), Path(adapter) if adapter else None))
        self.samplers[key] = engine
        while len(self.samplers) > SAMPLER_CACHE:
            self.samplers.popitem(last=False)
        log().info("sampling engine loaded", base_model=base, adapter=adapter)
        return engine
