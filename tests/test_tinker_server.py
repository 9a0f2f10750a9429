"""The unchanged tinker SDK (0.38) against the project's Tinker-compatible server (workflows.tinker_server),
which runs as a subprocess backed by the local engine. Every test name contains "tinker" (`pytest -k tinker`)."""

from __future__ import annotations

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

tinker = pytest.importorskip("tinker")

from jobs.backends.base import Datum  # noqa: E402
from jobs.backends.local import LocalEngine  # noqa: E402
from jobs.config import ModelConfig, TrainConfig  # noqa: E402
from workflows.tinker_server import TinkerServer  # noqa: E402

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def tinker_params_to_local(max_tokens: int):
    from jobs.backends.base import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.0)


@pytest.mark.slow
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


@pytest.mark.slow
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
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda seed: sample(sc, prompt, seed), [42, 42, 43, 44]))
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
