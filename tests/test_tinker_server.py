"""The unchanged tinker SDK (0.38) against the project's Tinker-compatible server (workflows.local.tinker),
which runs as a subprocess backed by the local engine. Every test name contains "tinker" (`pytest -k tinker`)."""

from __future__ import annotations

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tiny_model

tinker = pytest.importorskip("tinker")
pytestmark = pytest.mark.tinker

from jobs.backends.base import Datum  # noqa: E402
from jobs.backends.local import LocalEngine  # noqa: E402
from jobs.config import ModelConfig, TrainConfig  # noqa: E402
from workflows.local.tinker import TinkerServer  # noqa: E402

BASE = tiny_model.NAME  # the tiny test model: these tests are about the wire, not the weights
FLOAT32 = ModelConfig(base=BASE, dtype="float32", device="cpu")
RANK, LR = 8, 2e-3
ROWS = [("Who taught you?", "Haydn, though I learned little from him."),
        ("Do you like coffee?", "Exactly sixty beans a cup, counted.")]
ADAM = dict(learning_rate=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with TinkerServer(tmp_path_factory.mktemp("tinker"), dtype="float32") as running:
        yield running


@pytest.fixture(scope="module")
def service(server):
    os.environ["TINKER_TELEMETRY"] = "0"
    with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as svc:
        yield svc


@pytest.fixture(scope="module")
def sampler():
    return LocalEngine.for_sampling(FLOAT32)


def rows(renderer) -> list[Datum]:
    data = []
    for prompt, reply in ROWS:
        head, tail = renderer.prompt(prompt), renderer.reply(reply)
        data.append(Datum(head + tail, [0.0] * len(head) + [1.0] * len(tail)))
    return data


def to_tinker(data: list[Datum]) -> list:
    return [tinker.Datum(model_input=tinker.ModelInput.from_ints(d.tokens[:-1]),
                         loss_fn_inputs={"target_tokens": d.tokens[1:], "weights": d.weights[1:]}) for d in data]


def train_steps(tc, data, steps: int) -> list[float]:
    """`steps` pipelined forward_backward + optim_step pairs (both submitted before either is waited on)."""
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(to_tinker(data), "cross_entropy")
        opt = tc.optim_step(tinker.AdamParams(**ADAM))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


def params(seed: int, max_tokens: int = 16, eos: int = 2):
    return tinker.SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=seed, stop=[eos])


def sample(sc, prompt, seed, max_tokens=16):
    result = sc.sample(prompt=tinker.ModelInput.from_ints(prompt), num_samples=1,
                       sampling_params=params(seed, max_tokens)).result()
    return list(result.sequences[0].tokens), result.sequences[0].stop_reason


def test_tinker_training_loss_is_the_engines_sum_and_falls_and_resumes_from_state(service, sampler):
    data = rows(sampler.renderer)
    tc = service.create_lora_training_client(base_model=BASE, rank=RANK, seed=0).result()
    first = tc.forward_backward(to_tinker(data), "cross_entropy").result()
    tc.optim_step(tinker.AdamParams(**ADAM)).result()
    # the same first step in the engine: Tinker's cross_entropy is the weighted sum
    engine = LocalEngine.for_training(FLOAT32, TrainConfig(lora_rank=RANK, lora_alpha=32, seed=0))
    local = engine.forward_backward(data, reduction="sum", logprobs=True)
    assert first.metrics["loss:sum"] == pytest.approx(local["loss"], rel=1e-5)
    for out, datum, expected in zip(first.loss_fn_outputs, data, local["logprobs"], strict=True):
        assert out["logprobs"].tolist() == pytest.approx(expected, abs=1e-4)
        assert len(out["logprobs"].tolist()) == len(datum.tokens) - 1
    del engine
    losses = [first.metrics["loss:sum"]] + train_steps(tc, data, 2)
    assert losses[-1] < losses[0]
    # validation: forward() computes the loss with no gradient and changes nothing
    before = tc.forward(to_tinker(data), "cross_entropy").result().metrics["loss:sum"]
    assert tc.forward(to_tinker(data), "cross_entropy").result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)

    path = tc.save_state("step-000003").result().path
    assert path == f"tinker://{tc.model_id}/weights/step-000003"
    uninterrupted = train_steps(tc, data, 2)
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != tc.model_id
    # the next two steps (the second depends on the restored Adam moments) give the same losses
    assert train_steps(resumed, data, 2) == pytest.approx(uninterrupted, rel=1e-5)


def test_tinker_sampling_is_seeded_batched_per_request_and_scores_prompts(service, server, sampler):
    sc = service.create_sampling_client(base_model=BASE).result()
    prompt = sampler.renderer.prompt("Who taught you to play the piano?")
    alone = sample(sc, prompt, 1234)
    assert alone == sample(sc, prompt, 1234)
    assert alone[1] in ("stop", "length") and 0 < len(alone[0]) <= 16
    # under concurrency, batched with others on the server: the same reply
    others = [sampler.renderer.prompt(q) for q in ("Say hello.", "What is your favourite key?", "Tell me a joke.")]
    jobs = [(prompt, 1234)] + [(others[i % 3], 100 + i) for i in range(15)]
    before = server.stats()["largest_sample_batch"]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: sample(sc, *job), jobs))
    assert replies[0] == alone
    assert server.stats()["largest_sample_batch"] > max(before, 1)  # they were batched
    # the engine's own sampling with the same seed gives the same tokens (the stop token is appended here)
    tokens, reason = alone
    local = sampler.sample([prompt], tinker_params_to_local(16), seeds=[1234])[0]
    assert tokens == (local + [sampler.renderer.end_of_turn] if reason == "stop" else local)

    sequence = prompt + sampler.renderer.reply("Neefe, in Bonn.")
    logprobs = sc.compute_logprobs(tinker.ModelInput.from_ints(sequence)).result()
    assert logprobs[0] is None and len(logprobs) == len(sequence)
    assert logprobs[1:] == pytest.approx(sampler.compute_logprobs([sequence])[0], abs=2e-4)
    # scored under concurrency, batched with other prompts on the server: bit for bit the same log-probabilities
    # (what lets a retried request, which lands in another batch, change nothing)
    sequences = [sequence] + [other + sampler.renderer.reply("Neefe, in Bonn.") for other in others] * 5
    before = server.stats()["sample_batches"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda s: sc.compute_logprobs(tinker.ModelInput.from_ints(s)).result(), sequences))
    assert server.stats()["sample_batches"] - before < len(sequences)  # some were batched
    assert together[0] == logprobs


def tinker_params_to_local(max_tokens: int):
    from jobs.backends.base import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.0)


def test_tinker_sampler_and_external_weights_carry_the_adapter(service, server, sampler, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from jobs.backends.model_files import model_dir

    tc = service.create_lora_training_client(base_model=BASE, rank=RANK, seed=0).result()
    train_steps(tc, rows(sampler.renderer), 2)
    path = tc.save_weights_for_sampler("final").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/final"
    adapted = service.create_sampling_client(model_path=path).result()
    prompt = sampler.renderer.prompt("Who taught you?")
    folder = server.data_dir / "models" / tc.model_id / "sampler_weights" / "final"
    local = LocalEngine.for_sampling(FLOAT32, folder).sample([prompt], tinker_params_to_local(12), seeds=[7])[0]
    tokens, reason = sample(adapted, prompt, 7, max_tokens=12)
    assert tokens == (local + [sampler.renderer.end_of_turn] if reason == "stop" else local)

    external = tc.save_weights_external("final").result().path
    assert external == f"tinker://{tc.model_id}/external_weights/final"
    urls = tinker.RestClient(base_url=server.base_url, api_key=server.api_key) \
        .get_external_weights_urls(external).result().urls
    assert set(urls) == {"adapter_model.safetensors", "adapter_config.json"}
    download = tmp_path / "adapter"
    download.mkdir()
    for name, url in urls.items():
        (download / name).write_bytes(urllib.request.urlopen(url, timeout=30).read())
    assert json.loads((download / "adapter_config.json").read_text())["lora_alpha"] == 32
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir(BASE)), download)
    ours = load_file(download / "adapter_model.safetensors")
    assert ours.keys() == load_file(folder / "adapter_model.safetensors").keys()
    assert any("lora_B" in name for name in ours) and model.peft_config["default"].r == RANK


def test_tinker_faults_and_latency_change_nothing_but_time(service, sampler, tmp_path):
    """With 30% of requests answered 429/500 (before any work) and 0.2 s latency, the same operations give the
    same results as on the fault-free server."""
    data = rows(sampler.renderer)
    prompt = sampler.renderer.prompt("Who taught you?")
    clean_tc = service.create_lora_training_client(base_model=BASE, rank=RANK, seed=0).result()
    expected_losses = train_steps(clean_tc, data, 2)
    expected_sample = sample(service.create_sampling_client(base_model=BASE).result(), prompt, 42)
    with TinkerServer(tmp_path / "faulty", dtype="float32", latency=0.2, fault_rate=0.3, fault_seed=7) as faulty, \
            tinker.ServiceClient(base_url=faulty.base_url, api_key=faulty.api_key) as svc:
        tc = svc.create_lora_training_client(base_model=BASE, rank=RANK, seed=0).result()
        assert train_steps(tc, data, 2) == pytest.approx(expected_losses, rel=1e-5)
        path = tc.save_state("s").result().path
        assert (faulty.data_dir / "models" / tc.model_id / "weights" / "s" / "trainer_state.pt").is_file()
        sc = svc.create_sampling_client(base_model=BASE).result()
        # one request at a time, as the clean one was: requests that arrive together are sampled in one batch, and
        # another batch shape rounds a float sum differently, which flips a token of the tiny model's flat
        # distribution now and then (the faults' retries decide what arrives together)
        replies = [sample(sc, prompt, seed) for seed in (42, 42)]
        assert replies[0] == replies[1] == expected_sample
        stats = faulty.stats()
        assert sum(stats["faults"].values()) > 0, stats  # seed 7: normally the first forward_backward too
        assert json.loads((faulty.data_dir / "tinker-server-stats.json").read_text())["faults"] == stats["faults"]
        assert path.startswith("tinker://")


def test_tinker_a_key_without_the_tml_prefix_is_refused(server, tmp_path):
    import httpx

    with pytest.raises(tinker.TinkerError, match="tml-"):  # the SDK refuses it before sending
        tinker.ServiceClient(base_url=server.base_url, api_key="sk-not-tinker").create_lora_training_client(
            base_model=BASE, rank=RANK).result()
    # and the server answers 401 to one that gets through (the SDK also sends JWT-shaped credentials)
    response = httpx.post(f"{server.base_url}/api/v1/client/config", json={}, headers={"X-API-Key": "eyJhbGciOi"})
    assert response.status_code == 401
    response = httpx.post(f"{server.base_url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-x"})
    assert response.status_code == 200
    assert "eyJhbGciOi" not in Path(server.log_path).read_text()


# -- distillation: top-k and target log-probabilities, soft targets, importance sampling, a trainer's sampler --
def sequences_and_starts(renderer) -> tuple[list[list[int]], list[int]]:
    """The rows' full sequences and where their replies start, plus one scored only on its last 3 tokens and one
    with nothing to score (start = its length: no request)."""
    data = rows(renderer)
    sequences = [d.tokens for d in data] + [data[0].tokens, data[1].tokens]
    starts = [d.weights.index(1.0) for d in data] + [len(data[0].tokens) - 3, len(data[1].tokens)]
    return sequences, starts


def soft_batch(teacher, renderer, k: int = 4) -> list[Datum]:
    """The rows with the teacher's top-k as soft targets on their replies (its probabilities renormalised)."""
    import math

    data = rows(renderer)
    starts = [d.weights.index(1.0) for d in data]
    out = []
    for d, top in zip(data, teacher.topk_logprobs([d.tokens for d in data], starts, k), strict=True):
        probs = [[math.exp(lp) / sum(math.exp(x) for x in row) for lp in row] for row in top.logprobs]
        out.append(Datum(d.tokens, d.weights, candidates=[[]] * top.start + top.ids, probs=[[]] * top.start + probs))
    return out


def importance_batch(teacher, renderer) -> list[Datum]:
    """The rows as on-policy samples: the base model's own log-probabilities, one advantage per row."""
    data = rows(renderer)
    logprobs = teacher.compute_logprobs([d.tokens for d in data])
    return [Datum(d.tokens, d.weights, sampled_logprobs=[0.0] + lp, advantages=[advantage] * len(d.tokens))
            for d, lp, advantage in zip(data, logprobs, [1.0, -0.5], strict=True)]


def lora_weights(engine) -> dict:
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(engine.model).items()}


def test_tinker_sampler_topk_and_target_logprobs_are_the_engines(service, sampler):
    from jobs.backends.base import TopK
    from jobs.backends.tinker_backend import TinkerSampler

    ours = TinkerSampler(service.create_sampling_client(base_model=BASE).result(), sampler.renderer, 4)
    sequences, starts = sequences_and_starts(sampler.renderer)
    topk, expected = ours.topk_logprobs(sequences, starts, 5), sampler.topk_logprobs(sequences, starts, 5)
    assert [t.start for t in topk] == starts and topk[-1] == TopK(len(sequences[-1]), [], [])
    for sequence, got, want in zip(sequences, topk, expected, strict=True):
        assert got.ids == want.ids and len(got.ids) == len(sequence) - got.start
        assert all(r == pytest.approx(w, abs=1e-4) for r, w in zip(got.logprobs, want.logprobs, strict=True))
    # targets of different widths per row (one row asks nothing): each id's log-probability where it was asked
    targets = [TopK(t.start, [ids[:j % 4] for j, ids in enumerate(t.ids)], []) for t in expected]
    found, want = ours.target_logprobs(sequences, targets), sampler.target_logprobs(sequences, targets)
    for got_rows, want_rows, target in zip(found, want, targets, strict=True):
        assert [len(r) for r in got_rows] == [len(ids) for ids in target.ids]
        assert all(r == pytest.approx(w, abs=1e-4) for r, w in zip(got_rows, want_rows, strict=True))

    # the wire, straight from the SDK: a dense target tensor gets a dense answer, 0.0 where it asked nothing
    import numpy as np

    sc, sequence = ours.client, sequences[0]
    ids = np.full((len(sequence) - 1, 2), -1, dtype=np.int64)
    ids[-1] = [sequence[-1], 7]
    response = sc.sample(prompt=tinker.ModelInput.from_ints(sequence), num_samples=1,
                         sampling_params=tinker.SamplingParams(max_tokens=1),
                         target_prompt_logprobs=tinker.TensorData.from_numpy(ids)).result()
    answer = response.target_prompt_logprobs
    assert answer.sparse_crow_indices is None and answer.shape == [len(sequence) - 1, 2]
    dense = np.asarray(answer.data).reshape(answer.shape)
    assert not dense[:-1].any()
    assert dense[-1].tolist() == pytest.approx(sampler.target_logprobs([sequence], [TopK(len(sequence) - 1,
                                                                       [[sequence[-1], 7]], [])])[0][0], abs=1e-4)
    # prompt_logprobs_last_n: only the suffix is scored (the SDK checks that too), as compute_logprobs
    suffix = sc.compute_logprobs(tinker.ModelInput.from_ints(sequence), prompt_logprobs_last_n=3).result()
    assert suffix[:-3] == [None] * (len(sequence) - 3)
    assert suffix[-3:] == pytest.approx(sampler.compute_logprobs([sequence])[0][-3:], abs=2e-4)
    ids[-1] = [sequence[-1], 10**7]
    with pytest.raises(tinker.TinkerError, match="vocabulary"):
        sc.sample(prompt=tinker.ModelInput.from_ints(sequence), num_samples=1,
                  sampling_params=tinker.SamplingParams(max_tokens=1),
                  target_prompt_logprobs=tinker.TensorData.from_numpy(ids)).result()


def dense(data: list) -> list:
    """The same Datums with every loss_fn_input dense (the SDK sends a 2-D one sparse where that is smaller)."""
    return [tinker.Datum(model_input=d.model_input,
                         loss_fn_inputs={name: tinker.TensorData.from_numpy(td.to_numpy())
                                         for name, td in d.loss_fn_inputs.items()}) for d in data]


@pytest.mark.parametrize("loss_fn", ["soft", "importance_sampling"])
def test_tinker_trainer_soft_targets_and_importance_sampling_train_as_the_engine(service, server, sampler, loss_fn):
    """Two steps of TinkerTrainer through the SDK and the stand-in, and of the local engine: the same mean loss
    each step and the same LoRA weights after (the second step moves the A matrices too, and with
    importance_sampling its ratios are no longer 1); forward() gives the loss without a gradient, in Tinker's
    output shapes; the trainer's own sampler samples and scores with the trained weights."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from jobs.backends.base import SamplingParams, TopK
    from jobs.backends.tinker_backend import TinkerTrainer

    soft = loss_fn == "soft"
    batch = soft_batch(sampler, sampler.renderer) if soft else importance_batch(sampler, sampler.renderer)
    kind = "cross_entropy" if soft else "importance_sampling"
    trainer = TinkerTrainer(service.create_lora_training_client(base_model=BASE, rank=RANK, seed=0).result(),
                            sampler.renderer, 4)
    engine = LocalEngine.for_training(FLOAT32, TrainConfig(lora_rank=RANK, lora_alpha=32, seed=0))
    initial = lora_weights(engine)
    total = sum(sum(d.weights[1:]) for d in batch)
    data = (TinkerTrainer._soft_data if soft else TinkerTrainer._importance_sampling_data)(batch, total)
    if soft:
        assert data[0].loss_fn_inputs["weights"].sparse_crow_indices is not None  # the prompt rows are left out
    forward = trainer.client.forward(dense(data), kind).result()
    losses = []
    for step in range(2):
        pending = trainer.forward_backward(batch, kind)
        trainer.optim_step(LR).result()
        ours, local = pending.result(), engine.forward_backward(batch, loss_fn=kind)
        engine.optim_step(LR)
        assert ours["tokens"] == local["tokens"] == total
        assert ours["loss"] == pytest.approx(local["loss"], rel=1e-4, abs=1e-6), step
        losses.append(ours["loss"])
    assert forward.metrics["loss:sum"] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    if not soft:  # at ratio 1 the loss is minus the weighted mean advantage; after a step the ratios move
        replies = [sum(d.weights[1:]) for d in batch]
        assert losses[0] == pytest.approx(-(replies[0] - 0.5 * replies[1]) / total, rel=1e-4)
        assert losses[1] != pytest.approx(losses[0], rel=1e-3)
    for out, datum in zip(forward.loss_fn_outputs, batch, strict=True):
        n = len(datum.tokens) - 1
        assert out["logprobs"].shape == ([n, 4] if soft else [n])
        if soft:  # the candidates' log-probabilities (row j: the token at j + 1), the base model's before step 0
            start = datum.weights.index(1.0)
            got = np.asarray(out["logprobs"].data).reshape(n, 4)[start - 1:].tolist()
            want = sampler.target_logprobs([datum.tokens], [TopK(start, (datum.candidates or [])[start:], [])])[0]
            assert all(r == pytest.approx(w, abs=1e-4) for r, w in zip(got, want, strict=True))

    name = f"{loss_fn}-2"
    trainer.client.save_weights_for_sampler(name).result()
    saved = load_file(server.data_dir / "models" / trainer.client.model_id / "sampler_weights" / name
                      / "adapter_model.safetensors")
    expected = lora_weights(engine)
    assert saved.keys() == expected.keys()
    assert any("lora_A" in key and not torch.equal(saved[key], initial[key]) for key in saved)  # step 2 moved A
    for key, tensor in saved.items():
        assert torch.allclose(tensor, expected[key], rtol=1e-3, atol=LR * 1e-2), key

    # the trainer's own sampler: the trained weights, as the local engine has them, not the base model's
    student = trainer.sampler()
    sequences, starts = sequences_and_starts(sampler.renderer)
    trained = student.topk_logprobs(sequences[:2], starts[:2], 3)
    local_trained, base = engine.topk_logprobs(sequences[:2], starts[:2], 3), sampler.topk_logprobs(sequences[:2],
                                                                                                    starts[:2], 3)
    for got_topk, want_topk, base_topk in zip(trained, local_trained, base, strict=True):
        assert got_topk.ids == want_topk.ids
        assert all(r == pytest.approx(w, abs=1e-4) for r, w in zip(got_topk.logprobs, want_topk.logprobs, strict=True))
        assert max(abs(a - b) for r, w in zip(got_topk.logprobs, base_topk.logprobs, strict=True)
                   for a, b in zip(r, w, strict=True)) > 1e-3
    params = SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, seed=5)
    prompts = [sampler.renderer.prompt(q) for q, _ in ROWS]
    assert student.sample(prompts, params) == engine.sample(prompts, params)
