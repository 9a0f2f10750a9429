"""The ci profile once end to end on the real SmolLM2-135M (marker slow: `make test-slow`): what the tiny random
model of the other end-to-end tests (test_pipeline, on the same DAG and runner) cannot show. The student learns from
the teacher (the training loss falls), the report says so, the card's cost is gone from the student's prompts, and the
exported merged model is the adapter's (argmax agreement with the unmerged one)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from jobs.config import ModelConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    data, reports = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("reports")
    result = subprocess.run([sys.executable, "-m", "workflows.local.runner", "--profile", "ci", "--data-dir", str(data),
                             "--reports-dir", str(reports)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    runs = data / "s3" / "distill" / "runs" / run_id

    def manifest(unit: str) -> dict:
        return json.loads((runs / unit / "_SUCCESS.json").read_text())

    return {"manifest": manifest, "report": (reports / run_id / "report.md").read_text(), "runs": runs}


@pytest.mark.timeout(1800)
def test_the_real_model_learns_and_the_report_and_export_show_it(real_run):
    manifest = real_run["manifest"]
    assert manifest("preflight")["metrics"]["model_dir"].endswith(ModelConfig().base.replace("/", "--"))
    train = manifest("train")["metrics"]
    assert train["last_loss_mean"] < train["first_loss_mean"], train
    assert manifest("report")["metrics"]["loss_decreased"] is True
    assert "train loss, first → last step" in real_run["report"]
    evaluation = manifest("evaluate")["metrics"]
    assert 0.5 < evaluation["token_reduction"] < 1 and evaluation["cost_ratio"] > 1, evaluation
    check = json.loads((real_run["runs"] / "export" / "export.json").read_text())
    assert check["argmax_agreement"] == 1.0 and check["logits_max_abs_diff"] < 0.02, check
