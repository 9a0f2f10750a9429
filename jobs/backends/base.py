"""The backend interface, shaped like Tinker's primitives so a Tinker adapter stays thin.

Tinker's SamplingClient has `sample` and `compute_logprobs`; its TrainingClient has `forward_backward`,
`optim_step`, `save_state` and `load_state`. Tokens are plain lists of ints here (Tinker's ModelInput).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jobs.backends.renderer import Renderer
from jobs.config import SamplingConfig


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 16

    @classmethod
    def from_config(cls, section: SamplingConfig, batch_size: int | None = None) -> SamplingParams:
        return cls(max_tokens=section.max_new_tokens, temperature=section.temperature, top_p=section.top_p,
                   repetition_penalty=section.repetition_penalty, seed=section.seed,
                   batch_size=batch_size or section.batch_size)


@dataclass(frozen=True)
class Datum:
    """One training sequence; `weights[i]` scales the loss of predicting `tokens[i]` (0 on prompt tokens)."""

    tokens: list[int]
    weights: list[float]


class SamplingClient(Protocol):
    renderer: Renderer

    def sample(self, prompts: list[list[int]], params: SamplingParams, on_batch=None) -> list[list[int]]:
        """Completion tokens (end-of-turn token stripped) for each prompt, in order."""

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(tokens[i] | tokens[:i]) for i >= 1 of each sequence."""


class TrainingClient(Protocol):
    renderer: Renderer

    def forward_backward(self, batch: list[Datum]) -> dict[str, float]:
        """Accumulates gradients of the weighted mean NLL; returns {'loss', 'tokens'}."""

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """As SamplingClient's, with the current weights (Tinker: `forward`); used for validation loss."""

    def optim_step(self, learning_rate: float) -> None:
        """One AdamW step on the LoRA parameters, then clears gradients."""

    def save_state(self, path: Path) -> None:
        """Adapter weights, optimizer state and RNG state, enough to resume bit for bit."""

    def load_state(self, path: Path) -> None: ...

    def adapter_parameters(self) -> dict[str, object]:
        """The trainable tensors by name (tests check they change)."""
