"""The benchmarks the README names, each run tiny as a user runs it (a subprocess: `make bench`, `make bench-top-k`,
`tests/bench_tinker.py`): each exits 0 and prints its result line. Their figures are not checked: at this size, on
a shared machine, they mean nothing; that the commands still run after an edit elsewhere is what is tested. So they
run on the tiny test model (tests/tiny_model.py)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, phase_config
from tiny_model import NAME, SETTING

VENV = Path(sys.prefix)
# make's own targets with this test's interpreter; `-o` keeps make from redoing `make setup` when pyproject.toml is
# newer than the venv's stamp (the commands, not the install, are under test)
MAKE = ["make", "--no-print-directory", f"VENV={VENV}", "-o", f"{VENV}/.setup-done"]
# one thread each, as DISTILL_THREADS gives every engine: the figures are not checked, and on a busy machine two
# OpenMP threads wait at every barrier for each other's time slice (measured on a 2-core host under load 8: the tiny
# `make bench` below took 88 s at one thread and did not finish in 14 minutes at two)
ONE_THREAD = {"DISTILL_THREADS": "1", "OMP_NUM_THREADS": "1"}
# a short card, so that the card's prefill (the bulk of a tiny run's work with the demo's card) stays small
CARD = "name: Mozart\nsystem_prompt: You are Wolfgang Amadeus Mozart, composer of Salzburg, in Vienna in 1785.\n"


def run(command: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    """The command in a session of its own, so that a timeout stops what make started too, not make alone."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ONE_THREAD}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)}: still running after {timeout}s\n{stdout[-2000:]}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.timeout(900)
def test_make_bench_runs_small_and_writes_its_mfu_table(tmp_path):
    card, results = tmp_path / "card.yaml", tmp_path / "RESULTS-bench.md"
    card.write_text(CARD)
    args = (f"--prompts 2 --conversations 2 --turns 2 --max-tokens 4 --steps 2 --score-rows 0 --limit-seconds 0.05 "
            f"--results {results} --set train.batch_size=2 --set {SETTING}")
    result = run([*MAKE, "bench", f"CARD={card}", f"BENCH_ARGS={args}"], timeout=840)
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"bench: teacher \d+\.\d\dx, turns \d+\.\d\dx, train \d+\.\d\dx", last), result.stdout[-2000:]
    assert re.search(r"^limit: \d+\.\d GFLOPS float32", result.stdout, re.MULTILINE)
    written = results.read_text()
    # one MFU row per method of each case, and the same last line
    for case in ("teacher", "turns", "score", "train"):
        assert len(re.findall(rf"^\| {case} \| .* \| \d+\.\d% \|$", written, re.MULTILINE)) == 2, written
    assert f"`{last}`" in written


@pytest.mark.timeout(900)
def test_make_bench_top_k_runs_on_a_finished_split(store_env, monkeypatch):
    """The ci profile's phases up to split, in this process against the session's S3 folder; then `make bench-top-k`
    serves that folder (DATA_DIR) and trains once per k."""
    run_id = "bench-top-k-ci"
    threads = torch.get_num_threads()
    monkeypatch.setenv("DISTILL_THREADS", ONE_THREAD["DISTILL_THREADS"])
    try:
        for phase, shard in [("ingest", None), ("teacher", 0), ("teacher", 1), ("audit", None),
                             ("split", None)]:
            config = dataclasses.replace(phase_config(run_id), shard=shard)
            importlib.import_module(f"jobs.phases.{phase}").main(config)
    finally:
        torch.set_num_threads(threads)  # an engine's load set this process's threads to one
    data_dir = store_env.root.parent  # workflows.local.s3 serves <data dir>/s3
    result = run([*MAKE, "bench-top-k", f"RUN={run_id}", "PROFILE=ci", f"DATA_DIR={data_dir}",
                  f"BENCH_ARGS=--top-k 4 --set train.steps=2 --set {SETTING}"], timeout=600)
    assert re.search(r"^\| 4 \| \d+\.\d{4} \|", result.stdout, re.MULTILINE), result.stdout[-2000:]
    assert re.fullmatch(r"bench-top-k: k 4 closes -?\d+\.\d% of the base's KL over the whole vocabulary",
                        result.stdout.strip().splitlines()[-1]), result.stdout[-2000:]


def test_make_bench_top_k_without_a_run_is_one_line_of_error(store_env):
    result = run([*MAKE, "bench-top-k", "RUN=", f"DATA_DIR={store_env.root.parent}"], timeout=300, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: no run: give RUN=<run-id> (make bench-top-k) or --run-id, a run whose split phase "
                      "finished"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_bench_engine_refuses_bad_sizes_in_one_line(capsys):
    # the script itself once (its exit code and its one line), its main in this process for the other refusal: each
    # start of the script imports torch, transformers and TRL
    result = run([sys.executable, "tests/bench_engine.py", "--card", "/nonexistent.yaml"], timeout=300, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: /nonexistent.yaml: cannot read"), result.stderr
    import bench_engine

    assert bench_engine.main(["--prompts", "0"]) == 2
    assert capsys.readouterr().err == "error: --prompts must be positive\n"


@pytest.mark.timeout(600)
def test_bench_tinker_runs_small():
    result = run([sys.executable, "tests/bench_tinker.py", "--latency", "0.2", "--prompts", "4", "--in-flight", "2",
                  "--max-tokens", "2", "--steps", "1", "--base", NAME], timeout=540)
    assert re.search(r"^teacher sampling: .* of ideal$", result.stdout, re.MULTILINE), result.stdout[-2000:]
    assert re.search(r"^training: .* of ideal$", result.stdout, re.MULTILINE), result.stdout[-2000:]
