"""docs/RESULTS.md's writer (`tests/results_file.py`) on tiny inputs: a command replaces its own section and keeps
every other one byte for byte; `make bench`, `make objectives` and `tests/run_results.py` (after a `make run`) write
their sections with the CPU and the date, the last two from runs written through the real store (the session's S3
server). No model runs here."""

from __future__ import annotations

import re

import objectives_results
import pytest
import run_results
from bench_engine import Measured, write_results
from bench_mfu import Limit, ModelShapes, Work
from conftest import store_for
from objectives_results import section
from results_file import HEAD, RESULTS, replace_section, sections

from jobs.config import PROFILES
from jobs.errors import InputError
from jobs.metrics import KEYS, KL_CLOSED, figure_rows, markdown_table
from jobs.phases.report import Compared

STAMP = re.compile(r"^Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+\.$", re.MULTILINE)


def test_a_section_is_replaced_and_the_others_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    replace_section(path, "bench", "## bench\n\nfirst")
    replace_section(path, "objectives", "## objectives\n\ntable one")
    replace_section(path, "demo", "## demo\n\nphase times")
    assert path.read_text().startswith(HEAD)
    assert list(sections(path.read_text())) == ["bench", "objectives", "demo"]
    before = path.read_text()

    replace_section(path, "objectives", "## objectives\n\ntable two\nwith a second line\n")
    after = path.read_text()
    assert sections(after) == {"bench": "## bench\n\nfirst",
                               "objectives": "## objectives\n\ntable two\nwith a second line",
                               "demo": "## demo\n\nphase times"}
    # everything outside the replaced section is the same bytes, in the same place
    old, new = before.split("table one"), after.split("table two\nwith a second line")
    assert old[0] == new[0] and old[1] == new[1]


def test_a_file_with_a_broken_section_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(HEAD + "\n<!-- results: bench -->\nhalf a section\n")
    with pytest.raises(ValueError, match="section 'bench' has 1 begin and 0 end markers"):
        replace_section(path, "bench", "new")
    assert path.read_text() == HEAD + "\n<!-- results: bench -->\nhalf a section\n"
    with pytest.raises(ValueError, match="section name"):
        replace_section(path, "Bench results", "new")


def test_the_committed_results_file_has_the_sections_its_commands_write():
    # `run` is the demo's; a second profile's run has its own (`tests/run_results.py --section run-<profile>`)
    written = {"run", "bench", "objectives", *(f"run-{profile}" for profile in PROFILES)}
    assert {"bench", "objectives"} <= set(sections(RESULTS.read_text())) <= written


def test_make_bench_writes_its_section_with_the_cpu_and_the_date(tmp_path):
    path = tmp_path / "RESULTS.md"
    replace_section(path, "objectives", "kept")
    shapes = ModelShapes(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=32)
    limit = Limit(rows=512, gflops=10.0, decode_gflops=9.0, per_shape={"q_proj 8x8": 10.0}, threads=1)
    measured = [Measured("teacher", "HF generate", 10, 2.0, "sampled tokens/s", Work(shapes, flops=4e9)),
                Measured("teacher", "engine", 10, 1.0, "sampled tokens/s", Work(shapes, flops=4e9))]
    write_results(path, "cpu: a test CPU; 2 cores", "engine: cpu float32", limit, measured, ["- a note"],
                  "bench: teacher 2.00x")
    found = sections(path.read_text())
    assert found["objectives"] == "kept"
    assert STAMP.search(found["bench"]) and "- cpu: a test CPU; 2 cores" in found["bench"]
    assert "| teacher | engine | 10 | 1.0 | 10.0 | sampled tokens/s | 4 | 4.0 | 40.0% |" in found["bench"]
    assert found["bench"].endswith("`bench: teacher 2.00x`")


def compared(run_id: str, objective: str, kl_closed: float) -> Compared:
    return Compared(run_id, "fp", {"objective": objective, "steps": 4, "train_rows": 12}, 61.0,
                    {"kl_closed": kl_closed}, [])


def test_make_objectives_writes_the_reports_comparison_table():
    body = section([compared("ci-a", "sft", -1.5), compared("ci-b", "logit", 0.75)], "ci", "a test CPU, 2 cores")
    lines = body.splitlines()
    assert lines[0] == "## `make objectives`: the train objectives on the same data"
    assert STAMP.search(body) and "a test CPU, 2 cores" in body and "Profile `ci`; 2 runs" in body
    rows = [line for line in lines if line.startswith(("| sft", "| logit"))]
    assert [row.split(" | ")[0] for row in rows] == ["| sft, 4 steps (ci-a)", "| logit, 4 steps (ci-b)"]
    assert rows[0].split(" | ")[1] == "-150.0%" and rows[1].endswith("| 61 s |")


def test_make_objectives_without_runs_is_one_line_of_error():
    with pytest.raises(InputError, match="no evaluated run on this data"):
        section([], "ci", "a CPU")


def evaluated_run(run_id: str, split: str, objective: str, kl_closed: float) -> None:
    """The units the comparison reads (split, train, evaluate), written through the real store."""
    store = store_for(run_id)
    with store.writing("split", split) as out:
        out.write_jsonl("eval.jsonl", [])
    with store.writing("train", f"train-{run_id}") as out:
        out.metrics.update({"objective": objective, "steps": 4, "train_rows": 12})
    with store.writing("evaluate", f"evaluate-{run_id}") as out:
        out.write_json("metrics.json", {KL_CLOSED.key: kl_closed})
        out.write_jsonl("replies.jsonl", [{"prompt": "Who?", "teacher": "I.", "base": "AI.", "student": "I."}])


def test_objectives_results_compares_the_runs_on_the_last_runs_split_from_the_store(store_env, tmp_path, capsys):
    evaluated_run("results-sft", "split-one", "sft", -1.0)
    evaluated_run("results-logit", "split-one", "logit", 0.5)
    evaluated_run("results-other", "split-two", "logit", 0.9)
    path = tmp_path / "RESULTS.md"
    replace_section(path, "bench", "kept")
    assert objectives_results.main(["--profile", "ci", "--run-id", "results-logit", "--results", str(path)]) == 0
    found = sections(path.read_text())
    assert found["bench"] == "kept"
    rows = [line.split(" | ")[:2] for line in found["objectives"].splitlines() if "steps (results-" in line]
    assert rows == [["| logit, 4 steps (results-logit)", "50.0%"], ["| sft, 4 steps (results-sft)", "-100.0%"]]
    assert capsys.readouterr().out.strip() == f"objectives: 2 runs compared, written to {path}"

    # a run whose split never finished: one line, exit 2, the file untouched
    before = path.read_text()
    assert objectives_results.main(["--profile", "ci", "--run-id", "results-none", "--results", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: input runs/results-none/split has no _SUCCESS.json: run its phase first"]
    assert path.read_text() == before


def finished_run(run_id: str, *, evaluated: bool = True) -> dict:
    """A run's manifests and the files the run section reads, through the real store; returns evaluate's figures."""
    store = store_for(run_id)
    with store.writing("ingest", "fp") as out:
        out.metrics["shards"] = [0, 1]
    for shard, hit in ((0, 1), (1, 0)):
        with store.writing(f"teacher/shard-{shard:05d}", "fp") as out:
            out.metrics["cache_hit"] = hit
    with store.writing("audit", "fp") as out:
        out.write_json("audit.json", {"kept": 90, "rows_in": 96, "trimmed": 3})
    with store.writing("train", "fp") as out:
        out.metrics.update({"objective": "logit", "steps": 12, "settings": {"top_k": 256}, "train_rows": 90,
                            "first_loss": 3.1, "last_loss": 2.2, "first_loss_mean": 3.0, "last_loss_mean": 2.3,
                            "val_loss_last": 2.4})
    figures = {**{key: 0.25 for key in KEYS}, "eval_prompts": 8, "device": "cpu", "dtype": "float32",
               "backend": "local", "cached_figures": []}
    if evaluated:
        with store.writing("evaluate", "fp") as out:
            out.write_json("metrics.json", figures)
            out.metrics["cached"] = ["base replies"]
    return figures


def test_run_results_writes_a_runs_phase_times_and_its_reports_figures(store_env, tmp_path, capsys):
    figures = finished_run("results-run")
    path = tmp_path / "RESULTS.md"
    replace_section(path, "bench", "kept")
    assert run_results.main(["--profile", "ci", "--run-id", "results-run", "--results", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"run results-run: written to {path}"
    found = sections(path.read_text())
    assert list(found) == ["bench", "run"] and found["bench"] == "kept"
    body = found["run"].splitlines()
    assert body[0] == "## `make run`: run `results-run`, phase times and figures" and STAMP.match(body[2])
    assert "Objective logit, 12 steps, top k 256; 90 training rows, 8 held-out prompts; cpu float32" in body[4]
    units = [line.split(" | ")[0][2:] for line in body if re.match(r"^\| [a-z]+(/shard-\d+)? \| \d", line)]
    assert units == ["ingest", "teacher/shard-00000", "teacher/shard-00001", "audit", "train", "evaluate"]
    assert any(line.startswith("| teacher/shard-00000 |") and "teacher's cache" in line for line in body)
    assert any(line.startswith("| evaluate |") and "1 parts read from evaluate's cache" in line for line in body)
    # the figure table is the report's (and the model card's) evaluate rows, line for line
    evaluate_lines = markdown_table(figure_rows(figures)).splitlines()[2:]
    assert [line for line in body if line in evaluate_lines] == evaluate_lines

    # a second profile's run goes to a section of its own, the first one kept
    assert run_results.main(["--profile", "ci", "--run-id", "results-run", "--results", str(path),
                             "--section", "run-ci"]) == 0
    assert list(sections(path.read_text())) == ["bench", "run", "run-ci"]


def test_run_results_of_an_unfinished_run_is_one_line_of_error(store_env, tmp_path, capsys):
    finished_run("results-unfinished", evaluated=False)
    path = tmp_path / "RESULTS.md"
    assert run_results.main(["--run-id", "results-unfinished", "--results", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: run results-unfinished: its evaluate phase has not finished (no evaluate/_SUCCESS.json)"]
    assert not path.exists()
