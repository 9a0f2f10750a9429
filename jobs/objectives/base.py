"""What a train objective is to the train phase (`jobs.phases.train`): the data of each step and the loss that
pulls the student toward the teacher.

An objective is a class registered in `jobs.objectives`. It declares the train settings it reads, checks them
against the config, says what it needs of the backend besides the student (a pass of the teacher over every row
before step 1, the teacher during training), and turns the step's rows into `Datum`s and the loss function the
backends compute over them (`jobs.backends.base.LossFn`). Validation is the NLL of the teacher's replies for
every objective, so runs of different objectives compare.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from jobs.backends.base import Datum, LossFn, SamplingClient, TrainingClient
from jobs.backends.renderer import Renderer
from jobs.lorebook import Lorebook, turn_systems

if TYPE_CHECKING:  # jobs.config validates with the registry of objectives, so imports it for types only
    from jobs.config import PipelineConfig, TrainConfig

# a step's training data, the loss function it is for, and figures to log beside the step's loss
Batch = tuple[list[Datum], LossFn, dict[str, float]]


def to_datum(renderer: Renderer, row: dict, max_len: int) -> Datum:
    """A split row's conversation (`messages`, the format TRL's SFTTrainer and tinker-cookbook read), loss on
    its assistant turns."""
    tokens, weights = renderer.conversation(row["messages"])
    return Datum(tokens[:max_len], weights[:max_len])


class Objective(ABC):
    """One train objective; the train phase calls `prepare` (when `teacher_pass` names one), then `start` once
    the student exists, then `batch` every step."""

    name: ClassVar[str]
    # the `train` settings it reads besides those every objective does (steps, batch size, learning rate,
    # max_seq_len): recorded with the train metrics, so that runs of one objective can be told apart
    settings: ClassVar[tuple[str, ...]] = ()
    # a pass of the teacher over every row before step 1 (`prepare`), as its progress stage; "" for none. It runs
    # before the student's model is made and the teacher is released after it: one model in memory at a time
    teacher_pass: ClassVar[str] = ""
    # the teacher during training (the base model with the card as its system message): `start` gets it
    teacher_in_loop: ClassVar[bool] = False

    def __init__(self, rows: list[dict], train: TrainConfig, system: str, lorebook: Lorebook | None = None):
        """`rows`: the train split; `system`: the card as the teacher's system message, the text every prompt shares;
        `lorebook`: the card's, whose keyed entries a row's records name per turn."""
        self.rows, self.train, self.system, self.lorebook = rows, train, system, lorebook

    def systems(self, row: dict) -> list[str]:
        """Per assistant turn of `row`, the teacher's system message when it sampled that turn (`system` and the
        keyed entries the row names, `jobs.lorebook.turn_systems`)."""
        return turn_systems(self.system, self.lorebook, row)

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        """Raises ValueError (one line) where the config does not suit this objective."""
        return None  # by default: none

    def prepare(self, teacher: SamplingClient) -> None:
        """The teacher's pass over every row, before the student's model is made."""
        return None  # by default: none

    @abstractmethod
    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        """Once the student exists (`teacher`: when `teacher_in_loop`, else None)."""

    @abstractmethod
    def batch(self, indices: list[int], step: int) -> Batch:
        """Step `step`'s training data for the rows at `indices` of the train split."""
