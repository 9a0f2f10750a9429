"""Distillation: the teacher/student pairing of a conversation, the KL figures against the full vocabulary, and
the train objectives (`jobs.distill`, `jobs.phases.train`) on SmolLM2 in float32."""

from __future__ import annotations

import math

import pytest
import torch

from jobs import distill
from jobs.backends.base import TopK
from jobs.backends.local import LocalEngine
from jobs.backends.local_backend import LocalTrainer
from jobs.config import EvaluateConfig, ModelConfig, TrainConfig
from jobs.objectives import Logit, OnPolicy
from jobs.records import exchange

SYSTEM = "You are Ludwig van Beethoven, the composer, in Vienna in 1824. You are deaf and proud, and you say so."
ROWS = [{"messages": exchange("Who are you?", "I am Beethoven, and I write symphonies.")},
        {"messages": exchange("What do you play?", "The piano, loudly, because I cannot hear it.")},
        {"messages": [*exchange("Hello!", "Good day to you."), *exchange("What is your name?", "Ludwig.")]}]
MODEL = ModelConfig(dtype="float32")


def test_kl_over_the_whole_vocabulary_is_exact_and_over_the_top_k_a_lower_bound():
    teacher = [0.5, 0.25, 0.15, 0.07, 0.03]
    model = [0.2, 0.2, 0.2, 0.2, 0.2]
    exact = sum(p * math.log(p / q) for p, q in zip(teacher, model, strict=True))
    order = sorted(range(5), key=lambda i: -teacher[i])
    for k in (5, 2, 1):
        top = TopK(0, [order[:k]], [[math.log(teacher[i]) for i in order[:k]]])
        found = distill.kl_per_position(top, [[math.log(model[i]) for i in order[:k]]])[0]
        if k == 5:
            assert found == pytest.approx(exact, abs=1e-9)
        else:
            assert 0 < found < exact
    same = TopK(0, [[0, 1]], [[math.log(0.5), math.log(0.25)]])
    assert distill.kl_per_position(same, [[math.log(0.5), math.log(0.25)]]) == [pytest.approx(0.0, abs=1e-9)]


def test_sampled_weight_moves_that_share_of_each_target_onto_the_sampled_token():
    # tokens 7 8 9; positions 1 and 2 are the reply, whose sampled tokens are 8 and 9
    paired = distill.Paired([7, 8, 9], [7, 8, 9], [0.0, 1.0, 1.0], [1, 2], [1, 2])
    target = TopK(1, [[8, 5], [5, 6]], [[math.log(0.6), math.log(0.4)], [math.log(0.7), math.log(0.3)]])
    alone = distill.soft_datum(paired, target, 16)
    assert alone.candidates[1:] == [[8, 5], [5, 6]] and alone.probs[1] == pytest.approx([0.6, 0.4])
    mixed = distill.soft_datum(paired, target, 16, sampled_weight=0.25)
    assert mixed.candidates[1] == [8, 5] and mixed.probs[1] == pytest.approx([0.6 * 0.75 + 0.25, 0.4 * 0.75])
    # 9 is not among position 2's top k: it takes the least likely candidate's place, and k stays 2
    assert mixed.candidates[2] == [5, 9] and mixed.probs[2] == pytest.approx([0.7 * 0.75, 0.25])
    assert distill.soft_datum(paired, target, 16, sampled_weight=1.0).probs[1:] == [[1.0, 0.0], [0.0, 1.0]]


@pytest.fixture(scope="module")
def engine():
    return LocalEngine.for_sampling(MODEL)


def test_a_conversation_pairs_the_same_assistant_tokens_with_and_without_the_card(engine):
    for row in ROWS:
        paired = distill.pair(engine.renderer, row["messages"], SYSTEM)
        assistant = [m for m in row["messages"] if m["role"] == "assistant"]
        # every assistant turn with its end-of-turn token, nothing else
        assert len(paired.student_positions) == sum(len(engine.renderer.reply(m["content"])) for m in assistant)
        assert len(paired.teacher_tokens) - len(paired.student_tokens) \
            == paired.teacher_positions[0] - paired.student_positions[0] > 0
        student_text = engine.renderer.decode([paired.student_tokens[i] for i in paired.student_positions])
        assert student_text.replace(" ", "") == "".join(m["content"] for m in assistant).replace(" ", "")


@pytest.mark.slow
def test_kl_figures_match_the_full_vocabulary_computed_by_torch(engine):
    pairs = [distill.pair(engine.renderer, row["messages"], SYSTEM) for row in ROWS]
    vocabulary = engine.model.config.vocab_size
    full = distill.teacher_topk(engine, pairs, vocabulary)
    kl_full = [distill.kl_per_position(t, m) for t, m in zip(full, distill.model_logprobs(engine, pairs, full),
                                                            strict=True)]
    with torch.no_grad():
        for p, values in zip(pairs, kl_full, strict=True):
            teacher = engine.logits(p.teacher_tokens).log_softmax(-1)[[i - 1 for i in p.teacher_positions]]
            student = engine.logits(p.student_tokens).log_softmax(-1)[[i - 1 for i in p.student_positions]]
            expected = (teacher.exp() * (teacher - student)).sum(-1)
            assert values == pytest.approx(expected.tolist(), abs=2e-3)
    top = distill.teacher_topk(engine, pairs, EvaluateConfig().kl_top_k)
    kl_top = [distill.kl_per_position(t, m) for t, m in zip(top, distill.model_logprobs(engine, pairs, top),
                                                           strict=True)]
    flat_full = [v for row in kl_full for v in row]
    flat_top = [v for row in kl_top for v in row]
    assert all(t <= f + 1e-4 for t, f in zip(flat_top, flat_full, strict=True))
    print(f"KL over the top {EvaluateConfig().kl_top_k}: {sum(flat_top) / sum(flat_full):.1%} of the full KL")
    assert sum(flat_top) / sum(flat_full) > 0.9  # evaluate's default k holds most of it


def trainer_for(objective: str) -> tuple[LocalTrainer, TrainConfig]:
    train = TrainConfig(objective=objective, steps=4, batch_size=3, learning_rate=2e-3, checkpoint_every=4,
                        top_k=16, rollout_tokens=12)
    return LocalTrainer(LocalEngine.for_training(MODEL, train), folders=None), train


def mean_kl(engine_: LocalEngine, pairs: list[distill.Paired], teacher: list[TopK]) -> float:
    values = [v for t, m in zip(teacher, distill.model_logprobs(engine_, pairs, teacher), strict=True)
              for v in distill.kl_per_position(t, m)]
    return sum(values) / len(values)


@pytest.mark.slow
def test_the_logit_objective_pulls_the_student_toward_the_teachers_distribution(engine):
    trainer, train = trainer_for("logit")
    objective = Logit(ROWS, train, SYSTEM)
    objective.prepare(engine)
    pairs = [distill.pair(engine.renderer, row["messages"], SYSTEM) for row in ROWS]
    teacher = distill.teacher_topk(engine, pairs, 64)
    before = mean_kl(trainer.engine, pairs, teacher)
    for step in range(train.steps):
        batch, loss_fn, _ = objective.batch([0, 1, 2], step)
        assert loss_fn == "cross_entropy" and all(sum(map(len, d.candidates or [])) for d in batch)
        trainer.forward_backward(batch, loss_fn)
        trainer.optim_step(train.learning_rate)
    assert mean_kl(trainer.engine, pairs, teacher) < 0.7 * before


@pytest.mark.slow
def test_on_policy_steps_score_the_students_own_samples_with_the_teacher(engine):
    trainer, train = trainer_for("on_policy")
    objective = OnPolicy(ROWS, train.model_copy(update={"warm_start_steps": 1}), SYSTEM)
    objective.start(trainer, engine)
    warm, loss_fn, _ = objective.batch([0, 1, 2], 0)
    assert loss_fn == "cross_entropy" and warm == objective.data[:3]
    before = {name: p.clone() for name, p in trainer.engine.adapter_parameters().items()}
    batch, loss_fn, figures = objective.batch([0, 1, 2], 1)
    assert loss_fn == "importance_sampling"
    for datum, row in zip(batch, ROWS, strict=True):
        prompt = engine.renderer.chat(row["messages"][:-1])
        assert datum.tokens[:len(prompt)] == prompt and not any(datum.weights[:len(prompt)])
        reply = datum.tokens[len(prompt):]
        # the advantage is log p_teacher - log p_student of the sampled tokens: recompute both
        student = engine.compute_logprobs([datum.tokens])[0][len(prompt) - 1:]
        with_card = engine.renderer.chat([{"role": "system", "content": SYSTEM}, *row["messages"][:-1]])
        teacher = engine.compute_logprobs([with_card + reply])[0][len(with_card) - 1:]
        expected = [t - s for t, s in zip(teacher, student, strict=True)]
        assert datum.advantages is not None and datum.advantages[len(prompt):] == pytest.approx(expected, abs=1e-3)
    assert figures["rollout_tokens"] > 0 and math.isfinite(figures["reverse_kl"])
    result = trainer.forward_backward(batch, loss_fn).result()
    trainer.optim_step(train.learning_rate)
    # at ratio 1 the loss is minus the mean advantage: the reverse-KL estimate
    assert result["loss"] == pytest.approx(figures["reverse_kl"], abs=1e-3)
    after = trainer.engine.adapter_parameters()
    assert any(not torch.equal(before[name], after[name]) for name in before)
