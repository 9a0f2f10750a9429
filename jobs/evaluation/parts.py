"""What each of evaluate's parts (`jobs.phases.evaluate`) is, and what it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from jobs.backends.base import Metered, SamplingParams
from jobs.config import PipelineConfig
from jobs.evaluation import persona
from jobs.evaluation.measure import Measured, Prompts
from jobs.evaluation.teacher_card import TeacherCard
from jobs.phases.base import PhaseConfig

Advance = Callable[[int], object]


@dataclass
class Context:
    """What the parts read: the config, the held-out prompts and conversations, the training rows the judge learns
    from, what the parts before them found, the persona checks' prompts, and the teacher's system messages
    (`lore`; without it, `prompts.system` alone)."""

    config: PhaseConfig
    prompts: Prompts
    conversations: list[list[dict]]
    judge_rows: list[dict]
    seen: Measured
    checks: persona.Checks
    questions: list[str] = dataclasses.field(default_factory=list)  # the held-out prompts' text (the rubric judge's)
    lore: TeacherCard | None = None

    @property
    def teacher(self) -> TeacherCard:
        """The card as the teacher reads it in the sampling passes (`jobs.evaluation.teacher_card`)."""
        return self.lore or TeacherCard(self.prompts.system)

    @property
    def sampling(self) -> SamplingParams:
        """How evaluate samples (greedy in every profile)."""
        return SamplingParams.from_config(self.config.pipeline.evaluate.sampling)

    def as_teacher(self, offset: int) -> SamplingParams:
        """The teacher's own sampling settings, with evaluate's seed moved by `offset`."""
        pipeline = self.config.pipeline
        return SamplingParams.from_config(pipeline.teacher.model_copy(
            update={"seed": pipeline.evaluate.sampling.seed + offset}))


@dataclass(frozen=True)
class Part:
    """One stage of evaluate: `compute(client, context, advance)` returns fields of `Measured`, in `steps(context)`
    steps. `settings(pipeline, precision)` is what of the config it reads besides the split, the model and the
    card (a base part's cache key); `feeds` the figures it goes into."""

    name: str
    compute: Callable[[Metered, Context, Advance], dict]
    steps: Callable[[Context], int]
    settings: Callable[[PipelineConfig, dict], object]
    feeds: tuple[str, ...]
    topk: bool = False  # its result is the teacher's top k (cached as arrays)
