"""Typed pipeline configuration: a profile YAML plus `section.key=value` overrides.

One `PipelineConfig` holds every phase's section; a phase's `Config` (see `jobs.phases.base`) carries it
together with the run id and the store. Profiles ship inside the package so a container needs no mount.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# the registries of backends and objectives: the names `model.backend` and `train.objective` take, and the
# checks each one makes of the whole config (they import this module for types only)
from jobs.backends import BACKENDS
from jobs.errors import InputError
from jobs.inputs import MB, load_yaml, read_capped
from jobs.objectives import OBJECTIVES
from jobs.store import parse_s3_url

PROFILES = ("demo", "demo-large", "ci", "full")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    # -- the base model both teacher and student start from, as its Hub id
    base: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # -- local: the engine in this process (transformers + peft); tinker: the Tinker API (see the tinker section);
    # the registered backends (`jobs.backends`)
    backend: str = "local"
    # -- auto: bf16 where the hardware computes it natively (CUDA with bf16, CPU with AMX or AVX512-BF16), else float32
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # -- auto: CUDA when torch sees a GPU, else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the base model's context window: ingest refuses a card that leaves no room in it for prompt and reply
    context_tokens: int = Field(8192, ge=256)

    @field_validator("backend")
    @classmethod
    def _registered(cls, value: str) -> str:
        BACKENDS.get(value)  # one line naming the choices for any other
        return value


class SynthesisConfig(Section):
    """How the teacher engine writes prompts for a card (`jobs.synthesis`)."""

    temperature: float = Field(1.0, gt=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=8, le=256)
    batch_size: int = Field(64, ge=1, le=512)
    seed: int = 0
    # a round asks once for every slot still open; slots still open after the last round are reported
    max_rounds: int = Field(12, ge=1, le=100)
    # a candidate whose embedding has at least this cosine similarity to a kept prompt is a near-duplicate
    similarity: float = Field(0.9, gt=0.0, le=1.0)


class IngestConfig(Section):
    card: str = "builtin:beethoven"
    # a JSONL/Parquet file or S3 object, hf:<dataset>:<split>:<column>, builtin:<name> or `synthesize`; empty:
    # the shipped set for a built-in card, synthesized for any other
    prompts: str = ""
    # synthesize what a given prompt set lacks of ingest.limit
    top_up: bool = False
    synthesis: SynthesisConfig = SynthesisConfig()
    limit: int = Field(0, ge=0)  # 0: all prompts
    shards: int = Field(2, ge=1, le=256)
    min_words: int = Field(2, ge=1)
    max_words: int = Field(80, ge=1)
    # a card, prompt file or S3 object over this is refused before it is read whole
    max_input_mb: int = Field(16, ge=1, le=1024)

    @field_validator("card", "prompts")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        if value.startswith("s3:"):
            try:
                parse_s3_url(value)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value


class SamplingConfig(Section):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.2, ge=1.0, le=2.0)
    batch_size: int = Field(16, ge=1, le=512)
    seed: int = 0


class ConversationsConfig(Section):
    """Multi-turn teacher data: a simulated visitor asks follow-ups and the teacher answers them with the card."""

    # -- the share of the prompts that open a conversation instead of a single-turn example (chosen by a hash of
    # the prompt id, so each shard chooses alone); 0: every example is single-turn
    share: float = Field(0.0, ge=0.0, le=1.0)
    # -- assistant turns per conversation: the prompt's reply, then a follow-up question and reply per further turn
    # (a conversation ends early when the visitor has no question)
    turns: int = Field(4, ge=2, le=32)
    # -- how the visitor (the same engine without the card) samples its questions
    visitor: SamplingConfig = SamplingConfig(max_new_tokens=40, temperature=0.9)


class AuditConfig(Section):
    min_reply_words: int = Field(3, ge=1)
    max_reply_tokens: int = Field(512, ge=1)
    # a reply that names any of these is out of character
    forbidden: tuple[str, ...] = ("as an ai", "language model", "smollm", "hugging face", "i am an assistant")


class SplitConfig(Section):
    eval_count: int = Field(40, ge=1)
    # -- conversations held out whole in eval_conversations.jsonl (those with at least 3 turns, else the most),
    # never trained on; 0: none
    eval_conversations: int = Field(0, ge=0)
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    seed: int = 0

    @property
    def min_rows(self) -> int:
        """Rows split needs: the held-out eval rows and conversations and at least two to train on."""
        return self.eval_count + self.eval_conversations + 2


class TrainConfig(Section):
    # -- sft: the teacher's sampled replies as targets. logit: at every position of those replies, the teacher's
    # top-k next-token distribution (with the card) as the target (context distillation). on_policy: the student
    # samples without the card, the teacher scores the same tokens with it, and the per-token difference is the
    # advantage of an importance-sampling loss (reverse KL, as tinker-cookbook's on-policy distillation); the
    # registered objectives (`jobs.objectives`), each of which checks the settings it reads
    objective: str = "logit"
    # -- logit: how many of the teacher's most likely tokens a position keeps as its target. The target carries no
    # mass beyond them, so the student learns to put none there: with 32 it closed ~40% of the held-out KL (the
    # teacher's tail it lost), with 256 ~74% (demo data, 60 steps)
    top_k: int = Field(256, ge=1, le=1024)
    # -- logit: the share of each position's target moved onto the token the teacher sampled there (0: the
    # teacher's distribution alone, 1: sft's target). The distribution alone closes most of the KL but its
    # student keeps the base's third-person voice; sft's takes the voice and loses the distribution
    sampled_weight: float = Field(0.0, ge=0.0, le=1.0)
    # -- on_policy: SFT steps before the on-policy ones (a warm start)
    warm_start_steps: int = Field(0, ge=0)
    # -- on_policy: the longest reply the student samples per prompt, and its sampling temperature
    rollout_tokens: int = Field(64, ge=1, le=4096)
    rollout_temperature: float = Field(1.0, gt=0.0, le=2.0)
    steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(5e-4, gt=0.0, lt=1.0)
    lora_rank: int = Field(16, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1)
    # tokens of a training row kept (the rest cut): the demo's four-turn conversations run to ~470, and a cut
    # conversation trains nothing of its later turns
    max_seq_len: int = Field(512, ge=16)
    checkpoint_every: int = Field(20, ge=1)
    val_every: int = Field(20, ge=1)
    seed: int = 0

    @field_validator("objective")
    @classmethod
    def _registered(cls, value: str) -> str:
        OBJECTIVES.get(value)  # one line naming the choices for any other
        return value


class PricesConfig(Section):
    # -- dollars per million tokens, defaults are Tinker's listed price band for small models
    input_per_mtok: float = Field(0.10, ge=0.0)
    output_per_mtok: float = Field(0.30, ge=0.0)


class EvaluateConfig(Section):
    sampling: SamplingConfig = SamplingConfig(temperature=0.0)
    latency_requests: int = Field(6, ge=1)
    # -- the teacher's most likely tokens per position that KL(teacher || model) sums over (the rest of the
    # vocabulary is one bucket, so the figure is a lower bound that tightens as k grows)
    kl_top_k: int = Field(256, ge=1, le=4096)
    # -- training prompts (never eval ones) the in-character judge learns from: the teacher's replies to them
    # against the base model's (without the card, sampled as the teacher samples)
    judge_prompts: int = Field(80, ge=8)
    # -- persona check prompts (jobs/assets/persona/checks.yaml) per check at most: identity, holding the role,
    # knowledge boundary; capability asks twice as many, the consistency conversations half as many
    persona_prompts: int = Field(8, ge=1, le=8)
    # -- the rubric judge: the teacher model grades every held-out reply 1-5 on in character, voice and knowledge
    # boundary (jobs/assets/persona/rubric.yaml), and its agreement with the embedding and n-gram judges is reported.
    # On in the full profile only: the demo's 135M model is too small to grade (to follow a rubric and answer in its
    # format); and the grading asks the base model once more per reply of each role
    rubric_judge: bool = False
    prices: PricesConfig = PricesConfig()


class ExportConfig(Section):
    check_prompts: int = Field(3, ge=1)
    logits_atol: float = Field(0.02, gt=0.0)  # float32 merge reorders sums: ~1e-4 relative


class PublishConfig(Section):
    repo_id: str = ""  # empty: dry run
    private: bool = True


class TinkerPricesConfig(Section):
    # -- dollars per million tokens; the defaults are Tinker's listed prices for Qwen3-4B-Instruct-2507 on
    # 2026-01-05: set them from the current price list for your base model
    prefill_per_mtok: float = Field(0.07, ge=0.0)
    sample_per_mtok: float = Field(0.22, ge=0.0)
    train_per_mtok: float = Field(0.22, ge=0.0)


class TinkerConfig(Section):
    # -- the API's address; empty: $TINKER_BASE_URL, else the SDK's default (the hosted service)
    base_url: str = ""
    # -- sampling and log-probability requests kept in flight at once
    max_in_flight: int = Field(64, ge=1, le=2000)
    # -- what the run's token usage costs, in the report
    prices: TinkerPricesConfig = TinkerPricesConfig()


class PipelineConfig(Section):
    profile: str = "demo"
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    teacher: SamplingConfig = SamplingConfig()
    conversations: ConversationsConfig = ConversationsConfig()
    audit: AuditConfig = AuditConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    publish: PublishConfig = PublishConfig()
    tinker: TinkerConfig = TinkerConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.train.checkpoint_every > self.train.steps:
            raise ValueError("train.checkpoint_every must not exceed train.steps")
        if self.split.eval_conversations and not self.conversations.share:
            raise ValueError("split.eval_conversations needs conversations (conversations.share > 0)")
        # what the chosen objective and backend require of the rest (Tinker's fixed limits...)
        OBJECTIVES.get(self.train.objective).check(self)
        BACKENDS.get(self.model.backend).check(self)
        return self

    def section_hash(self, *names: str) -> str:
        """A stable hash of the named sections, so a phase reruns only when its own settings change."""
        return digest({name: getattr(self, name).model_dump(mode="json") for name in names})


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise InputError(f"override {dotted}: {key} is not a section")
    node[leaf] = load_yaml(raw, f"--set {dotted}")


def user_layers(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                inline: str = "") -> dict:
    """What the user puts over a profile: a YAML file, then inline YAML (the DAG's `config` parameter),
    then `section.key=value` overrides, each on top of the one before."""
    tree: dict = {}
    if config_file:
        # read before any setting exists, so under the default input cap
        data = read_capped(config_file, IngestConfig.model_fields["max_input_mb"].default * MB)
        _deep_update(tree, _mapping(data, config_file))
    if inline.strip():
        _deep_update(tree, _mapping(inline, "--config-yaml"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r}: expected section.key=value")
        _set_path(tree, key.strip(), raw)
    return tree


def backend_override(backend: str) -> list[str]:
    """The `--backend` option of the CLIs as a setting: empty keeps the profile's and config's."""
    return [f"model.backend={backend}"] if backend else []


def load_pipeline_config(profile: str = "demo", config_file: str | None = None,
                         overrides: list[str] | tuple[str, ...] = (), inline: str = "") -> PipelineConfig:
    """The named built-in profile with the user's layers on top, validated."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    tree = yaml.safe_load(resources.files("jobs.assets.profiles").joinpath(f"{profile}.yaml").read_text()) or {}
    _deep_update(tree, user_layers(config_file, overrides, inline))
    tree["profile"] = profile
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = " " + ".".join(str(p) for p in first["loc"]) if first["loc"] else ""
        message = first["msg"].removeprefix("Value error, ")
        raise InputError(f"config{where}: {message} (profile {profile}"
                         f"{', ' + config_file if config_file else ''})") from None


def _mapping(data: bytes | str, where: str) -> dict:
    extra = load_yaml(data, where) or {}
    if not isinstance(extra, dict):
        raise InputError(f"{where}: config must be a mapping")
    return extra


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
