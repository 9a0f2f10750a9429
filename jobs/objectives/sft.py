"""sft: the teacher's sampled replies as targets (cross-entropy on the assistant tokens)."""

from __future__ import annotations

from jobs.backends.base import SamplingClient, TrainingClient
from jobs.objectives.base import Batch, Objective, to_datum


class SFT(Objective):
    name = "sft"

    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        self.data = [to_datum(trainer.renderer, row, self.train.max_seq_len) for row in self.rows]

    def batch(self, indices: list[int], step: int) -> Batch:
        return [self.data[i] for i in indices], "cross_entropy", {}
