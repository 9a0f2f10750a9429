"""`make run` on the ci profile, end to end: the rendered DAG through the local runner, against rclone S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
PHASES = ("preflight", "ingest", "student", "audit", "split", "train", "evaluate", "report", "export", "publish")


def run_pipeline(data, reports, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "workflows.runner", "--profile", "ci", "--data-dir", str(data),
                             "--reports-dir", str(reports), *extra], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
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


def test_every_phase_finished_with_a_manifest(ci_run):
    for unit in (*PHASES, "teacher/shard-00000", "teacher/shard-00001"):
        assert manifest(ci_run, unit)["outputs"], unit
    assert "✓ teacher(0)" in ci_run["stdout"] and "✓ teacher(1)" in ci_run["stdout"]


def test_report_has_the_figures_and_the_loss_went_down(ci_run):
    report = ci_run["reports"] / ci_run["run_id"]
    assert f"report: {report / 'report.md'}" in ci_run["stdout"]
    text = (report / "report.md").read_text()
    for figure in ("train loss, first → last step", "similarity to teacher, student", "similarity to teacher, base",
                   "NLL gap closed", "token reduction", "cost ratio", "latency ratio"):
        assert figure in text
    for image in ("loss.png", "similarity.png", "nll.png"):
        assert (report / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = manifest(ci_run, "train")["metrics"]
    assert train["last_loss_mean"] < train["first_loss_mean"]
    assert manifest(ci_run, "report")["metrics"]["loss_decreased"] is True
    evaluation = manifest(ci_run, "evaluate")["metrics"]
    assert 0.5 < evaluation["token_reduction"] < 1 and evaluation["cost_ratio"] > 1


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
    assert "similarity to the teacher" in (ci_run["runs"] / "export" / "README.md").read_text()


def tool(ci_run, name: str, answers: str) -> subprocess.CompletedProcess:
    """`make chat` / `make review` over the finished run's store, answering on stdin."""
    return subprocess.run([sys.executable, "-m", "workflows.local_s3", "--data-dir", str(ci_run["data"]), "--",
                           sys.executable, "-m", "jobs", name, "--profile", "ci"], cwd=REPO, input=answers,
                          capture_output=True, text=True, timeout=300)


def test_review_saves_ratings_to_the_store(ci_run):
    result = tool(ci_run, "review", "4\n\nseven\n2\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved 2 ratings (mean 3.0)" in result.stdout
    saved = sorted((ci_run["runs"] / "review").glob("*/ratings.jsonl"))
    assert [json.loads(line)["rating"] for line in saved[-1].read_text().splitlines()] == [4, 2]


def test_chat_answers_as_the_student(ci_run):
    result = tool(ci_run, "chat", "Who are you?\n\n")
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line.split("Ludwig van Beethoven>", 1)[1] for line in result.stdout.splitlines()
               if "Ludwig van Beethoven>" in line]
    assert len(answers) == 1 and answers[0].strip()
