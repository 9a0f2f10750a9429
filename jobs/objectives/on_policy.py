"""on_policy: the student samples, the teacher scores the same tokens with the card, and the per-token
difference is the advantage of an importance-sampling loss (reverse KL, as tinker-cookbook's on-policy
distillation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.backends.base import Datum, SamplingClient, SamplingParams, TrainingClient
from jobs.objectives.base import Batch
from jobs.objectives.sft import SFT

if TYPE_CHECKING:
    from jobs.config import PipelineConfig


class OnPolicy(SFT):
    """The student samples a reply to each prompt of the batch without the card (with its current weights); the
    teacher scores the same tokens with the card (and the lorebook entries the row's last turn had); each token's
    advantage is log p_teacher - log p_student (a per-token reverse-KL estimate), and the importance-sampling loss
    raises the tokens the teacher likes more than the student does. The first `warm_start_steps` are SFT."""

    name = "on_policy"
    settings = ("warm_start_steps", "rollout_tokens", "rollout_temperature")
    teacher_in_loop = True

    @classmethod
    def check(cls, pipeline: PipelineConfig) -> None:
        if pipeline.train.warm_start_steps >= pipeline.train.steps:
            raise ValueError("train.warm_start_steps must be fewer than train.steps (on_policy)")

    def start(self, trainer: TrainingClient, teacher: SamplingClient | None) -> None:
        if teacher is None:
            raise ValueError("on_policy needs the teacher during training")
        super().start(trainer, teacher)
        self.renderer, self.trainer, self.teacher = trainer.renderer, trainer, teacher
        # a rollout answers its row's last turn: the teacher reads the system message that turn had (read before
        # step 1, so rows that cannot say which refuse now)
        self.last_systems = [self.systems(row)[-1] for row in self.rows]

    def batch(self, indices: list[int], step: int) -> Batch:
        if step < self.train.warm_start_steps:
            return super().batch(indices, step)
        asked = [self.rows[i]["messages"][:-1] for i in indices]  # up to the last assistant turn
        prompts = [self.renderer.chat(messages) for messages in asked]
        teacher_prompts = [self.renderer.chat([{"role": "system", "content": self.last_systems[i]}, *messages])
                           for i, messages in zip(indices, asked, strict=True)]
        policy = self.trainer.sampler()
        params = SamplingParams(max_tokens=self.train.rollout_tokens, temperature=self.train.rollout_temperature,
                                top_p=1.0, seed=self.train.seed * 1_000_003 + step * len(indices))
        end = [self.renderer.end_of_turn]
        replies = [reply + end if len(reply) < params.max_tokens else reply
                   for reply in policy.sample(prompts, params)]
        student = policy.compute_logprobs([p + r for p, r in zip(prompts, replies, strict=True)])
        teacher = self.teacher.compute_logprobs([p + r for p, r in zip(teacher_prompts, replies, strict=True)])
        data, kl = [], []
        for prompt, teacher_prompt, reply, s, t in zip(prompts, teacher_prompts, replies, student, teacher,
                                                       strict=True):
            sampled = s[len(prompt) - 1:]
            advantages = [tl - sl for tl, sl in zip(t[len(teacher_prompt) - 1:], sampled, strict=True)]
            kl += [-a for a in advantages]
            cut = self.train.max_seq_len
            data.append(Datum((prompt + reply)[:cut], ([0.0] * len(prompt) + [1.0] * len(reply))[:cut],
                              sampled_logprobs=([0.0] * len(prompt) + sampled)[:cut],
                              advantages=([0.0] * len(prompt) + advantages)[:cut]))
        return data, "importance_sampling", {"reverse_kl": sum(kl) / max(len(kl), 1),
                                             "rollout_tokens": sum(map(len, replies)) / len(replies)}
