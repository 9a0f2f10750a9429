"""Verify on reuse (jobs.verify) with trivial units through the real `run_unit` and the real local S3 server: an intact
unit is reused, a changed output redoes its unit and everything downstream, `python -m jobs.verify` says so, and a
changed S3 card under a run is a one-line error. Then end to end on the ci profile and the tiny test model: two runs
with different cards on one store, an edited reply redone by two runs of one card at once, a tampered teacher cache
entry (those five ci runs are marked slow: `make test-slow`, which CI runs; `make test` keeps the verify mechanics on
trivial units; test_pipeline covers reuse end to end, test_lease two writers of one unit)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, phase_config, store_for
from structlog.testing import capture_logs
from tiny_model import ARGS

from jobs.errors import InputError
from jobs.lease import Lease
from jobs.metrics import NATS
from jobs.phases.base import run_unit
from jobs.store import MANIFEST, sha256_bytes

# the units run_unit decides on, upstream first, each with a trivial body: ingest, a teacher shard, audit, split
CHAIN = ("ingest", "teacher/shard-00000", "audit", "split")
CARD = (REPO / "jobs" / "assets" / "cards" / "beethoven.yaml").read_bytes()


def run_chain(run_id: str, *settings: str) -> list[str]:
    """Runs the four units; returns the ones whose body ran (computed, not reused)."""
    computed: list[str] = []
    config = phase_config(run_id, *settings)

    def body(unit: str):
        def write(out) -> None:
            computed.append(unit)
            out.write_jsonl("rows.jsonl", [{"unit": unit, "reply": f"Reply of {unit}."}])
            if unit == "ingest":
                out.metrics["shards"] = [0]
        return write

    run_unit(config, "ingest", body("ingest"))
    run_unit(dataclasses.replace(config, shard=0), "teacher", body("teacher/shard-00000"), extra_key=0)
    run_unit(config, "audit", body("audit"))
    run_unit(config, "split", body("split"))
    return computed


def same_size_edit(data: bytes) -> bytes:
    """One letter of a reply changed: the size stays, the sha256 does not."""
    at = data.index(b"Reply") + 1
    return data[:at] + (b"E" if data[at:at + 1] != b"E" else b"F") + data[at + 1:]


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.verify", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_an_intact_chain_is_reused_whole(store_env):
    assert run_chain("verify-1") == list(CHAIN)
    with capture_logs() as logged:
        assert run_chain("verify-1") == []
    assert [e["event"] for e in logged].count("skipped: outputs already match config and inputs") == len(CHAIN)


def test_a_same_size_edit_redoes_its_unit_and_everything_downstream(store_env):
    run_chain("verify-2")
    store = store_for("verify-2")
    before = {unit: store.require(unit)["write_id"] for unit in CHAIN}
    key = store.key("audit", "rows.jsonl")
    original = store.get_bytes(key)
    edited = same_size_edit(original)
    store.put_bytes(key, edited)
    with capture_logs() as logged:
        assert run_chain("verify-2") == ["audit", "split"]
    mismatches = [e for e in logged if e["event"] == "output mismatch"]
    assert len(mismatches) == 1 and mismatches[0]["file"] == key
    assert mismatches[0]["expected_sha256"] == sha256_bytes(original)
    assert mismatches[0]["actual_sha256"] == sha256_bytes(edited)
    assert mismatches[0]["expected_bytes"] == mismatches[0]["actual_bytes"] == len(original)
    assert [e["inputs"] for e in logged if e["event"] == "redo: inputs were written again since"] == [["audit"]]
    assert store.get_bytes(key) == original  # restored
    after = {unit: store.require(unit)["write_id"] for unit in CHAIN}
    assert [unit for unit in CHAIN if after[unit] != before[unit]] == ["audit", "split"]
    assert store.require("split")["input_writes"] == {"audit": after["audit"]}


def test_verify_of_every_run_reports_a_run_whose_manifests_it_cannot_read_and_goes_on(store_env):
    """A manifest without what this version writes (here an ingest manifest with no metrics: another version's,
    or not a phase's) makes its run not intact; it ended `make verify` of every run with a traceback before."""
    run_chain("verify-5")
    odd = store_for("verify-odd")
    odd.put_bytes(odd.key("ingest", MANIFEST), json.dumps({"unit": "ingest"}).encode())
    every = verify()
    assert every.returncode == 1, every.stderr
    assert "run verify-odd: 0 units intact, 1 not, " in every.stdout
    assert "  not intact  manifests: not in the shape this version writes (KeyError('metrics'))" in every.stdout
    assert re.search(r"^run verify-5: \d+ units intact", every.stdout, re.M)


def test_a_missing_output_of_a_shard_redoes_the_shard_and_what_reads_it(store_env):
    run_chain("verify-3")
    store = store_for("verify-3")
    store.delete(store.key("teacher/shard-00000", "rows.jsonl"))
    assert run_chain("verify-3") == ["teacher/shard-00000", "audit", "split"]


def test_verify_says_what_is_intact_what_is_not_and_what_a_run_would_redo(store_env):
    run_chain("verify-4")
    store = store_for("verify-4")
    key = store.key("audit", "rows.jsonl")
    original = store.get_bytes(key)
    store.put_bytes(key, same_size_edit(original))
    result = verify("--run-id", "verify-4")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "run verify-4: 2 units intact, 7 not, 8 to redo"
    assert "  intact      ingest teacher/shard-00000" in lines
    assert "  not intact  preflight: no manifest (unfinished or never run)" in lines
    bad = [line for line in lines if line.startswith(f"  not intact  audit: {key}: sha256 ")]
    assert len(bad) == 1 and f"its manifest says {sha256_bytes(original)[:12]}…" in bad[0]
    assert "  not intact  split: its input audit was written again after it" not in lines  # it is not (yet)
    assert "  would redo  preflight audit split train evaluate report export publish" in lines
    sizes = verify("--run-id", "verify-4", "--sizes-only")  # a same-size edit passes a size check
    assert not [line for line in sizes.stdout.splitlines() if line.startswith("  not intact  audit")]
    store.put_bytes(key, original)
    assert "  intact      ingest teacher/shard-00000 audit split" in verify("--run-id", "verify-4").stdout
    every = verify()
    assert every.returncode == 1 and "run verify-4: 4 units intact" in every.stdout, every.stderr
    assert every.stdout.splitlines()[-1].endswith("with units to redo")
    with Lease(store, "split") as lease:  # a run writing split now
        writing = verify("--run-id", "verify-4").stdout.splitlines()
    assert [line for line in writing if line.startswith("  writing ")] == [
        f"  writing     split: by {socket.gethostname()} pid {os.getpid()} (run verify-4, owner {lease.owner[:8]}), "
        f"lease expires in {writing[-1].rsplit(' ', 1)[-1]}"]
    assert re.fullmatch(r".*, lease expires in \d+s", writing[-1])
    missing = verify("--run-id", "no-such-run")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: no run no-such-run in s3://distill at ")
    assert missing.stderr.count("\n") == 1


def test_a_changed_s3_card_under_a_run_is_a_one_line_error(store_env):
    store = store_for("verify-5")
    card_key = "sources/verify-5/card.yaml"
    store.put_bytes(card_key, CARD)
    settings = (f"ingest.card=s3://distill/{card_key}", "ingest.prompts=builtin:beethoven")
    run_chain("verify-5", *settings)
    recorded = store.require("ingest")["sources"]
    assert recorded["card"] == {"uri": f"s3://distill/{card_key}", "sha256": sha256_bytes(CARD)}
    assert recorded["prompts"]["uri"] == "builtin:beethoven"
    changed = CARD.replace(b"composer", b"Composer")
    store.put_bytes(card_key, changed)
    with pytest.raises(InputError) as caught:
        run_chain("verify-5", *settings)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"run verify-5: s3://distill/{card_key} changed since run ingested it (sha256 "
                              f"{sha256_bytes(CARD)[:12]}…, now {sha256_bytes(changed)[:12]}…)")
    result = verify("--run-id", "verify-5")
    assert result.returncode == 2
    assert result.stderr == (f"error: run verify-5: s3://distill/{card_key} changed since run ingested it (sha256 "
                             f"{sha256_bytes(CARD)[:12]}…, now {sha256_bytes(changed)[:12]}…): cannot be "
                             "recomputed\n")
    store.delete(card_key)
    gone = verify("--run-id", "verify-5")
    assert gone.returncode == 2
    assert gone.stderr == (f"error: run verify-5: s3://distill/{card_key} can no longer be read (s3://distill/"
                           f"{card_key}: no such object): cannot be recomputed\n")


# -- end to end on the ci profile: two runs with different cards at once, then the first run's card twice at once after
# one of its replies was edited, then a tampered teacher cache entry (each stage on the store the last one left)
UNITS = ("preflight", "ingest", "teacher/shard-00000", "teacher/shard-00001", "audit", "split", "train",
         "evaluate", "report", "export", "publish")
UPSTREAM, REDONE = UNITS[:5], UNITS[5:]
PROMPTS = REPO / "jobs" / "assets" / "prompts" / "beethoven.jsonl"


def label(unit: str) -> str:
    """The runner's name for a unit's step: teacher(0) for teacher/shard-00000."""
    return f"teacher({int(unit[-5:])})" if unit.startswith("teacher/") else unit


def start_runner(data: Path, reports: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    output = reports / "runner-output.txt"
    with open(output, "w") as sink:  # a file, not a pipe: two runners at once must never block on their output
        process = subprocess.Popen([sys.executable, "-m", "workflows.local.runner", "--profile", "ci",
                                    *ARGS, "--data-dir", str(data), "--reports-dir", str(reports), *extra],
                                   cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    return process, output


def finish(*started: tuple[subprocess.Popen, Path], timeout: float = 3600) -> list[str]:
    """Each runner's output once all have ended; a runner still going at the deadline (or when another failed) is
    stopped, as Ctrl-C would (its steps and S3 server end with it)."""
    deadline = time.time() + timeout
    try:
        for process, _ in started:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    texts = [output.read_text() for _, output in started]
    for (process, _), text in zip(started, texts, strict=True):
        assert process.returncode == 0, text[-4000:]
    return texts


def in_store(data: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command against the S3 server over `data`, as `make verify` runs it."""
    return subprocess.run([sys.executable, "-m", "workflows.local.s3", "--data-dir", str(data), "--", sys.executable,
                           *command], cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(env or {})})


def manifests(runs: Path) -> dict[str, dict]:
    return {unit: json.loads((runs / unit / "_SUCCESS.json").read_text()) for unit in UNITS}


def edit_one_reply(data: bytes) -> bytes:
    """The first reply with one letter changed (same size: only sha256 tells)."""
    at = data.index(b'"role": "assistant", "content": "') + len(b'"role": "assistant", "content": "')
    while not data[at:at + 1].isalpha():
        at += 1
    return data[:at] + (b"x" if data[at:at + 1] != b"x" else b"y") + data[at + 1:]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The built-in card and another card, run at once on one data folder (one `.distill/`)."""
    data = tmp_path_factory.mktemp("shared")
    card = tmp_path_factory.mktemp("card") / "beethoven-1826.yaml"
    card.write_bytes(CARD.replace(b"in the years 1824 to 1826", b"in the year 1826"))
    first = start_runner(data, tmp_path_factory.mktemp("reports-a"))
    # fewer train steps: this run only has to run beside the other one
    other = start_runner(data, tmp_path_factory.mktemp("reports-b"), "--card", str(card), "--prompts", str(PROMPTS),
                         "--set", "train.steps=2")
    outputs = finish(first, other)
    run_ids = [re.findall(r"^run (\S+):", text, re.MULTILINE)[0] for text in outputs]
    return {"data": data, "outputs": outputs, "run_ids": run_ids, "runs": data / "s3" / "distill" / "runs"}


@pytest.fixture(scope="module")
def redone(shared, tmp_path_factory):
    """The first run's split/train.jsonl with one reply edited, then that run's card run twice at once."""
    data, run_id = shared["data"], shared["run_ids"][0]
    runs = shared["runs"] / run_id
    before = manifests(runs)
    original = (runs / "split" / "train.jsonl").read_bytes()
    edited = edit_one_reply(original)
    (runs / "split" / "train.jsonl").write_bytes(edited)
    checked = in_store(data, "-m", "jobs.verify", "--run-id", run_id)
    started = [start_runner(data, tmp_path_factory.mktemp(f"reports-{n}")) for n in (1, 2)]
    outputs = finish(*started)
    return {"data": data, "run_id": run_id, "runs": runs, "before": before, "after": manifests(runs),
            "original": original, "edited": edited, "checked": checked, "outputs": outputs,
            "reports": [output.parent / run_id / "report.md" for _, output in started],
            "verified": in_store(data, "-m", "jobs.verify", "--run-id", run_id)}


@pytest.mark.slow  # five ci runs, two at a time: `make test-slow` (CI), not `make test`
@pytest.mark.timeout(1800)  # two ci runs at once, on a 2-core machine busy with others
def test_two_runs_with_different_cards_on_one_store_both_finish_intact(shared):
    first, other = shared["run_ids"]
    assert first != other
    for text in shared["outputs"]:  # nothing in common: nothing waited for, nothing reused
        assert "waiting for" not in text and "skipped" not in text and "reused" not in text
    result = in_store(shared["data"], "-m", "jobs.verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {first}: {len(UNITS)} units intact, 0 not, 0 to redo" in result.stdout
    assert f"run {other}: {len(UNITS)} units intact, 0 not, 0 to redo" in result.stdout
    assert result.stdout.splitlines()[-1] == "2 runs: 2 intact, 0 with units to redo"


@pytest.mark.slow  # five ci runs, two at a time: `make test-slow` (CI), not `make test`
@pytest.mark.timeout(1800)  # two ci runs at once, on a 2-core machine busy with others
def test_verify_names_the_edited_reply_and_what_a_run_would_redo(redone):
    checked, run_id = redone["checked"], redone["run_id"]
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0] == f"run {run_id}: {len(UPSTREAM)} units intact, 1 not, {len(REDONE)} to redo"
    assert f"  not intact  split: runs/{run_id}/split/train.jsonl: sha256 {sha256_bytes(redone['edited'])[:12]}…, " \
           f"its manifest says {sha256_bytes(redone['original'])[:12]}…" in checked.stdout
    assert f"  would redo  {' '.join(REDONE)}" in lines
    assert redone["verified"].returncode == 0, redone["verified"].stdout  # intact again after the runs


@pytest.mark.slow  # five ci runs, two at a time: `make test-slow` (CI), not `make test`
@pytest.mark.timeout(1800)  # two ci runs at once, on a 2-core machine busy with others
def test_an_edited_reply_redoes_split_and_everything_after_it_and_the_report_comes_from_the_restored_data(redone):
    run_id, runs, before, after = redone["run_id"], redone["runs"], redone["before"], redone["after"]
    both = "\n".join(redone["outputs"])
    mismatch = (f"  split: runs/{run_id}/split/train.jsonl does not match its manifest (sha256 "
                f"{sha256_bytes(redone['edited'])}, {len(redone['edited'])} bytes; expected "
                f"{sha256_bytes(redone['original'])}, {len(redone['original'])} bytes): redoing it")
    assert mismatch in both.splitlines()
    for text in redone["outputs"]:
        for unit in UPSTREAM:
            assert f"  {label(unit)}: skipped (outputs match config and inputs)" in text, unit
    assert [u for u in UNITS if after[u]["write_id"] != before[u]["write_id"]] == list(REDONE)
    assert (runs / "split" / "train.jsonl").read_bytes() == redone["original"]  # restored
    # the report read what was written again: its inputs' write ids are theirs now, and its figures are the new train's
    report = after["report"]
    assert report["input_writes"] == {unit: after[unit]["write_id"] for unit in report["input_writes"]}
    assert {"split", "train", "evaluate"} <= set(report["input_writes"])
    train = after["train"]["metrics"]
    for name in ("first_loss", "last_loss"):  # the same data trains the same way
        assert abs(train[name] - before["train"]["metrics"][name]) < 1e-3, name
    for path in redone["reports"]:
        row = next(line for line in path.read_text().splitlines() if "train loss, first → last step" in line)
        assert NATS.format(train["first_loss"]) in row and NATS.format(train["last_loss"]) in row


@pytest.mark.slow  # five ci runs, two at a time: `make test-slow` (CI), not `make test`
@pytest.mark.timeout(1800)  # two ci runs at once, on a 2-core machine busy with others
def test_two_runs_of_one_card_at_once_compute_each_unit_once(redone):
    def reused(text: str, unit: str) -> bool:
        return (f"  {label(unit)}: skipped (outputs match config and inputs)" in text
                or f"  {label(unit)}: reused (another run wrote it while this one waited)" in text)

    for unit in REDONE:
        assert sum(not reused(text, unit) for text in redone["outputs"]) == 1, unit
    waited = [line for text in redone["outputs"] for line in text.splitlines() if ": waiting for " in line]
    assert waited, "neither run waited for the other"
    assert re.search(r"waiting for \S+ pid \d+ \(run " + re.escape(redone["run_id"]) + r", owner \w+\), which is "
                     r"writing it \(waited \d+s\)$", waited[0]), waited[0]


@pytest.mark.slow  # five ci runs, two at a time: `make test-slow` (CI), not `make test`
@pytest.mark.timeout(1800)  # two ci runs at once, on a 2-core machine busy with others
def test_a_tampered_teacher_cache_entry_is_found_and_generated_again(redone):
    data, runs = redone["data"], redone["runs"]
    shard = runs / "teacher" / "shard-00001" / "conversations.jsonl"
    original = shard.read_bytes()
    entries = [p for p in (data / "s3" / "distill" / "cache" / "teacher").glob("*/conversations.jsonl")
               if p.read_bytes() == original]
    assert len(entries) == 1
    entry = entries[0]
    key = str(entry.relative_to(data / "s3" / "distill"))
    tampered = edit_one_reply(original)
    shard.write_bytes(tampered)  # so the unit is redone, and reads the cache
    entry.write_bytes(tampered)
    result = in_store(data, "-m", "jobs", "teacher", "--shard", "1", "--profile", "ci", *ARGS,
                      env={"DISTILL_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    (output,) = [e for e in events if e["event"] == "output mismatch"]
    assert output["file"] == str(shard.relative_to(data / "s3" / "distill"))
    (cached,) = [e for e in events if e["event"] == "cache entry mismatch"]
    assert cached["key"] == key and cached["action"] == "computed again"
    assert cached["expected_sha256"] == sha256_bytes(original) and cached["actual_sha256"] == sha256_bytes(tampered)
    manifest = json.loads((shard.parent / "_SUCCESS.json").read_text())
    assert manifest["metrics"]["cache_hit"] == 0 and manifest["metrics"]["sample_tokens"] > 0
    regenerated = shard.read_bytes()
    assert entry.read_bytes() == regenerated and tampered not in regenerated.splitlines(keepends=True)
    record = json.loads((entry.parent / "conversations.jsonl.sha256").read_text())
    assert record == {"sha256": sha256_bytes(regenerated), "bytes": len(regenerated)}
    ids = [json.loads(line)["id"] for line in regenerated.splitlines()]
    assert ids == [json.loads(line)["id"] for line in original.splitlines()]
