"""The Tinker stand-in (workflows.local.tinker) through the unchanged tinker SDK: sampled sequences'
log-probabilities, the REST routes of training runs and checkpoints, TTL and age encryption of exported weights,
clients that go away and SIGTERM during a long batch. Every test name contains "tinker" (`pytest -k tinker`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tinker
import tiny_model

from jobs.backends.base import SamplingParams
from jobs.backends.tinker_backend import TinkerSampler
from workflows.local.tinker import TinkerServer

BASE = tiny_model.NAME  # the tiny test model: these tests are about the wire, not the weights
HOUR = 3600

pytestmark = pytest.mark.tinker


@pytest.fixture(scope="module")
def service(tinker_server):
    os.environ["TINKER_TELEMETRY"] = "0"
    with tinker.ServiceClient(base_url=tinker_server.base_url, api_key=tinker_server.api_key) as svc:
        yield svc


@pytest.fixture(scope="module")
def rest(tinker_server):
    return tinker.RestClient(base_url=tinker_server.base_url, api_key=tinker_server.api_key)


@pytest.fixture(scope="module")
def renderer():
    from transformers import AutoTokenizer

    from jobs.backends.model_files import model_dir
    from jobs.backends.renderer import Renderer

    return Renderer(AutoTokenizer.from_pretrained(model_dir(BASE)))


def stats(server) -> dict:
    return server.stats()


def test_tinker_sampled_logprobs_are_compute_logprobs_of_the_same_tokens(service, tinker_server, renderer):
    """Each sampled token's log-probability is what compute_logprobs gives for prompt + sequence (bit for bit on
    the stand-in), for every sample of a request, at any temperature (the model's own distribution)."""
    sc = service.create_sampling_client(base_model=BASE).result()
    prompt = renderer.prompt("Who taught you to play the piano?")
    for temperature in (1.0, 0.7):
        response = sc.sample(prompt=tinker.ModelInput.from_ints(prompt), num_samples=2,
                             sampling_params=tinker.SamplingParams(max_tokens=10, temperature=temperature, seed=3,
                                                                   stop=[renderer.end_of_turn])).result()
        for sequence in response.sequences:
            assert sequence.logprobs is not None and len(sequence.logprobs) == len(sequence.tokens) > 0
            scored = sc.compute_logprobs(tinker.ModelInput.from_ints(prompt + list(sequence.tokens))).result()
            assert scored[len(prompt):] == pytest.approx(sequence.logprobs, abs=1e-5)
            assert all(lp <= 0.0 for lp in sequence.logprobs)
    # the TinkerBackend's on-policy path: at temperature 1 and top_p 1 it keeps the sampled log-probabilities and
    # answers compute_logprobs of exactly those sequences from them (no request); they agree with a fresh request
    kept, fresh = TinkerSampler(sc, renderer, 4), TinkerSampler(sc, renderer, 4)
    prompts = [prompt, renderer.prompt("Do you like coffee?")]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, seed=11)
    end = [renderer.end_of_turn]
    replies = [r + end if len(r) < params.max_tokens else r for r in kept.sample(prompts, params)]
    sequences = [p + r for p, r in zip(prompts, replies, strict=True)]
    before = stats(tinker_server)["requests"]
    from_sample = kept.compute_logprobs(sequences)
    assert stats(tinker_server)["requests"] == before  # answered from the sample's own log-probabilities
    computed = fresh.compute_logprobs(sequences)
    for got, want, p in zip(from_sample, computed, prompts, strict=True):
        assert got[len(p) - 1:] == want[len(p) - 1:]  # the sampled tokens: the same pass, the same bits
        assert got == pytest.approx(want, abs=1e-5)
    # other sequences, and other temperatures, go to the service as before
    assert kept.compute_logprobs([prompts[0] + [42, 43]]) == fresh.compute_logprobs([prompts[0] + [42, 43]])
    kept.sample(prompts, SamplingParams(max_tokens=4, temperature=0.7, top_p=0.9, seed=1))
    assert kept.sampled == {}


def test_tinker_stop_strings_and_ids_end_the_sample_at_the_token_that_completes_them(service, renderer):
    """What the cookbook's role_colon renderer asks (stop=["\n\nUser:"]): the sequence ends with the first token
    whose text completes a stop string (or is a stop id), and is the unstopped sample's prefix (same seed)."""
    sc = service.create_sampling_client(base_model=BASE).result()
    prompt = tinker.ModelInput.from_ints(renderer.prompt("Name three rivers of Europe, one per line."))

    def sample(stop):
        return sc.sample(prompt=prompt, num_samples=1, sampling_params=tinker.SamplingParams(
            max_tokens=24, temperature=1.0, seed=5, stop=stop)).result().sequences[0]

    free = sample(None)
    tokens = [t for t in free.tokens if t != renderer.end_of_turn]
    decode = renderer.tokenizer.decode
    stop = decode(tokens[:len(tokens) // 2 + 1])[-2:]  # two characters the sample spells by its middle
    first = next(i for i in range(len(tokens)) if stop in decode(tokens[:i + 1]))
    cut = sample([stop])
    assert cut.stop_reason == "stop" and list(cut.tokens) == tokens[:first + 1]
    assert cut.logprobs == pytest.approx(free.logprobs[:first + 1], abs=1e-5)
    by_id = sample([tokens[first]])
    assert list(by_id.tokens) == tokens[:tokens.index(tokens[first]) + 1]
    with pytest.raises(tinker.TinkerError, match="stop="):
        sample([""])


def test_tinker_rest_routes_list_get_ttl_and_delete_checkpoints(service, rest, tinker_server):
    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=0,
                                             user_metadata={"renderer_name": "qwen3_instruct"}).result()
    state = tc.save_state("s1", ttl_seconds=2 * HOUR).result().path
    sampler = tc.save_weights_for_sampler("s1").result().path
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == BASE and run.lora_rank == 4 and run.is_lora
    assert run.user_metadata == {"renderer_name": "qwen3_instruct"}
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == sampler
    assert rest.get_training_run_by_tinker_path(state).result().training_run_id == tc.model_id
    assert tc.model_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]

    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {"weights/s1", "sampler_weights/s1"}
    assert listed["weights/s1"].checkpoint_type == "training" and listed["weights/s1"].size_bytes > 0
    left = (listed["weights/s1"].expires_at - listed["weights/s1"].time).total_seconds()
    assert left == pytest.approx(2 * HOUR, abs=5)
    assert listed["sampler_weights/s1"].expires_at is None
    assert {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints} >= {state, sampler}
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert info.base_model == BASE and info.lora_rank == 4

    # the TTL: set, removed, refused out of its range; each answered at once (the SDK retries a 5xx for 5 minutes)
    started = time.monotonic()
    rest.set_checkpoint_ttl_from_tinker_path(state, 5 * HOUR).result()
    ttl_seconds = time.monotonic() - started
    expires = {c.checkpoint_id: c.expires_at for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert (expires["weights/s1"] - listed["weights/s1"].time).total_seconds() > 4 * HOUR
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()
    assert {c.checkpoint_id: c.expires_at for c in rest.list_checkpoints(tc.model_id).result().checkpoints}[
        "weights/s1"] is None
    started = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        rest.set_checkpoint_ttl_from_tinker_path(state, 60).result()
    with pytest.raises(tinker.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(f"tinker://{tc.model_id}/weights/nope", HOUR).result()
    assert time.monotonic() - started < 30, "a refused TTL must fail at once, not after the SDK's 5xx retries"
    print(f"set_checkpoint_ttl took {ttl_seconds * 1000:.0f} ms")
    with pytest.raises(tinker.TinkerError, match="ttl_seconds"):  # refused in its turn: later requests still run
        tc.save_state("s2", ttl_seconds=10).result()

    # an expired checkpoint is gone to every route (its expiry moved into the past, as time would)
    meta_file = tinker_server.data_dir / "models" / tc.model_id / "weights" / "s1" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "expires_at": time.time() - 1}))
    assert "weights/s1" not in {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert not meta_file.parent.exists()
    with pytest.raises(tinker.TinkerError, match="no checkpoint"):
        service.create_training_client_from_state(state).result()

    rest.delete_checkpoint_from_tinker_path(sampler).result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(sampler).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run("no-such-run").result()
    # a name already taken is refused unless overwrite is asked for
    tc.save_state("s3").result()
    with pytest.raises(tinker.TinkerError, match="overwrite"):
        tc.save_state("s3").result()


def test_tinker_unserved_routes_answer_at_once_and_are_logged(tinker_server):
    import httpx

    headers = {"X-API-Key": tinker_server.api_key}
    for method in ("GET", "PUT", "PATCH", "DELETE", "POST"):
        started = time.monotonic()
        response = httpx.request(method, f"{tinker_server.base_url}/api/v1/no/such/route", headers=headers, json={})
        assert response.status_code == 404 and "not implemented" in response.json()["detail"]
        assert time.monotonic() - started < 10
    log = tinker_server.log_path.read_text()
    assert '"method": "PATCH", "path": "/api/v1/no/such/route", "status": 404' in log


def test_tinker_external_weights_are_age_encrypted_to_the_recipients(service, rest, tinker_server, tmp_path):
    import httpx
    import pyrage
    from safetensors.torch import load

    tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
    identity = pyrage.x25519.Identity.generate()
    path = tc.save_weights_external("sealed", ttl_seconds=HOUR,
                                    age_encryption_recipients=[str(identity.to_public())]).result().path
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {"adapter_model.safetensors.age", "adapter_config.json.age"}
    folder = tinker_server.data_dir / "models" / tc.model_id / "external_weights" / "sealed"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json.age", "adapter_model.safetensors.age",
                                                       "meta.json"]  # no plain file, ever
    sealed = httpx.get(urls["adapter_config.json.age"]).content
    assert b"lora_alpha" not in sealed
    assert json.loads(pyrage.decrypt(sealed, [identity]))["r"] == 4
    weights = load(pyrage.decrypt(httpx.get(urls["adapter_model.safetensors.age"]).content, [identity]))
    assert any("lora_A" in name for name in weights)
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(sealed, [pyrage.x25519.Identity.generate()])
    with pytest.raises(tinker.TinkerError, match="age recipient"):
        tc.save_weights_external("bad", age_encryption_recipients=["not-a-key"]).result()
    assert tc.save_weights_external("plain").result().path.endswith("/plain")  # the model goes on


CLIENT = """
import sys, tinker
svc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
sc = svc.create_sampling_client(base_model=sys.argv[3]).result()
future = sc.sample(prompt=tinker.ModelInput.from_ints([1, 9690, 28, 198, 2683, 30]), num_samples=8,
                   sampling_params=tinker.SamplingParams(max_tokens=4000, temperature=2.0, seed=int(sys.argv[4])))
print("submitted", flush=True)
future.result()
"""


def wait_for(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - started


def long_batch(server, seed: int) -> subprocess.Popen:
    """A client process whose one request samples 8 x 4000 tokens (minutes on a CPU), once that batch runs."""
    batches = server.stats()["sample_batches"]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.base_url, server.api_key, BASE, str(seed)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **server.env()})
    assert client.stdout is not None and client.stdout.readline().strip() == "submitted"
    wait_for(lambda: server.stats()["sample_batches"] > batches, 300, "the long batch starting")
    time.sleep(2.0)  # loading the engine, then decoding
    return client


def test_tinker_work_stops_when_its_client_goes_away_and_sigterm_exits_promptly(tmp_path):
    """A client killed while its long sampling batch runs: the batch stops (not minutes later) and the server
    serves the next request; SIGTERM during a long batch ends the server within seconds."""
    with TinkerServer(tmp_path / "server", dtype="float32") as server:
        client = long_batch(server, 1)
        client.kill()
        client.wait()
        waited = wait_for(lambda: server.stats()["cancelled"] == 1, 120, "the batch stopping")
        print(f"the batch stopped {waited:.1f}s after its client was killed")
        assert "sampling cancelled" in server.log_path.read_text()
        with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as svc:
            reply = svc.create_sampling_client(base_model=BASE).result().sample(
                prompt=tinker.ModelInput.from_ints([1, 9690]), num_samples=1,
                sampling_params=tinker.SamplingParams(max_tokens=4, seed=2)).result()
        assert len(reply.sequences[0].tokens) <= 4

        client = long_batch(server, 3)
        try:
            assert server.pid is not None
            started = time.monotonic()
            os.kill(server.pid, signal.SIGTERM)
            assert server._process is not None
            server._process.wait(timeout=60)
            exited = time.monotonic() - started
        finally:
            client.kill()
            client.wait()
    print(f"SIGTERM to exit: {exited:.2f}s")
    assert exited < 10
    assert "tinker-server stopped" in Path(server.log_path).read_text()


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A local HF causal LM of another architecture than SmolLM2's (Qwen2, 2 layers, random weights, SmolLM2's
    tokenizer): what `--model` / `make tinker-server MODEL=...` serves."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from jobs.backends.model_files import model_dir

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir(BASE))
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tinker_serves_a_local_hf_model_given_with_model(tiny_qwen2, tmp_path, monkeypatch):
    """`--model NAME=DIR`: the folder is trained and sampled as base model NAME (Tinker's cross_entropy is the sum of
    -log p, here recomputed with transformers from the folder itself); a name it does not serve gets a 400 at once."""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))  # where the server links NAME to DIR
    name = "local/tiny-qwen2"
    tokens = [1, 9690, 28, 198, 2683, 30, 3249, 2]
    with TinkerServer(tmp_path / "server", dtype="float32", models={name: tiny_qwen2}) as server, \
            tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as svc:
        capabilities = tinker.RestClient(base_url=server.base_url, api_key=server.api_key).get_server_capabilities()
        assert name in [m.model_name for m in capabilities.result().supported_models]
        tc = svc.create_lora_training_client(base_model=name, rank=4).result()
        assert tc.get_tokenizer().encode("Bonn", add_special_tokens=False)
        datum = tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                             loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        loss = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        sc = svc.create_sampling_client(base_model=name).result()
        sequence = sc.sample(prompt=tinker.ModelInput.from_ints(tokens[:4]), num_samples=1,
                             sampling_params=tinker.SamplingParams(max_tokens=5, seed=1)).result().sequences[0]
        assert len(sequence.tokens) == len(sequence.logprobs or []) > 0
        with pytest.raises(tinker.BadRequestError, match="not served here"):
            svc.create_lora_training_client(base_model="Qwen/Qwen3-0.6B", rank=4).result()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens])).logits[0, :-1].log_softmax(-1)
    assert loss == pytest.approx(-float(logprobs.gather(1, torch.tensor(tokens[1:])[:, None]).sum()), rel=1e-4)
