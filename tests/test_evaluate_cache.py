"""Evaluate's cache of the parts that do not depend on the student (`jobs.evaluation.cache`): what its keys hold,
that entries come back exactly as written, and which figures it says came from it. No model runs here; the
end-to-end check (a warm run gives a cold run's figures) is in test_pipeline."""

from __future__ import annotations

from conftest import phase_config, store_for

from jobs.backends.base import TopK
from jobs.evaluation.cache import PartCache, decode, encode
from jobs.metrics import (
    CAPABILITY_DROP,
    COST_PER_REQUEST,
    COST_RATIO,
    KEYS,
    PERSONA_PROMPTS,
    PERSONA_SIMILARITY,
    PROMPT_COST_RATIO,
    PROMPT_TOKENS,
    REPLY_TOKENS,
    TOKEN_REDUCTION,
)
from jobs.phases.evaluate import BASE_PARTS, PARTS, STUDENT_PARTS, common_key, from_cache, part_keys
from jobs.store import ArtifactStore, StoreSettings

SPLIT = {"fingerprint": "f" * 64, "outputs": {name: {"sha256": name} for name in
                                              ("eval.jsonl", "eval_conversations.jsonl", "train.jsonl")}}
PRECISION = {"device": "cpu", "dtype": "float32"}


def keys(*overrides: str, split: dict = SPLIT, precision: dict = PRECISION, system: str = "card",
         card_name: str = "Ada") -> dict[str, str]:
    pipeline = phase_config("keys-test", *overrides).pipeline
    cache = PartCache(ArtifactStore(StoreSettings(), "keys-test"), common_key(split, pipeline, precision, "local",
                                                                                  system, card_name))
    return part_keys(cache, pipeline, precision)


def changed(*overrides: str, **common) -> set[str]:
    """The base parts whose cache entry another config (or split, precision, card) would not find."""
    before, after = keys(), keys(*overrides, **common)
    return {name for name in before if before[name] != after[name]}


def test_training_settings_leave_every_key_as_it_is():
    # what `make objectives` changes between its runs on one split
    assert changed("train.steps=3", "train.objective=sft", "train.learning_rate=0.01", "export.check_prompts=1",
                   "audit.min_reply_words=5") == set()


def test_a_key_changes_with_what_its_part_reads_and_only_that():
    every = {part.name for part in BASE_PARTS}
    assert changed(split={**SPLIT, "fingerprint": "0" * 64}) == every
    assert changed(split={**SPLIT, "outputs": {**SPLIT["outputs"], "train.jsonl": {"sha256": "other"}}}) == every
    assert changed("model.dtype=bfloat16") == every
    assert changed(precision={"device": "cuda", "dtype": "float32"}) == every
    assert changed(system="another card") == every
    assert changed(card_name="Augusta Ada King") == every  # the persona checks ask by name
    persona = {"base persona checks", "teacher persona checks"}  # greedy, at evaluate's settings, with and without
    assert changed("evaluate.sampling.max_new_tokens=9") == {"base replies", "latency", "base conversations", *persona,
                                                             "base own conversations"}
    assert changed("evaluate.sampling.seed=4") == {"base replies", "latency", "base conversations", "judge replies",
                                                   "teacher resampled", "teacher resampled conversations", *persona,
                                                   "base own conversations", "teacher own conversations"}
    assert changed("teacher.temperature=0.5") == {"judge replies", "teacher resampled",
                                                  "teacher resampled conversations",
                                                  "teacher own conversations"}
    assert changed("evaluate.kl_top_k=8") == {"teacher top-k", "base KL"}
    assert changed("evaluate.judge_prompts=9") == {"judge replies"}
    assert changed("evaluate.latency_requests=2") == {"latency"}
    # only the base parts have keys: the student's run every time
    assert set(keys()) == every and not every & {part.name for part in STUDENT_PARTS}


def test_entries_come_back_exactly_as_written():
    tops = [TopK(5, [[7, 3], [2, 9, 4]], [[-0.1 + -0.2, -3.0000001192092896], [-1e-300, -2.5, -7.25]]),
            TopK(3, [], [])]
    back = decode(encode({"teacher_topk": tops}), topk=True)["teacher_topk"]
    assert back == tops and all(type(v) is float for t in back for row in t.logprobs for v in row)
    found = {"turns": {"base": {1: ["a", "b"], 3: ["c"]}}, "own_turns": {"base": {2: ["d"]}},
             "repeated": {"base": [["e", "f", "g"]]}, "latency": {"latency_ratio": 0.1 + 0.2}}
    assert decode(encode(found), topk=False) == found


def test_an_entry_is_read_from_the_store_and_a_damaged_one_is_computed_again(store_env):
    cache = PartCache(store_for("cache-test"), {"data": "d"})
    key = cache.key("teacher top-k", {"kl_top_k": 2})
    assert not cache.has(key) and cache.get(key, topk=True) is None
    tops = [TopK(1, [[1, 2]], [[-0.5, -1.5]])]
    cache.put(key, {"teacher_topk": tops})
    assert cache.has(key) and cache.get(key, topk=True) == {"teacher_topk": tops}
    assert key.startswith("cache/evaluate/") and key.endswith("/teacher-top-k")
    cache.store.put_bytes(key, b"PK\x03\x04 not a whole archive")
    assert cache.get(key, topk=True) is None
    # an edit that still decodes is found by the digest recorded at the write, not trusted
    latency = cache.key("latency", {"requests": 1})
    cache.put(latency, {"latency": {"latency_ratio": 2.0}})
    cache.store.put_bytes(latency, encode({"latency": {"latency_ratio": 0.5}}))
    assert decode(cache.store.get_bytes(latency), topk=False) == {"latency": {"latency_ratio": 0.5}}
    assert cache.get(latency, topk=False) is None


def test_the_figures_from_the_cache_are_those_only_cached_parts_feed():
    assert from_cache([]) == []
    cached = from_cache([part.name for part in BASE_PARTS])
    assert {"nll_base", "nll_teacher", "kl_base", "judge_accuracy", "lexical_judge_accuracy", "similarity_base",
            "in_character_teacher_resampled", "in_character_turn_3_on_base", "latency_ratio"} <= set(cached)
    student = {key for part in STUDENT_PARTS for key in part.feeds}
    assert not student & set(cached) and {"kl_closed", "similarity_student", "nll_student"} <= student
    assert {"identity_base", "capability_teacher", "consistent_base"} <= set(cached)
    assert {CAPABILITY_DROP.key, "consistent_student", "in_character_own_turn_3_on_student"} <= student
    # a figure only the base's replies and the judge feed is not from the cache while one of them was computed
    assert "in_character_base" not in from_cache([p.name for p in BASE_PARTS if p.name != "judge replies"])
    # every figure a model gives is fed by a part: the rest come from the split's tokens, the prices and the
    # persona checks' prompts alone
    fed = {key for part in PARTS for key in part.feeds}
    assert set(KEYS) - fed == {*PROMPT_TOKENS.keys, TOKEN_REDUCTION.key, REPLY_TOKENS.key, *COST_PER_REQUEST.keys,
                               COST_RATIO.key, PROMPT_COST_RATIO.key, PERSONA_SIMILARITY.of("teacher"),
                               *PERSONA_PROMPTS.keys}
    assert fed <= set(KEYS)
