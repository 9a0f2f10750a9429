"""Distillation: the teacher/student pairing of a conversation, the KL figures against the full vocabulary, and
the train objectives (`jobs.distill`, `jobs.phases.train`) on the tiny test model in float32. Two tests need the real
SmolLM2's peaked distributions (`slow`): the share of the KL that evaluate's top k holds, and the logit objective
closing the KL (on a random model's flat ones, top-k targets pull the student away)."""

from __future__ import annotations

import math

import pytest
import tiny_model
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
MODEL = ModelConfig(base=tiny_model.NAME, dtype="float32")
REAL = ModelConfig(dtype="float32")


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


@pytest.fixture(scope="module")
def real_engine():
    return LocalEngine.for_sampling(REAL)


def kl_figures(engine: LocalEngine, k: int) -> tuple[list[distill.Paired], list[list[float]]]:
    """Each row's KL(teacher || student) per reply position, over the teacher's top k."""
    pairs = [distill.pair(engine.renderer, row["messages"], SYSTEM) for row in ROWS]
    top = distill.teacher_topk(engine, pairs, k)
    return pairs, [distill.kl_per_position(t, m) for t, m in zip(top, distill.model_logprobs(engine, pairs, top),
                                                                strict=True)]


def test_kl_figures_match_the_full_vocabulary_computed_by_torch(engine):
    pairs, kl_full = kl_figures(engine, engine.model.config.vocab_size)
    with torch.no_grad():
        for p, values in zip(pairs, kl_full, strict=True):
            teacher = engine.logits(p.teacher_tokens).log_softmax(-1)[[i - 1 for i in p.teacher_positions]]
            student = engine.logits(p.student_tokens).log_softmax(-1)[[i - 1 for i in p.student_positions]]
            expected = (teacher.exp() * (teacher - student)).sum(-1)
            assert values == pytest.approx(expected.tolist(), abs=2e-3)
    _, kl_top = kl_figures(engine, EvaluateConfig().kl_top_k)
    flat_full, flat_top = [v for row in kl_full for v in row], [v for row in kl_top for v in row]
    assert all(t <= f + 1e-4 for t, f in zip(flat_top, flat_full, strict=True))  # a lower bound


@pytest.mark.slow
def test_evaluates_top_k_holds_most_of_the_real_models_kl(real_engine):
    (_, kl_full), (_, kl_top) = (kl_figures(real_engine, k) for k in (real_engine.model.config.vocab_size,
                                                                       EvaluateConfig().kl_top_k))
    share = sum(map(sum, kl_top)) / sum(map(sum, kl_full))
    print(f"KL over the top {EvaluateConfig().kl_top_k}: {share:.1%} of the full KL")
    assert share > 0.9  # evaluate's default k holds most of it


def trainer_for(objective: str, model: ModelConfig = MODEL) -> tuple[LocalTrainer, TrainConfig]:
    train = TrainConfig(objective=objective, steps=4, batch_size=3, learning_rate=2e-3, checkpoint_every=4,
                        top_k=16, rollout_tokens=12)
    return LocalTrainer(LocalEngine.for_training(model, train), folders=None), train


def mean_kl(engine_: LocalEngine, pairs: list[distill.Paired], teacher: list[TopK]) -> float:
    values = [v for t, m in zip(teacher, distill.model_logprobs(engine_, pairs, teacher), strict=True)
              for v in distill.kl_per_position(t, m)]
    return sum(values) / len(values)


@pytest.mark.slow
def test_the_logit_objective_pulls_the_student_toward_the_teachers_distribution(real_engine):
    engine = real_engine
    trainer, train = trainer_for("logit", REAL)
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
