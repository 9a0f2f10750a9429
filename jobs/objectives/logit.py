"""logit: at every position of the teacher's replies, its top-k distribution with the card as the target
(context distillation, `jobs.distill`)."""

from __future__ import annotations

from jobs import distill
from jobs.backends.base import SamplingClient, TrainingClient
from jobs.objectives.sft import SFT


class Logit(SFT):
    """The targets are computed once, before training, by the teacher (whose model is released before the
    student's is made); each step is cross-entropy to them (`Datum.candidates`)."""

    name = "logit"
    settings = ("top_k", "sampled_weight")
    teacher_pass = "before step 1: the teacher's top-k"

    def prepare(self, teacher: SamplingClient) -> None:
        pairs = [distill.pair(teacher.renderer, row["messages"], self.system) for row in self.rows]
        targets = distill.teacher_topk(teacher, pairs, self.train.top_k)
        self.data = [distill.soft_datum(p, t, self.train.max_seq_len, self.train.sampled_weight)
                     for p, t in zip(pairs, targets, strict=True)]

    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        """Nothing: the data came from the teacher's pass."""
