"""Bad input through the real CLI: one line naming file (and line), a non-zero exit, no manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, store_for


def run_jobs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_malformed_prompt_line(store_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is music?"}) + "\n" + '{"prompt": "broken\n')
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-1", "--set", f"ingest.prompts={prompts}")
    assert_one_line_failure(result, f"{prompts}:2", "not valid JSON")
    assert store_for("bad-1").list_keys("runs/bad-1/") == []


def test_prompt_row_without_prompt_field(store_env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"text": "no prompt key"}\n')
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-2", "--set", f"ingest.prompts={prompts}")
    assert_one_line_failure(result, f"{prompts}:2", "'prompt'")


def test_card_without_system_prompt(store_env, tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("name: Mozart\nstyle_rules: [be brief]\n")
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-3", "--set", f"ingest.card={card}")
    assert_one_line_failure(result, str(card), "system_prompt is missing")
    assert store_for("bad-3").manifest("ingest") is None


def test_parquet_prompts_report_the_row(store_env, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["Tell me of Bonn", ""]}), path)
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-4", "--set", f"ingest.prompts={path}")
    assert_one_line_failure(result, f"{path}: row 1", "empty 'prompt'")


def test_prompts_from_s3_and_a_phase_without_its_input(store_env):
    store = store_for("bad-5")
    store.put_bytes("sources/prompts.jsonl", b'{"prompt": "What is a symphony?"}\n{"prompt": 7}\n')
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-5", "--set",
                      "ingest.prompts=s3://distill/sources/prompts.jsonl")
    assert_one_line_failure(result, "s3://distill/sources/prompts.jsonl:2")
    result = run_jobs("split", "--profile", "ci", "--run-id", "bad-5")
    assert_one_line_failure(result, "runs/bad-5/audit has no _SUCCESS.json")


def test_missing_credentials(store_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    result = run_jobs("ingest", "--profile", "ci", "--run-id", "bad-6")
    assert_one_line_failure(result, "S3 credentials missing")
