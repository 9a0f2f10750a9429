"""The Tinker backend: teacher sampling, log-probabilities and LoRA training on the Tinker API (`tinker` SDK).

- Sampling and log-probabilities go out as one request per prompt, up to `tinker.max_in_flight` at once; a
  prompt's seed is `params.seed + its index`, as on the local engine, so replies do not depend on concurrency.
  Tinker's sampler has no repetition penalty (the config refuses one).
- Training submits `forward_backward` and `optim_step` back to back and only then waits (the second request
  queues behind the first on the service instead of waiting for a round trip). Tinker's `cross_entropy` is
  the weighted *sum* of token NLLs; each weight is divided by the batch's total weight, so the loss and its
  gradients are the weighted mean the local engine computes, and one learning rate means the same on both.
- Saved states are `tinker://` paths; a restarted train phase resumes with the optimizer state
  (`create_training_client_from_state_with_optimizer`). The adapter for export is downloaded through the
  external-weights URLs the service signs.
- The chat template is the base model's own (its tokenizer, fetched without the weights).

The API key is read from $TINKER_API_KEY by the SDK and checked here for presence and form only; it is never
logged or written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any, Protocol

from jobs.backends.base import ADAPTER_FILES, Adapter, Datum, SamplingParams
from jobs.backends.renderer import Renderer
from jobs.config import ModelConfig, TinkerConfig, TrainConfig
from jobs.errors import InputError, TransientError

KEY_ENV = "TINKER_API_KEY"
KEY_PREFIX = "tml-"
# the local engine's AdamW, so that one train config means the same on both backends
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "grad_clip_norm": 0.0}


def check_api_key() -> None:
    """One line, before any work, when the key is missing or not a Tinker key (its value is never shown)."""
    key = os.environ.get(KEY_ENV, "")
    if not key.strip():
        raise InputError(f"model.backend=tinker needs ${KEY_ENV} (a Tinker API key, {KEY_PREFIX}...); it is not set")
    if not key.startswith(KEY_PREFIX) or len(key) <= len(KEY_PREFIX) or any(c.isspace() for c in key):
        raise InputError(f"${KEY_ENV} is malformed: a Tinker API key starts with {KEY_PREFIX!r} and has no spaces")


class APIFuture(Protocol):
    """A request the Tinker SDK has submitted (its APIFuture): `future()` is the concurrent.futures view of it."""

    def future(self) -> Future[Any]: ...


def in_flight(submit: Callable[[int], APIFuture], count: int, cap: int,
              on_done: Callable[[int], None] | None = None) -> list:
    """`submit(i).result()` for i in range(count), with at most `cap` requests outstanding."""
    results: list = [None] * count
    pending: dict[Future[Any], int] = {}
    next_index = 0
    while next_index < count or pending:
        while next_index < count and len(pending) < cap:
            pending[submit(next_index).future()] = next_index
            next_index += 1
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in done:
            results[pending.pop(future)] = future.result()
            if on_done:
                on_done(1)
    return results


class Mapped:
    """A Tinker future whose result is passed through `convert`."""

    def __init__(self, future, convert: Callable):
        self.future, self.convert = future, convert

    def result(self):
        return self.convert(self.future.result())


def _model_input(tokens: list[int]):
    import tinker

    return tinker.ModelInput.from_ints(tokens)


class TinkerSampler:
    def __init__(self, client, renderer: Renderer, cap: int):
        self.client, self.renderer, self.cap = client, renderer, cap

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        import tinker

        end = self.renderer.end_of_turn

        def submit(i: int):
            settings = tinker.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                             top_p=params.top_p, seed=params.seed + i, stop=[end])
            return self.client.sample(prompt=_model_input(prompts[i]), num_samples=1, sampling_params=settings)

        responses = in_flight(submit, len(prompts), self.cap, on_batch)
        replies = [list(r.sequences[0].tokens) for r in responses]
        return [reply[:-1] if reply and reply[-1] == end else reply for reply in replies]

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        rows = in_flight(lambda i: self.client.compute_logprobs(_model_input(sequences[i])), len(sequences), self.cap)
        return [[float(x) for x in row[1:]] for row in rows]  # the first token has no log-probability


class TinkerTrainer:
    def __init__(self, client, renderer: Renderer):
        self.client, self.renderer = client, renderer

    @staticmethod
    def _data(batch: list[Datum], scale: float):
        import tinker

        # the SDK types loss_fn_inputs as TensorData only, but Datum converts plain lists itself (__post_init__)
        return [tinker.Datum(model_input=_model_input(d.tokens[:-1]),
                             loss_fn_inputs={"target_tokens": d.tokens[1:],  # type: ignore[dict-item]
                                             "weights": [w * scale for w in d.weights[1:]]})  # type: ignore[dict-item]
                for d in batch]

    def forward_backward(self, batch: list[Datum]) -> Mapped:
        total = max(sum(sum(d.weights[1:]) for d in batch), 1.0)
        future = self.client.forward_backward(self._data(batch, 1.0 / total), "cross_entropy")
        return Mapped(future, lambda out: {"loss": float(out.metrics["loss:sum"]), "tokens": total})

    def optim_step(self, learning_rate: float):
        import tinker

        return self.client.optim_step(tinker.AdamParams(learning_rate=learning_rate, **ADAM))

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        batch = [Datum(tokens, [1.0] * len(tokens)) for tokens in sequences]
        out = self.client.forward(self._data(batch, 1.0), "cross_entropy").result()
        return [[float(x) for x in row["logprobs"].tolist()] for row in out.loss_fn_outputs]

    def save_state(self, name: str) -> str:
        return self.client.save_state(name).result().path

    def save_adapter(self, name: str) -> Adapter:
        sampling = self.client.save_weights_for_sampler(name)
        download = self.client.save_weights_external(name)
        return Adapter(sampling=sampling.result().path, download=download.result().path)


class TinkerBackend:
    name = "tinker"

    def __init__(self, model: ModelConfig, settings: TinkerConfig):
        check_api_key()
        import tinker

        from jobs.backends.model_files import tokenizer_dir

        self.model, self.settings = model, settings
        # resolved here and passed on: the SDK caches its REST connections by the arguments it is given
        self.base_url = settings.base_url or os.environ.get("TINKER_BASE_URL") or None
        try:
            self.service = tinker.ServiceClient(base_url=self.base_url)
        except tinker.AuthenticationError:
            raise InputError(f"${KEY_ENV} was refused by the Tinker API") from None
        except tinker.APIConnectionError as exc:
            raise TransientError(f"the Tinker API did not answer ({str(exc).splitlines()[0]})") from None
        from transformers import AutoTokenizer

        self.renderer = Renderer(AutoTokenizer.from_pretrained(tokenizer_dir(model.base)))

    def precision(self) -> dict[str, str]:
        return {"device": "tinker", "dtype": "tinker"}  # the service decides; it does not say

    def sampler(self, adapter: str | None = None) -> TinkerSampler:
        client = (self.service.create_sampling_client(model_path=adapter) if adapter
                  else self.service.create_sampling_client(base_model=self.model.base))
        return TinkerSampler(client.result(), self.renderer, self.settings.max_in_flight)

    def trainer(self, train: TrainConfig, resume_from: str | None = None) -> TinkerTrainer:
        if resume_from:
            client = self.service.create_training_client_from_state_with_optimizer(resume_from)
        else:
            client = self.service.create_lora_training_client(base_model=self.model.base, rank=train.lora_rank,
                                                              seed=train.seed)
        return TinkerTrainer(client.result(), self.renderer)

    def adapter_files(self, adapter: Adapter, folder: Path) -> Path:
        import httpx
        import tinker

        rest = tinker.RestClient(base_url=self.base_url, api_key=os.environ[KEY_ENV])
        urls = rest.get_external_weights_urls(adapter.download).result().urls
        missing = [name for name in ADAPTER_FILES if name not in urls]
        if missing:
            raise RuntimeError(f"{adapter.download}: the exported weights lack {', '.join(missing)}")
        folder.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            response = httpx.get(urls[name], timeout=300, follow_redirects=True)
            response.raise_for_status()
            (folder / name).write_bytes(response.content)
        return folder
