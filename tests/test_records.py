"""The conversation record (`jobs.records`): one shape from the teacher's output through the audit to the split,
on hand-written records through the real phases and the local S3 server (no model); and no phase imports another."""

from __future__ import annotations

import ast
import dataclasses

import pytest
from conftest import REPO, phase_config, store_for

from jobs import records
from jobs.errors import InputError
from jobs.phases import audit, split
from jobs.phases.base import run_unit

PHASES_DIR = REPO / "jobs" / "phases"
# what every phase may import: the phase table and the skip-or-run logic
SHARED = {"jobs.phases", "jobs.phases.base"}
TEACHER_KEYS = {"id", "prompt", "messages", "turns", "reply_tokens", "finished", "prompt_tokens_with_card",
                "prompt_tokens_without_card"}
AUDIT_KEYS = {"trimmed", "cut_at", "cut_reason"}  # what the audit may add


def imported_modules(source: str, package: str = "jobs.phases") -> set[str]:
    """Every module a source imports, and for `from M import x` also `M.x` (x may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            within = parts[:len(parts) + 1 - node.level] if node.level else []  # a relative import's package
            base = ".".join([*within, *([node.module] if node.module else [])])
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return found


def phase_imports() -> dict[str, list[str]]:
    """Each phase module's imports of other phase modules."""
    phases = {f"jobs.phases.{path.stem}" for path in PHASES_DIR.glob("*.py")} - {"jobs.phases.__init__"} - SHARED
    return {path.stem: sorted(imported_modules(path.read_text()) & phases) for path in sorted(PHASES_DIR.glob("*.py"))}


def test_no_phase_imports_another():
    assert {name: found for name, found in phase_imports().items() if found} == {}


def test_the_import_check_sees_every_way_of_importing_a_phase():
    for source in ("from jobs.phases.train import read_adapter", "from jobs.phases import train",
                   "import jobs.phases.train", "from . import train", "from .train import x",
                   "def f():\n    from jobs.phases.train import x\n"):
        assert "jobs.phases.train" in imported_modules(source), source
    assert imported_modules("from jobs.phases import PHASE") == {"jobs.phases", "jobs.phases.PHASE"}
    assert "jobs.phases.base" in imported_modules("from .base import run_unit")


def record(id_: str, *replies: str, unfinished: tuple[int, ...] = ()) -> dict:
    """A teacher record written out by hand: turn k asks "Question k of <id>?" and replies `replies[k - 1]`."""
    messages = [{"role": role, "content": text} for k, reply in enumerate(replies, start=1)
                for role, text in (("user", f"Question {k} of {id_}?"), ("assistant", reply))]
    return {"id": id_, "prompt": f"Question 1 of {id_}?", "messages": messages, "turns": len(replies),
            "reply_tokens": [len(reply.split()) for reply in replies],
            "finished": [k not in unfinished for k in range(1, len(replies) + 1)],
            "prompt_tokens_with_card": 300, "prompt_tokens_without_card": 12}


SHARDS = {
    0: [record("b-01", "I wrote nine symphonies."),
        record("b-02", "Vienna suits me well.", "As an AI language model, I cannot say."),
        record("b-03", "My piano is loud. And then I", unfinished=(1,))],
    1: [record("b-04", "Coffee, sixty beans a cup.", "Schindler, my secretary. He writes", unfinished=(2,)),
        record("b-05", "As an AI, I do not compose."),
        record("b-06", "Bonn was my first home.", "Karl, my nephew, worries me."),
        record("b-07", "Haydn taught me, a little."),
        record("b-08", "The ninth has a choir.")],
}


def teacher_output(run_id: str, shards: dict[int, list[dict]]):
    """An ingest unit that lists the shards and one teacher unit per shard holding `shards[i]`, written through the
    real run_unit as the phases write them."""
    config = phase_config(run_id, "split.eval_count=2", "split.eval_conversations=1")

    def ingest(out) -> None:
        out.metrics["shards"] = sorted(shards)

    run_unit(config, "ingest", ingest)
    for shard, rows in shards.items():
        run_unit(dataclasses.replace(config, shard=shard), "teacher",
                 lambda out, rows=rows: out.write_jsonl("conversations.jsonl", rows), extra_key=shard)
    return config


def test_a_record_keeps_its_shape_from_the_teacher_through_the_audit_to_the_split(store_env):
    assert all(records.problem(row) is None for rows in SHARDS.values() for row in rows)
    config = teacher_output("records-1", SHARDS)
    audit.main(config)
    split.main(config)
    store = store_for("records-1")
    kept = store.read_jsonl("audit", "kept.jsonl")
    files = {name: store.read_jsonl("split", name)
             for name in ("train.jsonl", "val.jsonl", "eval.jsonl", "eval_conversations.jsonl")}
    for row in kept + [row for rows in files.values() for row in rows]:
        assert records.problem(row) is None, row
        assert TEACHER_KEYS <= set(row) <= TEACHER_KEYS | AUDIT_KEYS, row
    by_id = {row["id"]: row for row in kept}
    assert list(by_id) == ["b-01", "b-02", "b-03", "b-04", "b-06", "b-07", "b-08"]  # every shard, by id
    teacher = {row["id"]: row for rows in SHARDS.values() for row in rows}
    assert by_id["b-06"] == teacher["b-06"] and by_id["b-01"] == teacher["b-01"]  # passed: untouched
    assert by_id["b-02"] == {**records.cut(teacher["b-02"], 1), "cut_at": 2, "cut_reason": "out_of_character"}
    assert by_id["b-03"]["messages"][1]["content"] == "My piano is loud." and by_id["b-03"]["trimmed"] == [1]
    assert by_id["b-03"]["finished"] == [False]  # as the teacher sampled it
    assert records.replies(by_id["b-04"]) == ["Coffee, sixty beans a cup.", "Schindler, my secretary."]
    assert (by_id["b-04"]["turns"], by_id["b-04"]["trimmed"]) == (2, [2])
    assert store.read_jsonl("audit", "dropped.jsonl") == [{**teacher["b-05"], "reason": "out_of_character"}]
    assert store.read_jsonl("audit", "cut.jsonl") == [
        {"id": "b-02", "reason": "out_of_character", "turn": 2, "question": "Question 2 of b-02?",
         "reply": "As an AI language model, I cannot say.", "reply_tokens": 8, "finished": True}]
    # the split moves records; a held-out conversation is whole, and the eval rows are single turns
    assert sorted(row["id"] for rows in files.values() for row in rows) == sorted(by_id)
    (held,) = files["eval_conversations.jsonl"]
    assert held == by_id[held["id"]] and held["turns"] == 2
    for row in files["eval.jsonl"]:  # a conversation there is its first turn
        whole = by_id[row["id"]]
        assert row == (whole if whole["turns"] == 1 else records.first_turn(whole)) and row["turns"] == 1
    for row in files["train.jsonl"] + files["val.jsonl"]:
        assert row == by_id[row["id"]]
    assert store.read_json("audit", "audit.json")["dropped_by_turn"] == {"1": {"out_of_character": 1},
                                                                       "2": {"out_of_character": 1}}


def test_a_record_in_another_shape_is_a_one_line_error(store_env):
    old = {"id": "b-01", "prompt": "Who?", "reply": "Ludwig.", "reply_tokens": 2, "finished": True,
           "followups": [{"question": "Why?", "reply": "Because.", "reply_tokens": 1, "finished": True}]}
    config = teacher_output("records-2", {0: [record("b-02", "Fine, thank you.")], 1: [old]})
    with pytest.raises(InputError) as caught:
        audit.main(config)
    message = str(caught.value)
    assert message.startswith("runs/records-2/teacher/shard-00001/conversations.jsonl:1: not a conversation record: ")
    assert "\n" not in message


@pytest.mark.parametrize("change, problem", [
    ({"turns": 1}, "`turns` is 1, `messages` holds 2 assistant turns"),
    ({"finished": [True]}, "`finished` must hold one entry per assistant turn (2)"),
    ({"messages": [{"role": "system", "content": "card"}, {"role": "user", "content": "Q?"}]}, "must alternate"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "Another question?"}, "the `prompt` its first message asks"),
])
def test_records_that_disagree_with_themselves_are_named(change, problem):
    found = records.problem({**record("b-01", "One.", "Two."), **change})
    assert found is not None and problem in found


def test_cutting_and_adding_turns_keep_a_record_consistent():
    grown = record("b-01", "One.")
    records.add_turn(grown, "Question 2 of b-01?", "Two.", 1, False)
    assert grown == record("b-01", "One.", "Two.", unfinished=(2,))
    trimmed = {**grown, "trimmed": [1, 2]}
    assert records.cut(trimmed, 1) == {**record("b-01", "One."), "trimmed": [1]}
    assert "trimmed" not in records.cut({**grown, "trimmed": [2]}, 1)
    assert records.first_turn({**grown, "cut_at": 3, "cut_reason": "duplicate"}) == record("b-01", "One.")
    assert records.turn(grown, 2) == {"turn": 2, "question": "Question 2 of b-01?", "reply": "Two.",
                                      "reply_tokens": 1, "finished": False}
