"""Thinking Machines' tinker-cookbook (0.6.1, unchanged; `make setup` installs it) as a client of the project's Tinker
stand-in, on tiny settings: its supervised loop with resume, its off-policy distillation step (top-k soft targets),
its on-policy distillation step (rollouts with the sampled log-probabilities) and `weights.download` (age-encrypted
export, TTL renewal, delete). What passes here is what a user of the hosted service runs, pointed at the stand-in.

The cookbook needs two things the hosted service's users get elsewhere: `renderer_name` (SmolLM2 is not in its
model table; its ChatML renderer `qwen3_instruct` matches SmolLM2's template when a system message is present) and
its tokenizer from the Hugging Face cache, offline: `hf_cache` lays the project's SmolLM2 files out as that cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
from pathlib import Path

import chz
import pytest
import tinker
import tiny_model
from tinker_cookbook import renderers, weights
from tinker_cookbook.distillation import train_off_policy, train_on_policy
from tinker_cookbook.distillation.datasets import DistillationDatasetConfig, PromptOnlyDataset, TeacherConfig
from tinker_cookbook.rl.types import RLDatasetBuilder
from tinker_cookbook.supervised import train as supervised_train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import get_tokenizer

from jobs.backends.model_files import model_dir

BASE = tiny_model.NAME  # the tiny test model: these tests are about the wire, not the weights
RENDERER = "qwen3_instruct"
SYSTEM: renderers.Message = {"role": "system", "content": "You are Ludwig van Beethoven. Answer briefly."}
CONVERSATIONS = [("Who taught you?", "Haydn, though I learned little from him."),
                 ("Do you like coffee?", "Exactly sixty beans a cup, counted."),
                 ("Where were you born?", "In Bonn, by the Rhine."),
                 ("What is your favourite key?", "C minor: fate knocks in it."),
                 ("Can you hear me?", "Write it down; my ears fail me."),
                 ("Do you improvise?", "Every evening, and better than I write."),
                 ("Who is Elise?", "A secret I keep."),
                 ("Is music your life?", "It is the only thing that saved it.")]

pytestmark = pytest.mark.tinker


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """The Hugging Face hub cache layout (models--org--name/snapshots/<rev>, refs/main) around the project's
    SmolLM2 files (links, without the weights), and the hub pointed at it offline: the cookbook's get_tokenizer(BASE)
    resolves there. Set in the environment (for subprocesses) and in huggingface_hub's constants, which it reads
    once, at import."""
    from huggingface_hub import constants

    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / f"models--{BASE.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in model_dir(BASE).iterdir():
        if file.suffix != ".safetensors":
            (snapshot / file.name).symlink_to(file)
    saved = {name: (os.environ.get(name), getattr(constants, name)) for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = str(hub), "1"
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(hub), True
    yield hub
    for name, (env, value) in saved.items():
        setattr(constants, name, value)
        if env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env


@pytest.fixture(scope="module")
def server(tinker_server, hf_cache):
    """The session's stand-in, its key in the environment (the cookbook's clients read $TINKER_API_KEY)."""
    saved = {name: os.environ.get(name) for name in tinker_server.env()}
    os.environ.update(tinker_server.env())
    yield tinker_server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _root_logging():
    """The cookbook's setup_logging replaces the root logger's handlers (a console and a file one): put back
    pytest's own after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": [SYSTEM, {"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in CONVERSATIONS))
    return path


def conversation_builder(path: Path) -> FromConversationFileBuilder:
    return FromConversationFileBuilder(file_path=str(path), common_config=ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=BASE, renderer_name=RENDERER, max_length=128, batch_size=2))


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]


def test_tinker_cookbook_supervised_loop_resumes_from_its_checkpoint(server, conversations, tmp_path):
    def config(log_path: Path) -> supervised_train.Config:
        return supervised_train.Config(log_path=str(log_path), model_name=BASE, recipe_name="stand-in-sl",
                                       renderer_name=RENDERER, dataset_builder=conversation_builder(conversations),
                                       learning_rate=2e-3, lora_rank=8, base_url=server.base_url, save_every=2,
                                       eval_every=0, infrequent_eval_every=0, submit_ahead=0)

    first = tmp_path / "first"
    asyncio.run(supervised_train.main(config(first)))
    rows = checkpoints(first)
    assert [row["name"] for row in rows] == ["000002", "final"]
    assert [row["step"] for row in metrics(first)] == [0, 1, 2, 3]
    assert all(math.isfinite(row["train_mean_nll"]) for row in metrics(first))
    rest = tinker.RestClient(base_url=server.base_url)
    run = rest.get_training_run_by_tinker_path(rows[0]["state_path"]).result()
    assert run.base_model == BASE and run.user_metadata["renderer_name"] == RENDERER
    saved = {c.checkpoint_id: c for c in rest.list_checkpoints(run.training_run_id).result().checkpoints}
    assert set(saved) == {"weights/000002", "sampler_weights/000002", "weights/final", "sampler_weights/final"}
    assert saved["weights/000002"].expires_at is not None and saved["weights/final"].expires_at is None  # 7 days

    # a run killed after its step-2 checkpoint: its log folder holds that checkpoint as the last one
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    (resumed / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
    asyncio.run(supervised_train.main(config(resumed)))
    log = (resumed / "logs.log").read_text()  # the cookbook's own log, of both runs
    assert f"Resumed training from {rows[0]['state_path']}" in log
    assert "Renderer metadata matches" in log  # read back from the training run (a 404 before)
    assert [row["step"] for row in metrics(resumed)] == [0, 1, 2, 3]
    again = checkpoints(resumed)  # the resumed run saves its step 2 again, in its own training run
    assert [row["name"] for row in again] == ["000002", "000002", "final"]
    assert rest.get_training_run_by_tinker_path(again[-1]["state_path"]).result().training_run_id != run.training_run_id


def test_tinker_cookbook_off_policy_distillation_step_trains_on_top_k_soft_targets(server, conversations, tmp_path):
    """One step of `distillation.train_off_policy`: the teacher's top-4 (the stand-in's topk_prompt_logprobs) as
    (N, 4) soft targets of cross_entropy. The student starts as the teacher (same base, LoRA B = 0), so its loss is
    the sum over the reply positions of the cross-entropy of the renormalised top-4 with itself: recomputed here
    from the local engine."""
    from jobs.backends.local import LocalEngine
    from jobs.config import ModelConfig

    log_path = tmp_path / "off-policy"
    asyncio.run(train_off_policy.main(train_off_policy.Config(
        learning_rate=1e-3, model_name=BASE, recipe_name="stand-in-off-policy", renderer_name=RENDERER,
        dataset_configs=[train_off_policy.DatasetWithTeacher(dataset_builder=conversation_builder(conversations),
                                                             teacher_config=TeacherConfig(base_model=BASE))],
        lora_rank=8, n_teacher_targets=4, batch_size=2, max_steps=1, log_path=str(log_path),
        base_url=server.base_url)))
    [step] = metrics(log_path)
    loss = step["train/loss:sum"]

    train, _ = conversation_builder(conversations)()
    datums, _ = train_off_policy._CompositeSupervisedDataset([train], [1.0], 2).get_batch(0)
    engine = LocalEngine.for_sampling(ModelConfig(base=BASE, dtype="float32", device="cpu"))
    expected = 0.0
    for datum in datums:
        targets = datum.loss_fn_inputs["target_tokens"].to_numpy().tolist()
        sequence = datum.model_input.to_ints() + targets[-1:]
        [top] = engine.topk_logprobs([sequence], [1], 4)
        for i, weight in enumerate(datum.loss_fn_inputs["weights"].to_numpy().tolist()):
            if weight > 0:  # target i is token i + 1: row i of the top-k (which starts at position 1)
                logprobs = top.logprobs[i]
                norm = math.log(sum(math.exp(x) for x in logprobs))
                expected -= sum(math.exp(x - norm) * x for x in logprobs)
    assert loss == pytest.approx(expected, rel=1e-3)
    assert [row["name"] for row in checkpoints(log_path)] == ["final"]


@chz.chz
class Prompts(RLDatasetBuilder):
    """The questions as a prompt-only RL dataset (the cookbook's own PromptOnlyDataset, without its downloads)."""

    questions: list[str]
    groups_per_batch: int
    group_size: int

    async def __call__(self) -> tuple[PromptOnlyDataset, None]:
        tokenizer = get_tokenizer(BASE)
        renderer = renderers.get_renderer(RENDERER, tokenizer=tokenizer)
        return PromptOnlyDataset(self.questions, self.groups_per_batch, self.group_size, renderer, tokenizer,
                                 convo_prefix=[SYSTEM]), None


def test_tinker_cookbook_on_policy_distillation_step_uses_the_sampled_logprobs(server, tmp_path):
    """One step of `distillation.train_on_policy`: rollouts through TinkerTokenCompleter (which asserts the sampled
    log-probabilities), the teacher's compute_logprobs as a KL penalty, importance_sampling. The teacher is the
    student's base and the student starts as it, so both KL figures are 0 when the sampled log-probabilities are
    right: teacher_kl (sampled vs the teacher's compute_logprobs) and kl_sample_train (sampled vs the training
    forward pass)."""
    log_path = tmp_path / "on-policy"
    questions = [q for q, _ in CONVERSATIONS[:2]]
    asyncio.run(train_on_policy.main(train_on_policy.Config(
        learning_rate=1e-3, model_name=BASE, recipe_name="stand-in-on-policy", renderer_name=RENDERER,
        dataset_configs=[DistillationDatasetConfig(
            dataset_builder=Prompts(questions=questions, groups_per_batch=2, group_size=2),
            teacher_config=TeacherConfig(base_model=BASE), groups_per_batch=2)],
        max_tokens=12, lora_rank=8, log_path=str(log_path), base_url=server.base_url, max_steps=1, eval_every=0)))
    [step] = metrics(log_path)
    assert step["teacher_kl"] == pytest.approx(0.0, abs=1e-4)
    assert step["optim/kl_sample_train_v1"] == pytest.approx(0.0, abs=1e-4)
    assert step["optim/entropy"] > 0  # real log-probabilities, not zeros
    assert [row["name"] for row in checkpoints(log_path)][-1] == "final"


def test_tinker_cookbook_weights_download_decrypts_a_training_checkpoint(server, tmp_path):
    """`weights.download` of a training state: the cookbook loads it into a new run, exports it age-encrypted with a
    one-hour TTL, renews the TTL (PUT .../ttl), downloads and decrypts it, and deletes the export."""
    from safetensors.torch import load_file

    with tinker.ServiceClient(base_url=server.base_url) as service:
        tc = service.create_lora_training_client(base_model=BASE, rank=4, seed=0).result()
        state = tc.save_state("for-download").result().path
    out = tmp_path / "adapter"
    weights.download(tinker_path=state, output_dir=str(out), base_url=server.base_url)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(server.data_dir / "models" / tc.model_id / "weights" / "for-download"
                      / "adapter_model.safetensors")
    downloaded = load_file(out / "adapter_model.safetensors")
    assert downloaded.keys() == saved.keys() and all((downloaded[k] == saved[k]).all() for k in saved)
    log = server.log_path.read_text()
    assert '"method": "PUT"' in log and "/ttl" in log
    exports = [c for c in tinker.RestClient(base_url=server.base_url).list_user_checkpoints(limit=1000).result()
               .checkpoints if c.checkpoint_id == "external_weights/download"]
    assert exports == []  # the temporary export is deleted
