"""`make run` on the ci profile and the tiny test model (tests/tiny_model.py), end to end: the rendered DAG through
the local runner, against rclone S3 (tests/test_real_model.py runs it once on the real SmolLM2).

A second run in a fresh store goes through the fault proxy, with canary values in every secret: first it
is stopped by SIGTERM while teacher shard 0's manifest is being written, then run again with 10% of the
S3 requests failing; its outputs must equal the fault-free run's, and no canary may appear anywhere.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, alive, descendants
from tiny_model import ARGS

from jobs.config import TrainConfig
from jobs.metrics import KEYS, LATENCY, LATENCY_RATIO, PREFILL, PREFILL_RATIO, figure_rows, markdown_table
from jobs.phases import PHASE
from jobs.phases.evaluate import BASE_PARTS, STUDENT_PARTS

PHASES = tuple(name for name, phase in PHASE.items() if not phase.sharded)  # one unit each (teacher: one per shard)


CANARIES = {"DISTILL_S3_ACCESS_KEY": "canary-s3-access-5d1e", "DISTILL_S3_SECRET_KEY": "canary-s3-secret-93b7a0c4",
            "HF_TOKEN": "hf_canaryHubToken7c2f", "TINKER_API_KEY": "tml-canary-tinker-4e8b"}
# outputs that differ between any two correct runs: wall-clock figures, the order peft writes a set in, the float
# noise of export's merge check, and publish's dry-run reason (this run has an HF_TOKEN, a canary)
VARYING = {("train", "metrics.jsonl"), ("evaluate", "metrics.json"), ("report", "report.md"), ("report", "report.html"),
           ("export", "README.md"), ("train", "adapter/adapter_config.json"), ("export", "adapter/adapter_config.json"),
           ("export", "export.json"), ("publish", "publish.json")}
# the teacher shard 0's manifest write, never answered: the phase is stopped between its outputs and its manifest
STALL = r"PUT /distill/runs/[^/]+/teacher/shard-00000/_SUCCESS\.json"


def runner_command(data, reports, *extra: str) -> list[str]:
    return [sys.executable, "-m", "workflows.local.runner", "--profile", "ci", *ARGS,
            "--data-dir", str(data), "--reports-dir", str(reports), *extra]


def run_pipeline(data, reports, *extra: str, env=None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    result = subprocess.run(runner_command(data, reports, *extra), cwd=REPO, capture_output=True, text=True,
                            timeout=900, env=env)
    return result, time.time() - started


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    data, reports = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("reports")
    result, seconds = run_pipeline(data, reports)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    return {"data": data, "reports": reports, "stdout": result.stdout, "run_id": run_id, "seconds": seconds,
            "runs": data / "s3" / "distill" / "runs" / run_id}


def manifest(ci_run, unit: str) -> dict:
    return json.loads((ci_run["runs"] / unit / "_SUCCESS.json").read_text())


def stop_while_stalled(data: Path, reports: Path, env: dict[str, str]) -> dict:
    """Starts the runner with teacher shard 0's manifest write stalled, SIGTERMs it once the write hangs."""
    with open(data / "stopped-run.txt", "w") as output:
        process = subprocess.Popen(runner_command(data, reports, "--s3-stall", STALL), cwd=REPO, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    counts, deadline = data / "s3-faults.json", time.time() + 600
    while not (counts.exists() and json.loads(counts.read_text())["stalled"] >= 1):
        assert process.poll() is None, (data / "stopped-run.txt").read_text()[-3000:]
        assert time.time() < deadline, "teacher shard 0 never wrote its manifest"
        time.sleep(0.5)
    started = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return {"code": process.returncode, "left": alive(started), "output": (data / "stopped-run.txt").read_text()}


@pytest.fixture(scope="module")
def fault_run(ci_run, tmp_path_factory):
    data, reports = tmp_path_factory.mktemp("fault-data"), tmp_path_factory.mktemp("fault-reports")
    # the fault-free run's caches, as a second run on one store would find them: every phase still runs, the
    # teacher shards read their replies instead of sampling them again, evaluate reads every part of the base model
    shutil.copytree(ci_run["data"] / "s3" / "distill" / "cache", data / "s3" / "distill" / "cache")
    env = {**os.environ, **CANARIES}
    stopped = stop_while_stalled(data, reports, env)
    runs = data / "s3" / "distill" / "runs" / ci_run["run_id"]
    shard = runs / "teacher" / "shard-00000"
    stopped["outputs_before_manifest"] = sorted(p.name for p in shard.iterdir()) if shard.exists() else []
    result, seconds = run_pipeline(data, reports, "--s3-faults", "0.1", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    faults = json.loads((data / "s3-faults.json").read_text())
    return {"data": data, "reports": reports, "runs": runs, "stopped": stopped, "stdout": result.stdout,
            "stderr": result.stderr, "seconds": seconds, "faults": faults}


@pytest.fixture(scope="module")
def tinker_run(tmp_path_factory):
    """The same profile and inputs with `model.backend=tinker`, against the local stand-in the runner starts."""
    data, reports = tmp_path_factory.mktemp("tinker-data"), tmp_path_factory.mktemp("tinker-reports")
    result, seconds = run_pipeline(data, reports, "--backend", "tinker", "--tinker-server")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = re.search(r"^run (\S+):", result.stdout, re.MULTILINE).group(1)  # after the stand-in's own line
    return {"data": data, "reports": reports, "stdout": result.stdout, "run_id": run_id, "seconds": seconds,
            "runs": data / "s3" / "distill" / "runs" / run_id}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# how far the tinker backend's figures may be from the local engine's on the same inputs. The engine underneath is
# the same, in float32, and every prompt samples with its own seed, so they have come out identical; but the
# stand-in batches requests as they arrive, and another batch shape can round a float sum differently and flip a
# sampled token now and then: the test allows that much
TINKER_TOLERANCE = 0.02
# figures that are the backend's name or wall-clock time, not results
NOT_RESULTS = {"backend", "device", "dtype", *LATENCY.keys, LATENCY_RATIO.key, *PREFILL.keys, PREFILL_RATIO.key,
               "cached", "cached_figures", "computed_prefill_tokens"}
# what evaluate's metrics.json holds besides the registered figures: how they were measured, and which of them came
# from its cache
EVALUATE_SETTINGS = {"backend", "device", "dtype", "eval_prompts", "judge_replies", "prices_per_mtok", "prefill_tokens",
                     "sample_tokens", "computed_prefill_tokens", "cached", "cached_figures"}


# a long run (marker slow, `make test-slow`): `make test` drives the Tinker backend's parts one by one
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two whole ci runs (the local one shared with the tests above) in its set-up
def test_tinker_backend_runs_the_ci_profile_and_agrees_with_the_local_engine(ci_run, tinker_run):
    assert "Tinker API: the local stand-in at http://127.0.0.1:" in tinker_run["stdout"]
    for unit in (*PHASES, "teacher/shard-00000", "teacher/shard-00001"):
        assert manifest(tinker_run, unit)["outputs"], unit
    for unit in ("teacher/shard-00000", "train", "evaluate"):
        assert manifest(tinker_run, unit)["metrics"]["backend"] == "tinker", unit
    locations = jsonl(tinker_run["runs"] / "train" / "checkpoints.jsonl")
    assert locations and all(row["location"].startswith("tinker://") for row in locations)
    local_replies, tinker_replies = ({r["id"]: r["messages"][1]["content"]  # each record's first reply
                                      for shard in ("shard-00000", "shard-00001")
                                      for r in jsonl(run["runs"] / "teacher" / shard / "conversations.jsonl")}
                                     for run in (ci_run, tinker_run))
    assert local_replies.keys() == tinker_replies.keys()
    same = sum(local_replies[k] == tinker_replies[k] for k in local_replies) / len(local_replies)
    assert same >= 0.9, f"only {same:.0%} of the teacher's replies agree"
    for unit, names in (("train", ("first_loss", "last_loss", "val_loss_last", "train_tokens")), ("evaluate", None)):
        local, tinker = manifest(ci_run, unit)["metrics"], manifest(tinker_run, unit)["metrics"]
        for name in names or sorted(set(local) - NOT_RESULTS):
            a, b = local[name], tinker[name]
            assert (abs(a - b) <= TINKER_TOLERANCE * max(1.0, abs(a)) if isinstance(a, float) else a == b), (name, a, b)


def test_every_phase_finished_with_a_manifest(ci_run):
    for unit in (*PHASES, "teacher/shard-00000", "teacher/shard-00001"):
        assert manifest(ci_run, unit)["outputs"], unit
    assert "✓ teacher(0)" in ci_run["stdout"] and "✓ teacher(1)" in ci_run["stdout"]


def test_report_and_export_ran_at_the_same_time(ci_run):
    lines = ci_run["stdout"].splitlines()
    started = [i for i, line in enumerate(lines) if line in ("▶ report", "▶ export")]
    ended = [i for i, line in enumerate(lines) if line.startswith(("✓ report ", "✓ export "))]
    assert len(started) == 2 and len(ended) == 2 and max(started) < min(ended), lines[-30:]


def test_report_has_the_figures_and_the_loss_went_down(ci_run):
    report = ci_run["reports"] / ci_run["run_id"]
    assert f"report: {report / 'report.md'}" in ci_run["stdout"]
    text = (report / "report.md").read_text()
    assert "train loss, first → last step" in text
    for image in ("loss.png", "similarity.png", "distillation.png"):
        assert (report / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = manifest(ci_run, "train")["metrics"]
    assert train["last_loss_mean"] < train["first_loss_mean"]
    assert train["objective"] == "logit" and train["settings"]["top_k"] == TrainConfig().top_k
    assert manifest(ci_run, "report")["metrics"]["loss_decreased"] is True
    evaluation = manifest(ci_run, "evaluate")["metrics"]
    assert 0.5 < evaluation["token_reduction"] < 1 and evaluation["cost_ratio"] > 1


def test_evaluate_writes_every_registered_figure_and_the_report_and_model_card_show_them(ci_run):
    figures = json.loads((ci_run["runs"] / "evaluate" / "metrics.json").read_text())
    assert set(figures) == set(KEYS) | EVALUATE_SETTINGS
    rows = markdown_table(figure_rows(figures)).splitlines()[2:]
    report = (ci_run["reports"] / ci_run["run_id"] / "report.md").read_text().splitlines()
    model_card = (ci_run["runs"] / "export" / "README.md").read_text().splitlines()
    assert [line for line in report if line in rows] == [line for line in model_card if line in rows] == rows


def test_eval_prompts_were_never_trained_on(ci_run):
    def prompts(name):
        return {json.loads(line)["prompt"] for line in (ci_run["runs"] / "split" / name).read_text().splitlines()}

    assert not prompts("eval.jsonl") & (prompts("train.jsonl") | prompts("val.jsonl"))


def test_a_second_run_skips_every_phase(ci_run):
    result, seconds = run_pipeline(ci_run["data"], ci_run["reports"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("skipped (outputs match config and inputs)") == len(PHASES) + 2
    assert seconds < 30, f"second run took {seconds:.1f}s"


def test_publish_is_a_dry_run_listing_the_export(ci_run):
    published = json.loads((ci_run["runs"] / "publish" / "publish.json").read_text())
    exported = set(manifest(ci_run, "export")["outputs"])
    assert published["mode"] == "dry-run"
    assert {f["path"] for f in published["files"]} == exported


def test_exported_model_loads_and_generates(ci_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ci_run["runs"] / "export" / "merged"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    check = json.loads((ci_run["runs"] / "export" / "export.json").read_text())
    assert check["argmax_agreement"] == 1.0 and check["logits_max_abs_diff"] < 0.02


def tool(ci_run, name: str, answers: str) -> subprocess.CompletedProcess:
    """`make chat` / `make review` over the finished run's store, answering on stdin."""
    return subprocess.run([sys.executable, "-m", "workflows.local.s3", "--data-dir", str(ci_run["data"]), "--",
                           sys.executable, "-m", "jobs", name, "--profile", "ci", *ARGS], cwd=REPO,
                          input=answers, capture_output=True, text=True, timeout=300)


def test_review_saves_ratings_to_the_store(ci_run):
    result = tool(ci_run, "review", "4\n\nseven\n2\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved 2 ratings (mean 3.0)" in result.stdout
    saved = sorted((ci_run["runs"] / "review").glob("*/ratings.jsonl"))
    assert [json.loads(line)["rating"] for line in saved[-1].read_text().splitlines()] == [4, 2]


def test_chat_answers_as_the_student_and_remembers_the_conversation(ci_run):
    result = tool(ci_run, "chat", "My name is Clara.\nWho are you?\nWhat is my name?\n\n")
    assert result.returncode == 0, result.stderr[-2000:]
    said = [line.split("Ludwig van Beethoven>", 1)[1] for line in result.stdout.splitlines()
            if "Ludwig van Beethoven>" in line]
    greeting, *answers = said
    assert greeting.startswith(" Come in, come in") and greeting.endswith("(the card's greeting)")
    assert len(answers) == 3 and all(a.strip() for a in answers)
    # what the student received for the third question: the name given two turns earlier, and its own replies
    saved = sorted((ci_run["runs"] / "chat").glob("*/transcript.jsonl"))
    turns = [json.loads(line) for line in saved[-1].read_text().splitlines()]
    third = turns[2]["sent"]
    assert [m["role"] for m in third] == ["user", "assistant", "user", "assistant", "user"]
    assert third[0]["content"] == "My name is Clara." and third[-1]["content"] == "What is my name?"
    # its own earlier replies, whole (the terminal shows a reply's first line after the prompt)
    assert [third[1]["content"], third[3]["content"]] == [turns[0]["reply"], turns[1]["reply"]]
    assert [turns[i]["reply"].splitlines()[0] for i in (0, 1)] == [answers[0].strip(), answers[1].strip()]
    assert turns[0]["prompt_tokens"] < turns[1]["prompt_tokens"] < turns[2]["prompt_tokens"]


def test_sigterm_mid_write_leaves_no_manifest_and_no_process(fault_run):
    stopped = fault_run["stopped"]
    assert stopped["code"] == 128 + signal.SIGTERM, stopped["output"][-3000:]
    assert stopped["left"] == set()
    assert stopped["output"].strip().splitlines()[-1].startswith("error: stopped by SIGTERM: ")
    # teacher shard 0 had written its replies and was writing its manifest when it was stopped
    assert stopped["outputs_before_manifest"] == ["conversations.jsonl"]


def test_the_stopped_unit_is_redone_and_finished_units_are_skipped(fault_run):
    lines = fault_run["stdout"].splitlines()
    assert "  preflight: skipped (outputs match config and inputs)" in lines
    assert "  ingest: skipped (outputs match config and inputs)" in lines
    assert "✓ teacher(0)" in fault_run["stdout"] and "  teacher(0): skipped" not in fault_run["stdout"]
    assert json.loads((fault_run["runs"] / "teacher" / "shard-00000" / "_SUCCESS.json").read_text())["outputs"]


def test_under_10_percent_s3_faults_the_outputs_equal_a_fault_free_run(ci_run, fault_run):
    faults = fault_run["faults"]
    injected = sum(faults["faults"].values())
    summary = [line for line in fault_run["stdout"].splitlines() if line.startswith("S3 fault proxy: ")]
    print(f"{summary} in {fault_run['seconds']:.0f}s")
    assert len(summary) == 1 and f"{faults['requests']} requests" in summary[0]
    assert faults["requests"] > 100 and injected >= faults["requests"] * 0.05
    assert all(count > 0 for count in faults["faults"].values()), faults
    for unit in (*PHASES, "teacher/shard-00000", "teacher/shard-00001"):
        clean, faulty = manifest(ci_run, unit), manifest(fault_run, unit)
        assert faulty["fingerprint"] == clean["fingerprint"], unit
        rows = {n: o["rows"] for n, o in clean["outputs"].items()}
        assert {n: o["rows"] for n, o in faulty["outputs"].items()} == rows, unit
        for name, output in clean["outputs"].items():
            if (unit, name) not in VARYING:
                assert faulty["outputs"][name]["sha256"] == output["sha256"], (unit, name)


def test_no_canary_secret_anywhere(fault_run):
    """Artifacts, manifests, step logs, rclone's log, reports, the runner's output and the rendered DAG."""
    rendered = subprocess.run([sys.executable, "-m", "workflows.pipeline"], cwd=REPO, capture_output=True,
                              env={**os.environ, **CANARIES}, check=True).stdout
    texts = {"runner output": (fault_run["stdout"] + fault_run["stderr"]).encode(), "rendered DAG": rendered}
    files = [p for root in (fault_run["data"], fault_run["reports"]) for p in root.rglob("*")
             if p.is_file() and p.stat().st_size]
    assert len(files) > 50
    for name, value in CANARIES.items():
        needle = value.encode()
        assert not [where for where, text in texts.items() if needle in text], name
        assert not [str(p) for p in files if contains(p, needle)], name


def contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:  # the model is 0.5 GB
        return view.find(needle) >= 0


def step_log(run: dict, label: str) -> list[dict]:
    """A step's JSON log lines (the runner keeps each step's output under <data>/logs/<run id>/)."""
    lines = (run["data"] / "logs" / run["run_id"] / f"{label}.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def progress(run: dict, label: str) -> list[dict]:
    return [line for line in step_log(run, label) if line["event"] == "progress"]


def test_train_logs_every_step_from_the_first_with_its_loss_rate_and_eta(ci_run):
    lines = progress(ci_run, "train")
    steps = [line for line in lines if line["task"] == "train" and line["done"] > 0]
    # a step longer than the heartbeat's 20 s would log its count twice
    assert list(dict.fromkeys(line["done"] for line in steps)) == list(range(1, 7))
    assert {line["total"] for line in steps} == {6}
    first = steps[0]
    assert first["loss"] > 0 and first["tokens_per_s"] > 0 and first["eta_s"] >= 0
    # a step that takes long (a loaded machine) is not silent: a heartbeat line at least every 20 s
    bar = [datetime.fromisoformat(line["timestamp"]) for line in lines if line["task"] == "train"]
    assert max(later - earlier for earlier, later in itertools.pairwise(bar)).total_seconds() < 30
    # the logit objective's top-k pass before step 1 has its own line, at its start and its end
    topk = [line for line in lines if line["task"] == "train before step 1: the teacher's top-k"]
    assert [line["done"] for line in topk][:1] + [line["done"] for line in topk][-1:] == [0, topk[0]["total"]]
    assert lines.index(topk[-1]) < lines.index(first)
    assert re.search(r"^  train: 1/6 .*loss=[0-9.]+ tokens_per_s=\d+", ci_run["stdout"], re.MULTILINE)


def test_the_teacher_names_its_conversation_turns(ci_run):
    for shard in (0, 1):
        tasks = list(dict.fromkeys(line["task"] for line in progress(ci_run, f"teacher({shard})")))
        assert tasks == [f"teacher shard {shard} turn {turn}" for turn in ("1/2: teacher replies",
                                                                           "2/2: visitor questions",
                                                                           "2/2: teacher replies")]


def test_evaluate_counts_the_stages_that_run(ci_run):
    stages = [line["stage"] for line in progress(ci_run, "evaluate")]
    names = [*(part.name for part in BASE_PARTS + STUDENT_PARTS), "similarity, judges"]  # a cold cache: all run
    assert list(dict.fromkeys(stages)) == [f"{i}/{len(names)}: {name}" for i, name in enumerate(names, 1)]
    figures = json.loads((ci_run["runs"] / "evaluate" / "metrics.json").read_text())
    assert figures["cached"] == figures["cached_figures"] == []
    report = (ci_run["reports"] / ci_run["run_id"] / "report.md").read_text()
    assert "| figures from evaluate's cache (an earlier run on this data) | none: every one computed in this run |" \
        in report


def test_a_warm_evaluate_cache_gives_the_cold_runs_figures(ci_run, fault_run):
    """The fault run found the ci run's cache: evaluate read every base part from it, computed the student's, and
    its figures are the ci run's, bit for bit (the latency too: it was read, not measured again)."""
    cold = json.loads((ci_run["runs"] / "evaluate" / "metrics.json").read_text())
    warm = json.loads((fault_run["runs"] / "evaluate" / "metrics.json").read_text())
    assert warm["cached"] == [part.name for part in BASE_PARTS]
    assert {key: warm[key] for key in KEYS} == {key: cold[key] for key in KEYS}
    assert 0 < warm["prefill_tokens"] < cold["prefill_tokens"]  # only the student's requests this time
    assert {"nll_base", "kl_base", "judge_accuracy", "latency_ratio"} <= set(warm["cached_figures"])
    assert not {"nll_student", "kl_closed", "similarity_student"} & set(warm["cached_figures"])
    stages = list(dict.fromkeys(line["stage"] for line in progress({**fault_run, "run_id": ci_run["run_id"]},
                                                                   "evaluate")))
    count = len(STUDENT_PARTS) + 2  # the cache read, the student's parts, the figures
    assert [stage.split(":")[0] for stage in stages] == [f"{i}/{count}" for i in range(1, count + 1)]
    assert stages[0] == f"1/{count}: read from the cache ({len(BASE_PARTS)} parts)"
    report = (fault_run["reports"] / ci_run["run_id"] / "report.md").read_text()
    assert f"| figures from evaluate's cache (an earlier run on this data) | {len(warm['cached_figures'])} of " \
           f"{len(KEYS)}: similarity_base, " in report
