"""A card of one's own, alone, end to end: `workflows.local.runner --card <png>` on the ci profile synthesizes the
prompts with the real model, distills and reports; the synthesized prompts are distinct, audited and of every
kind; a second ingest reuses them from the cache; a small prompt file is topped up with distinct ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from card_png import EXAMPLES
from conftest import REPO

from jobs.backends.embeddings import embed
from jobs.config import IngestConfig
from jobs.synthesis import KINDS, Slot, audit

pytestmark = pytest.mark.slow


def in_store(data, *command: str) -> subprocess.CompletedProcess:
    """A `python -m jobs` command against the S3 server over `data`, as the runner runs it."""
    return subprocess.run([sys.executable, "-m", "workflows.local.s3", "--data-dir", str(data), "--",
                           sys.executable, "-m", "jobs", *command], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def card_run(tmp_path_factory):
    data, reports = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("reports")
    result = subprocess.run([sys.executable, "-m", "workflows.local.runner", "--profile", "ci", "--card",
                             str(EXAMPLES / "ada.png"), "--data-dir", str(data), "--reports-dir", str(reports)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    ingest = data / "s3" / "distill" / "runs" / run_id / "ingest"
    return {"data": data, "run_id": run_id, "report": reports / run_id / "report.md", "ingest": ingest,
            "profile": json.loads((ingest / "profile.json").read_text()),
            "synthesized": [json.loads(line) for line in (ingest / "synthesized.jsonl").read_text().splitlines()]}


def test_a_png_card_alone_gives_a_finished_report_for_its_character(card_run):
    report = card_run["report"].read_text()
    assert report.startswith("# Distilling Ada Lovelace")
    assert "similarity to the character (name, topics): student / base / teacher" in report
    assert "| card field data.description | system_prompt (after data.system_prompt) |" in report
    assert "(chara_card_v3 in PNG)" in report and "synthesized, by kind" in report


def test_synthesized_prompts_are_distinct_audited_and_of_every_kind(card_run):
    profile, rows = card_run["profile"], card_run["synthesized"]
    synthesis = profile["synthesis"]
    assert profile["source"] == "synthesize" and profile["rows_read"] == 0
    assert synthesis["written"] == len(rows) >= profile["needed"] and synthesis["cache_hit"] == 0
    assert set(synthesis["kinds"]) == set(KINDS) and sum(synthesis["kinds"].values()) == len(rows)
    prompts = [row["prompt"] for row in rows]
    assert len({p.lower() for p in prompts}) == len(prompts)
    vectors = embed(prompts)
    similar = vectors @ vectors.T
    threshold = synthesis["settings"]["similarity"]
    assert all(similar[i, j] < threshold for i in range(len(rows)) for j in range(i))  # no near-duplicates
    for row in rows:
        assert audit(row["prompt"], Slot(row["kind"], (row["topic"],), 0), IngestConfig())[1] is None, row
    kept = [json.loads(line) for line in (card_run["ingest"] / "prompts.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in kept] == prompts and kept[0]["id"] == "s-00000"


def test_the_tools_given_the_same_card_name_the_runners_run(card_run):
    # what `make chat CARD=...` and `make review CARD=...` run: the card given as a relative path this time
    card = os.path.relpath(EXAMPLES / "ada.png", REPO)
    done = in_store(card_run["data"], "run-id", "--profile", "ci", "--card", card)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == card_run["run_id"]


def test_a_second_ingest_takes_the_synthesized_prompts_from_the_cache(card_run):
    done = in_store(card_run["data"], "ingest", "--profile", "ci", "--run-id", "again", "--set",
                    f"ingest.card={EXAMPLES / 'ada.png'}", "--set", "train.steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    profile = json.loads((card_run["data"] / "s3/distill/runs/again/ingest/profile.json").read_text())
    assert profile["synthesis"]["cache_hit"] == 1
    assert (card_run["data"] / "s3/distill/runs/again/ingest/synthesized.jsonl").read_text() == \
        (card_run["ingest"] / "synthesized.jsonl").read_text()


def test_a_small_prompt_file_is_topped_up_with_distinct_prompts(card_run, tmp_path):
    given = ["What do you think of Charles Babbage?", "How did you meet Mr Babbage?", "Do you ride horses?"]
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps({"id": f"mine-{i}", "prompt": p}) + "\n" for i, p in enumerate(given)))
    done = in_store(card_run["data"], "ingest", "--profile", "ci", "--run-id", "topped", "--set",
                    f"ingest.card={EXAMPLES / 'ada.yaml'}", "--set", f"ingest.prompts={source}", "--set",
                    "ingest.top_up=true", "--set", "ingest.limit=12", "--set", "ingest.synthesis.seed=7")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = card_run["data"] / "s3/distill/runs/topped/ingest"
    kept = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
    profile = json.loads((folder / "profile.json").read_text())
    assert [row["id"] for row in kept[:3]] == ["mine-0", "mine-1", "mine-2"]
    assert profile["synthesis"]["asked"] == 9 and len(kept) == 3 + profile["synthesis"]["written"]
    vectors = embed([row["prompt"] for row in kept])
    assert (vectors[3:] @ vectors[:3].T).max() < profile["synthesis"]["settings"]["similarity"]
