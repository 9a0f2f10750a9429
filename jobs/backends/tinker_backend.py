"""The Tinker backend: teacher sampling, log-probabilities and LoRA training on the Tinker API (`tinker` SDK).

- Sampling and log-probabilities go out as one request per prompt, up to `tinker.max_in_flight` at once; a
  prompt's seed is `params.seed + its index`, as on the local engine, so replies do not depend on concurrency.
  Tinker's sampler has no repetition penalty (`TinkerBackend.check` refuses one in the config).
- The service returns each sampled token's log-probability. Where that is the model's own distribution whatever
  convention the service scores in (temperature 1, top_p 1: the on-policy objective's rollouts), `sample` asks for
  the prompt's log-probabilities too and keeps both for the sequences of its last call, so `compute_logprobs` of
  exactly those sequences (prompt + reply, end token included) is answered from them with no second request;
  anything else is scored by a `compute_logprobs` request as before.
- Top-k and target log-probabilities (distillation's teacher and student scores) are one prefill request per
  sequence (`sample` with max_tokens=1, the sampled token ignored): `topk_prompt_logprobs` over the last
  `prompt_logprobs_last_n` positions, or `target_prompt_logprobs` sent as sparse CSR of the cells asked.
- Training submits `forward_backward` and `optim_step` back to back and only then waits (the second request
  queues behind the first on the service instead of waiting for a round trip). Tinker's losses are weighted
  *sums*; each weight is divided by the batch's total weight, so the loss and its gradients are the weighted
  mean the local engine computes, and one learning rate means the same on both. Hard targets are
  `cross_entropy` with 1-D targets; soft targets (`Datum.candidates`) are `cross_entropy` with 2-D (N, K)
  targets and weights (probability times weight); `importance_sampling` has no weights, so the advantages
  carry them.
- A trainer's `sampler()` samples from its current weights (`save_weights_and_get_sampling_client`).
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
from typing import TYPE_CHECKING, Any, Protocol

from jobs.backends.base import ADAPTER_FILES, Adapter, Backend, Datum, LossFn, SamplingParams, TopK
from jobs.backends.model_files import tokenizer_dir
from jobs.backends.renderer import Renderer
from jobs.errors import InputError, TransientError
from jobs.store import ArtifactStore

if TYPE_CHECKING:  # jobs.config validates with the registry of backends, so it is imported for types only
    from jobs.config import ModelConfig, PipelineConfig, TinkerConfig, TrainConfig

KEY_ENV = "TINKER_API_KEY"
KEY_PREFIX = "tml-"
# Tinker's LoRA scale, which it fixes (a profile chooses it on the local engine)
LORA_ALPHA = 32
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


def _unit_weight(weight: float, total: float):
    """weight / total as the local engine's mean reaches each position in its backward pass: float32 (1 / total)
    times the weight, to be multiplied by the position's probability or advantage. Tinker's losses are sums, so
    the stand-in then computes the local engine's gradients bit for bit, and a real service within rounding."""
    import numpy as np

    return (np.float32(1.0) / np.float32(total)) * np.float32(weight)


def _matrix(values):
    """A 2-D numpy array as TensorData: sparse CSR (its zero cells left out) where that is smaller, as the SDK's
    own `TensorData.from_torch_sparse` decides, else dense."""
    import numpy as np
    import tinker

    rows, columns = np.nonzero(values)
    if values.shape[0] + 1 + 2 * len(rows) >= values.size:
        return tinker.TensorData.from_numpy(values)
    return tinker.TensorData(data=values[rows, columns], dtype="int64" if values.dtype.kind == "i" else "float32",
                             shape=list(values.shape), sparse_crow_indices=np.concatenate(
                                 [[0], np.cumsum(np.bincount(rows, minlength=values.shape[0]))]).tolist(),
                             sparse_col_indices=columns.tolist())


def sampled_logprobs(prompt: list[int], response) -> tuple[tuple[int, ...], list[float]] | None:
    """(prompt + sampled tokens, log p of each token after the first) from a response to a sample request made with
    prompt log-probabilities, or None where the service left any of them out."""
    sequence = response.sequences[0]
    scored = list(response.prompt_logprobs or [])[1:] + list(sequence.logprobs or [])
    tokens = prompt + list(sequence.tokens)
    if len(scored) != len(tokens) - 1 or any(x is None for x in scored):
        return None
    return tuple(tokens), [float(x) for x in scored]


class TinkerSampler:
    def __init__(self, client, renderer: Renderer, cap: int):
        self.client, self.renderer, self.cap = client, renderer, cap
        self.sampled: dict[tuple[int, ...], list[float]] = {}  # the last `sample` call's scored sequences

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        import tinker

        end = self.renderer.end_of_turn
        own = params.temperature == 1.0 and params.top_p == 1.0  # the sampled log-probabilities are the model's

        def submit(i: int):
            settings = tinker.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                             top_p=params.top_p, seed=params.seed + i, stop=[end])
            return self.client.sample(prompt=_model_input(prompts[i]), num_samples=1, sampling_params=settings,
                                      include_prompt_logprobs=own)

        responses = in_flight(submit, len(prompts), self.cap, on_batch)
        self.sampled = dict(filter(None, (sampled_logprobs(prompt, response)
                                          for prompt, response in zip(prompts, responses, strict=True)))) if own else {}
        replies = [list(r.sequences[0].tokens) for r in responses]
        return [reply[:-1] if reply and reply[-1] == end else reply for reply in replies]

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        asked = [i for i, sequence in enumerate(sequences) if tuple(sequence) not in self.sampled]
        rows = in_flight(lambda n: self.client.compute_logprobs(_model_input(sequences[asked[n]])), len(asked),
                         self.cap)
        found = dict(zip(asked, rows, strict=True))
        # the first token has no log-probability
        return [[float(x) for x in found[i][1:]] if i in found else list(self.sampled[tuple(sequence)])
                for i, sequence in enumerate(sequences)]

    def _score(self, sequences: list[list[int]], asks: list[bool], request: Callable[[int], dict]) -> list:
        """One prefill request (max_tokens=1, the sampled token ignored) per sequence that `asks`, with the
        extra arguments `request(i)`; None for the others."""
        import tinker

        wanted = [i for i, ask in enumerate(asks) if ask]

        def submit(n: int):
            i = wanted[n]
            return self.client.sample(prompt=_model_input(sequences[i]), num_samples=1,
                                      sampling_params=tinker.SamplingParams(max_tokens=1), **request(i))

        found: list = [None] * len(sequences)
        for i, response in zip(wanted, in_flight(submit, len(wanted), self.cap), strict=True):
            found[i] = response
        return found

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        if any(not 1 <= start <= len(seq) for seq, start in zip(sequences, starts, strict=True)):
            raise ValueError("each start must be between 1 and its sequence's length")
        # the prompt's top-k rows are its positions (row 0, the first token, has none); only the last
        # len - start are asked for, and a sequence with none to score sends no request
        responses = self._score(sequences, [start < len(seq) for seq, start in zip(sequences, starts, strict=True)],
                                lambda i: {"include_prompt_logprobs": True, "topk_prompt_logprobs": k,
                                           "prompt_logprobs_last_n": len(sequences[i]) - starts[i]})
        found = []
        for start, response in zip(starts, responses, strict=True):
            rows = [] if response is None else response.topk_prompt_logprobs
            if rows is None or any(row is None for row in rows[start:]):
                raise RuntimeError("the Tinker API left out top-k log-probabilities it was asked for")
            rows = rows[start:]
            found.append(TopK(start, [[int(t) for t, _ in row] for row in rows],
                              [[float(lp) for _, lp in row] for row in rows]))
        return found

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        import numpy as np
        import tinker

        for sequence, target in zip(sequences, targets, strict=True):
            if target.start < 1 or target.start + len(target.ids) > len(sequence):
                raise ValueError(f"targets for positions {target.start}..{target.start + len(target.ids) - 1} of a "
                                 f"sequence of {len(sequence)} tokens")

        def request(i: int) -> dict:
            # target_prompt_logprobs: row r is position r + 1, K columns, -1 where nothing is asked; sent as
            # sparse CSR of the cells that ask (the rows before targets[i].start ask nothing)
            target, rows = targets[i], len(sequences[i]) - 1
            counts = [0] * (target.start - 1) + [len(ids) for ids in target.ids]
            counts += [0] * (rows - len(counts))
            return {"target_prompt_logprobs": tinker.TensorData(
                data=np.asarray([t for ids in target.ids for t in ids], dtype=np.int64), dtype="int64",
                shape=[rows, max(counts)], sparse_crow_indices=np.cumsum([0] + counts).tolist(),
                sparse_col_indices=[j for ids in target.ids for j in range(len(ids))])}

        responses = self._score(sequences, [any(t.ids) for t in targets], request)
        found: list[list[list[float]]] = []
        for target, response in zip(targets, responses, strict=True):
            if response is None:
                found.append([[] for _ in target.ids])
                continue
            answer = response.target_prompt_logprobs
            if answer is None:
                raise RuntimeError("the Tinker API left out the target log-probabilities it was asked for")
            values = answer.data  # the request's own CSR layout: its cells, row by row
            if answer.sparse_crow_indices is None:  # dense [rows, K]: the cells that asked
                width = answer.shape[1]
                values = [values[(target.start - 1 + r) * width + j] for r, ids in enumerate(target.ids)
                          for j in range(len(ids))]
            rows, offset = [], 0
            for ids in target.ids:
                rows.append([float(x) for x in values[offset:offset + len(ids)]])
                offset += len(ids)
            found.append(rows)
        return found


class TinkerTrainer:
    def __init__(self, client, renderer: Renderer, cap: int = 64):
        self.client, self.renderer, self.cap = client, renderer, cap

    @staticmethod
    def _data(batch: list[Datum], scale: float):
        import tinker

        # the SDK types loss_fn_inputs as TensorData only, but Datum converts plain lists itself (__post_init__)
        return [tinker.Datum(model_input=_model_input(d.tokens[:-1]),
                             loss_fn_inputs={"target_tokens": d.tokens[1:],  # type: ignore[dict-item]
                                             "weights": [w * scale for w in d.weights[1:]]})  # type: ignore[dict-item]
                for d in batch]

    @staticmethod
    def _soft_data(batch: list[Datum], total: float):
        """Soft targets as Tinker's cross_entropy over 2-D (N, K) target_tokens and weights: cell (i, j) is
        candidate j of the token at i + 1, weighted by its probability times the position's weight over `total`;
        rows are padded to the batch's widest with weight 0, and positions without weight carry none (as the local
        engine). The products are float32 in the order the local engine's backward pass takes them
        (`_unit_weight`)."""
        import numpy as np
        import tinker

        width = max([len(ids) for d in batch for w, ids in zip(d.weights[1:], (d.candidates or [])[1:], strict=True)
                     if w > 0] or [1])
        data = []
        for d in batch:
            targets = np.zeros((len(d.tokens) - 1, width), dtype=np.int64)
            weights = np.zeros((len(d.tokens) - 1, width), dtype=np.float32)
            for i, (w, ids, probs) in enumerate(zip(d.weights[1:], (d.candidates or [])[1:], (d.probs or [])[1:],
                                                    strict=True)):
                if w > 0:
                    targets[i, :len(ids)] = ids
                    weights[i, :len(probs)] = _unit_weight(w, total) * np.asarray(probs, dtype=np.float32)
            data.append(tinker.Datum(model_input=_model_input(d.tokens[:-1]),
                                     loss_fn_inputs={"target_tokens": _matrix(targets), "weights": _matrix(weights)}))
        return data

    @staticmethod
    def _importance_sampling_data(batch: list[Datum], total: float):
        """Tinker's importance_sampling inputs; it has no weights, so each advantage carries its position's weight
        over `total` (float32, as `_soft_data`), and positions without weight get advantage 0 and sampled
        log-probability 0 (a ratio of at most 1: never 0 * inf)."""
        import numpy as np
        import tinker

        data = []
        for d in batch:
            if d.sampled_logprobs is None or d.advantages is None:
                raise ValueError("importance_sampling needs each Datum's sampled_logprobs and advantages")
            weighted = [(w > 0, s, _unit_weight(w, total) * np.float32(a)) for w, s, a in
                        zip(d.weights[1:], d.sampled_logprobs[1:], d.advantages[1:], strict=True)]
            data.append(tinker.Datum(model_input=_model_input(d.tokens[:-1]), loss_fn_inputs={
                "target_tokens": tinker.TensorData.from_numpy(np.asarray(d.tokens[1:], dtype=np.int64)),
                "logprobs": tinker.TensorData.from_numpy(
                    np.asarray([s if on else 0.0 for on, s, _ in weighted], dtype=np.float32)),
                "advantages": tinker.TensorData.from_numpy(
                    np.asarray([a if on else 0.0 for on, _, a in weighted], dtype=np.float32))}))
        return data

    def forward_backward(self, batch: list[Datum], loss_fn: LossFn = "cross_entropy") -> Mapped:
        total = max(sum(sum(d.weights[1:]) for d in batch), 1.0)
        if loss_fn == "importance_sampling":
            data = self._importance_sampling_data(batch, total)
        elif batch[0].candidates is not None:
            data = self._soft_data(batch, total)
        else:
            data = self._data(batch, 1.0 / total)
        future = self.client.forward_backward(data, loss_fn)
        return Mapped(future, lambda out: {"loss": float(out.metrics["loss:sum"]), "tokens": total})

    def optim_step(self, learning_rate: float):
        import tinker

        return self.client.optim_step(tinker.AdamParams(learning_rate=learning_rate, **ADAM))

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        batch = [Datum(tokens, [1.0] * len(tokens)) for tokens in sequences]
        out = self.client.forward(self._data(batch, 1.0), "cross_entropy").result()
        return [[float(x) for x in row["logprobs"].tolist()] for row in out.loss_fn_outputs]

    def sampler(self) -> TinkerSampler:
        """The current weights saved for sampling (an ephemeral snapshot on the service) and a client over them."""
        return TinkerSampler(self.client.save_weights_and_get_sampling_client().result(), self.renderer, self.cap)

    def save_state(self, name: str) -> str:
        return self.client.save_state(name).result().path

    def save_adapter(self, name: str) -> Adapter:
        sampling = self.client.save_weights_for_sampler(name)
        download = self.client.save_weights_external(name)
        return Adapter(sampling=sampling.result().path, download=download.result().path)


class TinkerBackend(Backend):
    name = "tinker"
    settings = ("tinker",)
    billed = True

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        """What Tinker fixes that the local engine lets a profile choose."""
        for name, section in (("teacher", pipeline.teacher), ("conversations.visitor", pipeline.conversations.visitor),
                              ("evaluate.sampling", pipeline.evaluate.sampling)):
            if section.repetition_penalty != 1.0:
                raise ValueError(f"{name}.repetition_penalty must be 1.0 with model.backend=tinker "
                                 "(Tinker's sampler has no repetition penalty)")
        if pipeline.train.lora_alpha != LORA_ALPHA:
            raise ValueError(f"train.lora_alpha must be {LORA_ALPHA} with model.backend=tinker "
                             "(Tinker's fixed LoRA scale)")

    @classmethod
    def check_credentials(cls) -> None:
        check_api_key()

    @classmethod
    def open(cls, pipeline: PipelineConfig, store: ArtifactStore, scratch: Path) -> TinkerBackend:
        return cls(pipeline.model, pipeline.tinker)

    @classmethod
    def preflight(cls, pipeline: PipelineConfig) -> Path:
        cls(pipeline.model, pipeline.tinker)  # the key is accepted, the service answers, the tokenizer is at hand
        return tokenizer_dir(pipeline.model.base)

    def __init__(self, model: ModelConfig, settings: TinkerConfig):
        check_api_key()
        import tinker

        self.model, self.tinker = model, settings
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
        return TinkerSampler(client.result(), self.renderer, self.tinker.max_in_flight)

    def trainer(self, train: TrainConfig, resume_from: str | None = None) -> TinkerTrainer:
        if resume_from:
            client = self.service.create_training_client_from_state_with_optimizer(resume_from)
        else:
            client = self.service.create_lora_training_client(base_model=self.model.base, rank=train.lora_rank,
                                                              seed=train.seed)
        return TinkerTrainer(client.result(), self.renderer, self.tinker.max_in_flight)

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
