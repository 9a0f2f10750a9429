"""logit: at every position of the teacher's replies, its top-k distribution with the card as the target
(context distillation, `jobs.distill`): each turn's under the system message the teacher sampled it with (a
lorebook's keyed entries included)."""

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
        """One teacher pass per conversation, or one per run of turns under one system message where a lorebook's
        keyed entries joined it mid-conversation (`distill.pair_runs`)."""
        systems = [self.systems(row) for row in self.rows]
        runs = [distill.pair_runs(teacher.renderer, row["messages"], s) for row, s in zip(self.rows, systems,
                                                                                            strict=True)]
        targets = distill.teacher_topk_runs(teacher, runs, self.train.top_k)
        pairs = [distill.whole(teacher.renderer, row["messages"], run, s[-1])
                 for row, s, run in zip(self.rows, systems, runs, strict=True)]
        self.data = [distill.soft_datum(p, t, self.train.max_seq_len, self.train.sampled_weight)
                     for p, t in zip(pairs, targets, strict=True)]

    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        """Nothing: the data came from the teacher's pass."""
