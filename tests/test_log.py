"""Progress in a pod: JSON log lines when a bar starts, at its first step, at each new stage, at the end, and a
heartbeat while one long call keeps it from advancing. Each case runs in its own process, as a phase does, with
the log format a pod gets."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

from conftest import REPO


def progress_lines(script: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", "from jobs.log import Progress\nimport time\n" + script], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DISTILL_LOG_FORMAT": "json"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert all(line["event"] == "progress" for line in lines), lines
    return lines


def test_a_bar_logs_its_start_its_first_step_every_tenth_and_its_end():
    lines = progress_lines("with Progress(40, 'work') as bar:\n"
                           "    for i in range(40):\n"
                           "        bar.advance(1, loss=i)\n")
    assert [line["done"] for line in lines] == [0, 1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert {line["task"] for line in lines} == {"work"} and {line["total"] for line in lines} == {40}
    assert "eta_s" not in lines[0] and lines[1]["loss"] == 0 and lines[-1]["eta_s"] == 0


def test_each_logs_every_step_with_its_fields_and_an_eta_from_this_runs_rate():
    # resumed at step 2 of 5: the rate counts the steps this run did
    lines = progress_lines("with Progress(5, 'train', initial=2, each=True) as bar:\n"
                           "    for step in range(3):\n"
                           "        time.sleep(0.2)\n"
                           "        bar.advance(1, loss=1.5, tokens_per_s=100)\n")
    assert [line["done"] for line in lines] == [2, 3, 4, 5]
    first = lines[1]
    assert first["loss"] == 1.5 and first["tokens_per_s"] == 100
    assert 0.3 <= first["eta_s"] <= 1.0  # two steps left at about 0.2 s each


def test_a_silent_call_gets_heartbeat_lines():
    lines = progress_lines("with Progress(3, 'train', stage='before step 1: the teacher top-k', every_s=0.3) as bar:\n"
                           "    time.sleep(1.1)\n"
                           "    bar.advance(3)\n")
    assert [line["done"] for line in lines[:-1]] == [0] * (len(lines) - 1) and 3 <= len(lines) - 1 <= 5
    assert lines[-1]["done"] == 3
    assert {line["task"] for line in lines} == {"train before step 1: the teacher top-k"}
    assert {line["stage"] for line in lines} == {"before step 1: the teacher top-k"}
    assert all(b["elapsed_s"] > a["elapsed_s"] for a, b in itertools.pairwise(lines))


def test_stages_by_count_name_what_runs_and_a_new_stage_logs_a_line():
    lines = progress_lines("stages = [(30, 'turn 2/4: visitor questions'), (30, 'turn 2/4: teacher replies')]\n"
                           "with Progress(60, 'teacher shard 0', stages=stages) as bar:\n"
                           "    for i in range(60):\n"
                           "        bar.advance()\n")
    tasks = {line["done"]: line["task"] for line in lines}
    assert tasks[0] == tasks[1] == tasks[24] == "teacher shard 0 turn 2/4: visitor questions"
    assert tasks[30] == tasks[60] == "teacher shard 0 turn 2/4: teacher replies"
    assert 29 not in tasks  # the 10% marks: 6, 12, ... and the stage's start
