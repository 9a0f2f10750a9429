"""Training jobs, run by the worker in each model's seq_id order: create or load a model, forward_backward, forward,
optim_step and the three kinds of saved weights."""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING

from jobs.backends.base import ADAPTER_WEIGHTS, Datum, TopK
from workflows.local.tinker.common import UserError, log
from workflows.local.tinker.records import Job, TrainModel
from workflows.local.tinker.wire import forward_backward_output

if TYPE_CHECKING:
    from workflows.local.tinker.state import Backend


def run(backend: Backend, job: Job):
    body, model = job.body, backend.models[job.model_id]
    if job.kind == "create_model":
        return create_model(backend, model, body)
    if job.kind == "load_new":
        return load_new(backend, model, body)
    if job.kind == "release":
        model.engine = None
        return {}
    if job.kind == "refused":
        raise UserError(job.body)
    if model.engine is None:
        raise UserError(f"model {model.model_id} failed to load, or its session has finished")
    return JOBS[job.kind](backend, model, body)


def create_model(backend: Backend, model: TrainModel, body: dict) -> dict:
    lora = body.get("lora_config") or {}
    model.engine = backend.engines.trainer(model.base_model, model.rank, model.seed)
    backend.checkpoints.record_run(model, body.get("user_metadata"), lora)
    log().info("model created", model_id=model.model_id, base_model=model.base_model, rank=model.rank,
               lora_seed=model.seed, train_unembed=lora.get("train_unembed", True))
    return {"model_id": model.model_id, "type": "create_model"}


def load_new(backend: Backend, model: TrainModel, body: dict) -> dict:
    folder = backend.checkpoints.resolve(body["path"], ("weights", "sampler_weights"))
    meta = backend.checkpoints.meta(folder)
    model.base_model, model.rank, model.seed = meta["base_model"], meta["rank"], meta["seed"]
    model.engine = backend.engines.trainer(model.base_model, model.rank, model.seed)
    _restore(model, folder, bool(body.get("optimizer")))
    source = backend.checkpoints.weights_info(body["path"])
    backend.checkpoints.record_run(model, body.get("user_metadata"),
                                   {k: source[k] for k in ("train_unembed", "train_mlp", "train_attn")})
    log().info("model created from checkpoint", model_id=model.model_id, path=body["path"],
               optimizer=bool(body.get("optimizer")))
    return {"path": body["path"], "model_id": model.model_id, "type": "load_weights"}


def load_weights(backend: Backend, model: TrainModel, body: dict) -> dict:
    folder = backend.checkpoints.resolve(body["path"], ("weights", "sampler_weights"))
    _restore(model, folder, bool(body.get("optimizer")))
    return {"path": body["path"], "model_id": model.model_id, "type": "load_weights"}


def _restore(model: TrainModel, folder, optimizer: bool) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if optimizer:
        if not (folder / "trainer_state.pt").is_file():
            raise UserError(f"{folder.name} has no optimizer state (a sampler checkpoint?)")
        model.engine.load_state(folder)
    else:
        set_peft_model_state_dict(model.engine.model, load_file(folder / ADAPTER_WEIGHTS))


def forward_backward(backend: Backend, model: TrainModel, body: dict) -> bytes:
    loss_fn, forward_only, data = body["loss_fn"], body["forward_only"], body["data"]
    if not data:
        raise UserError("no data")
    engine = model.engine
    vocab = int(engine.model.config.vocab_size)
    if any(not 0 <= t < vocab for d in data for row in [d["tokens"], *(d.get("candidates") or [])] for t in row):
        raise UserError(f"a token id outside the vocabulary (0..{vocab - 1})")
    datums = [Datum(d["tokens"], d["weights"], candidates=d.get("candidates"), probs=d.get("probs"),
                    sampled_logprobs=d.get("sampled_logprobs"), advantages=d.get("advantages")) for d in data]
    soft = data[0]["width"] is not None
    if forward_only:
        logprobs, loss = _forward(engine, loss_fn, datums, soft)
    else:
        engine.model.train()
        result = engine.forward_backward(datums, reduction="sum", logprobs=True, loss_fn=loss_fn)
        logprobs, loss = result["candidate_logprobs" if soft else "logprobs"], result["loss"]
        if loss_fn == "importance_sampling":
            logprobs = _every_position(engine, datums, logprobs)
    return forward_backward_output(logprobs, {"loss:sum": loss})


def _every_position(engine, datums: list[Datum], logprobs: list[list[float]]) -> list[list[float]]:
    """importance_sampling's outputs at the positions its loss skipped too (advantage 0: the prompt, and actions
    the advantages leave alone), as the service returns them and the cookbook's KL metrics read them: from a pass
    without gradient, so the loss and its gradients stay the local engine's, bit for bit."""
    if all(w for d in datums for w in d.weights[1:]):
        return logprobs
    every = engine.compute_logprobs([d.tokens for d in datums])
    return [[lp if w else full for lp, full, w in zip(row, all_row, d.weights[1:], strict=True)]
            for row, all_row, d in zip(logprobs, every, datums, strict=True)]


def _forward(engine, loss_fn: str, datums: list[Datum], soft: bool) -> tuple[list, float]:
    """forward(): the loss and the target log-probabilities at every position, no gradient."""
    if soft:  # row j of a datum: the distribution of its token j + 1, scored at its K targets
        logprobs: list = engine.target_logprobs([d.tokens for d in datums],
                                                [TopK(1, (d.candidates or [])[1:], []) for d in datums])
        loss = -sum(w * lp for d, rows in zip(datums, logprobs, strict=True)
                    for weights, row in zip((d.probs or [])[1:], rows, strict=True)
                    for w, lp in zip(weights, row, strict=True))
        return logprobs, loss
    logprobs = engine.compute_logprobs([d.tokens for d in datums])
    if loss_fn == "importance_sampling":
        loss = -sum(math.exp(lp - s) * a for d, row in zip(datums, logprobs, strict=True)
                    for lp, s, a in zip(row, (d.sampled_logprobs or [])[1:], (d.advantages or [])[1:], strict=True)
                    if a)
    else:
        loss = -sum(w * lp for d, row in zip(datums, logprobs, strict=True)
                    for w, lp in zip(d.weights[1:], row, strict=True))
    return logprobs, loss


def optim_step(backend: Backend, model: TrainModel, body: dict) -> dict:
    adam = body.get("adam_params")
    if adam is None:
        raise UserError("only Adam is supported here")
    model.engine.optim_step(float(adam.get("learning_rate", 1e-4)), beta1=float(adam.get("beta1", 0.9)),
                            beta2=float(adam.get("beta2", 0.95)), eps=float(adam.get("eps", 1e-12)),
                            weight_decay=float(adam.get("weight_decay", 0.0)),
                            grad_clip_norm=float(adam.get("grad_clip_norm", 0.0)))
    return {"metrics": {}}


def _name(body: dict) -> str:
    name = body.get("path")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise UserError(f"bad checkpoint name {name!r}")
    return name


def save_weights(backend: Backend, model: TrainModel, body: dict) -> dict:
    name = _name(body)
    backend.checkpoints.write(model, "weights", name, model.engine.save_state, ttl=body.get("ttl_seconds"),
                              overwrite=bool(body.get("overwrite")), user_metadata=body.get("user_metadata"))
    return {"path": f"tinker://{model.model_id}/weights/{name}", "type": "save_weights"}


def save_weights_for_sampler(backend: Backend, model: TrainModel, body: dict) -> dict:
    if body.get("path"):
        name = _name(body)
        backend.checkpoints.write(model, "sampler_weights", name, model.engine.model.save_pretrained,
                                  ttl=body.get("ttl_seconds"), overwrite=bool(body.get("overwrite")),
                                  user_metadata=body.get("user_metadata"))
        return {"path": f"tinker://{model.model_id}/sampler_weights/{name}", "type": "save_weights_for_sampler"}
    session = model.model_id.split(":train:")[0]
    sampling_id = f"{session}:sample:{body.get('sampling_session_seq_id')}"
    folder = backend.checkpoints.write(model, "sampler_weights", f"_session-{uuid.uuid4().hex[:8]}",
                                       model.engine.model.save_pretrained)
    with backend.lock:
        backend.samplers[sampling_id] = {"base_model": model.base_model, "model_path": None, "adapter": str(folder)}
    return {"sampling_session_id": sampling_id, "type": "save_weights_for_sampler"}


def save_weights_external(backend: Backend, model: TrainModel, body: dict) -> dict:
    name = _name(body)
    folder = backend.checkpoints.write(model, "external_weights", name, model.engine.model.save_pretrained,
                                       ttl=body.get("ttl_seconds"), recipients=body.get("_recipients"))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name != "meta.json")
    return {"path": f"tinker://{model.model_id}/external_weights/{name}", "size_bytes": size,
            "type": "save_weights_external"}


JOBS = {"load_weights": load_weights, "forward_backward": forward_backward, "optim_step": optim_step,
        "save_weights": save_weights, "save_weights_for_sampler": save_weights_for_sampler,
        "save_weights_external": save_weights_external}
