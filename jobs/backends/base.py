"""The backend interface, shaped like Tinker's primitives: phases see only these types.

Tinker's SamplingClient has `sample` and `compute_logprobs`; its TrainingClient has `forward_backward`,
`optim_step` (both futures) and `save_state`, which returns a location (`tinker://...`); the local engine
computes at once (`Done`) and keeps its saved states in the run's store. Tokens are plain lists of ints here
(Tinker's ModelInput).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, Protocol, TypeVar

from jobs.backends.renderer import Renderer

if TYPE_CHECKING:  # jobs.config validates with the registry of backends, so it is imported for types only
    from jobs.config import PipelineConfig, SamplingConfig, TrainConfig
    from jobs.store import ArtifactStore

T = TypeVar("T", covariant=True)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 16
    # a local engine that keeps keys and values between calls may reuse them (a conversation's history); False
    # where the reuse would change what is measured (latency)
    reuse_kv: bool = True

    @classmethod
    def from_config(cls, section: SamplingConfig, batch_size: int | None = None) -> SamplingParams:
        return cls(max_tokens=section.max_new_tokens, temperature=section.temperature, top_p=section.top_p,
                   repetition_penalty=section.repetition_penalty, seed=section.seed,
                   batch_size=batch_size or section.batch_size)


LossFn = Literal["cross_entropy", "importance_sampling"]


@dataclass(frozen=True)
class Datum:
    """One training sequence; `weights[i]` scales the loss at position i, predicting `tokens[i]` (0 on prompt
    tokens: no loss there). What the loss is at a position depends on the loss function and the fields given:

    - cross_entropy, `candidates` None: -log p(tokens[i]) (SFT);
    - cross_entropy with `candidates` (logit distillation): -sum_j probs[i][j] * log p(candidates[i][j]), the
      cross-entropy to a target distribution over a few tokens (the teacher's top-k); rows with weight 0 may be
      empty;
    - importance_sampling (on-policy): -exp(log p(tokens[i]) - sampled_logprobs[i]) * advantages[i], as Tinker's
      importance_sampling loss; its gradient is the policy gradient of the advantages."""

    tokens: list[int]
    weights: list[float]
    candidates: list[list[int]] | None = None
    probs: list[list[float]] | None = None
    sampled_logprobs: list[float] | None = None
    advantages: list[float] | None = None


@dataclass(frozen=True)
class TopK:
    """A model's k most likely next tokens at each scored position of one sequence, and their log-probabilities:
    row j is the position `start + j`, the distribution of the token there given those before it."""

    start: int
    ids: list[list[int]]
    logprobs: list[list[float]]


class Pending(Protocol[T]):
    """A result that may still be on its way (Tinker's futures); `result()` waits for it."""

    def result(self) -> T: ...


@dataclass(frozen=True)
class Done(Generic[T]):
    """A result computed already: what the local engine returns where Tinker returns a future."""

    value: T

    def result(self) -> T:
        return self.value


# a PEFT adapter folder: its weights, and the config that says which base and LoRA shape they fit
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")


@dataclass(frozen=True)
class Adapter:
    """Where a trained adapter lives: `sampling` opens a student (`Backend.sampler`), `download` fetches the
    PEFT files for export (`Backend.adapter_files`). The local engine keeps both in one store folder."""

    sampling: str
    download: str


class SamplingClient(Protocol):
    renderer: Renderer

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        """Completion tokens (end-of-turn token stripped) for each prompt, in order. Prompt i samples with
        seed `params.seed + i`, so a prompt's reply does not depend on the other prompts of the call."""

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(tokens[i] | tokens[:i]) for i >= 1 of each sequence."""

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        """The k most likely tokens at every position from `starts[i]` to the end of sequence i (Tinker's
        topk_prompt_logprobs over the sequence's last tokens)."""

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        """log p of the given tokens (`targets[i].ids`, e.g. another model's top-k) at the positions they are for,
        in the same shape (Tinker's target_prompt_logprobs)."""


class Metered:
    """A sampling client that counts the tokens it sends and receives, as Tinker bills them (prefill,
    sample); the counts go to the phase's metrics and the report prices them."""

    def __init__(self, client: SamplingClient):
        self.client, self.renderer = client, client.renderer
        self.usage = {"prefill_tokens": 0, "sample_tokens": 0}

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        before = self._computed()
        replies = self.client.sample(prompts, params, on_batch=on_batch)
        self.usage["prefill_tokens"] += sum(map(len, prompts))
        if before is not None:  # the local engine: what it ran through the model, the rest shared or kept
            self.usage["computed_prefill_tokens"] = (self.usage.get("computed_prefill_tokens", 0)
                                                     + (self._computed() or 0) - before)
        self.usage["sample_tokens"] += sum(map(len, replies))
        return replies

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        self.usage["prefill_tokens"] += sum(map(len, sequences))
        return self.client.compute_logprobs(sequences)

    def _computed(self) -> int | None:
        return getattr(self.client, "computed_prefill_tokens", None)

    def topk_logprobs(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopK]:
        self.usage["prefill_tokens"] += sum(map(len, sequences))
        return self.client.topk_logprobs(sequences, starts, k)

    def target_logprobs(self, sequences: list[list[int]], targets: list[TopK]) -> list[list[list[float]]]:
        self.usage["prefill_tokens"] += sum(map(len, sequences))
        return self.client.target_logprobs(sequences, targets)


class TrainingClient(Protocol):
    renderer: Renderer

    def forward_backward(self, batch: list[Datum], loss_fn: LossFn = "cross_entropy") -> Pending[dict[str, float]]:
        """Accumulates gradients of the batch's loss (`Datum`), averaged over its total weight; its result is
        {'loss', 'tokens' (the total weight)}. Submitting `optim_step` before waiting on this result is allowed
        (and is how Tinker's latency is hidden)."""

    def optim_step(self, learning_rate: float) -> Pending[None]:
        """One AdamW step on the LoRA parameters (betas 0.9/0.999, eps 1e-8, no weight decay or clipping),
        then clears gradients."""

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """As SamplingClient's, with the current weights; used for validation loss."""

    def sampler(self) -> SamplingClient:
        """A sampling client with the current weights (on-policy training samples from it)."""

    def save_state(self, name: str) -> str:
        """Adapter, optimizer and RNG state, enough to resume; returns its location for `Backend.trainer`."""

    def save_adapter(self, name: str) -> Adapter:
        """The adapter alone, for sampling and export."""


class Backend(ABC):
    """One engine behind the phases: a class registered in `jobs.backends` (BACKENDS) under its `name`, the
    value of `model.backend` that picks it. The class owns what depends on the backend before one is open: its
    checks of the config (`check`), of its credentials (`check_credentials`), and preflight's (`preflight`)."""

    name: ClassVar[str]
    # the settings it reads besides `model.base` (section.key, or a whole section)
    settings: ClassVar[tuple[str, ...]] = ()
    # the service bills the run's tokens: the report's cost is this run's, not what it would cost on Tinker
    billed: ClassVar[bool] = False

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        """Raises ValueError (one line) where the config asks for what this backend cannot do."""
        return None  # by default: none

    @classmethod
    def check_credentials(cls) -> None:
        """Raises InputError (one line) when its credentials are missing or malformed, before any work."""
        return None  # by default: none

    @classmethod
    @abstractmethod
    def open(cls, pipeline: PipelineConfig, store: ArtifactStore, scratch: Path) -> Backend:
        """The backend for this config; a local one keeps its saved states in `store` (the train unit's folders)
        and its working copies in `scratch`."""

    @classmethod
    @abstractmethod
    def preflight(cls, pipeline: PipelineConfig) -> Path:
        """Before any phase: that this backend can serve `model.base` (its service answers, the files are at
        hand); the folder of the model files it found (at least the tokenizer's)."""

    @abstractmethod
    def precision(self) -> dict[str, str]:
        """The device and dtype replies are computed in, for manifests and cache keys."""

    @abstractmethod
    def sampler(self, adapter: str | None = None) -> SamplingClient:
        """The base model, or the base plus the adapter at an `Adapter.sampling` location."""

    @abstractmethod
    def trainer(self, train: TrainConfig, resume_from: str | None = None) -> TrainingClient:
        """A new LoRA over the base, or the one saved at `resume_from` with its optimizer state."""

    @abstractmethod
    def adapter_files(self, adapter: Adapter, folder: Path) -> Path:
        """The PEFT adapter folder (adapter_model.safetensors, adapter_config.json) on local disk."""
