"""`make objectives`, after its runs: the comparison of the objectives trained on the same data, as every run's
report has it (`jobs.phases.report`: the evaluated runs whose split is this run's), written to the `objectives`
section of docs/RESULTS.md with the CPU and the date. Run with the run options of the last run (its id names the
data), inside the local S3 server (`workflows.local.s3 -- ...`)."""

from __future__ import annotations

import sys

from results_file import machine, stamp, write_run_section

from jobs.config import PipelineConfig
from jobs.errors import InputError
from jobs.page import markdown_block
from jobs.phases.base import PhaseConfig
from jobs.phases.report import Compared, comparison_table, same_data
from jobs.store import StoreSettings


def section(runs: list[Compared], profile: str, cpu: str) -> str:
    """The section's body: when and where, what data, and the report's comparison table."""
    if not runs:
        raise InputError("no evaluated run on this data: run `make objectives` (or its runs) first")
    rows = {run.train["train_rows"] for run in runs if "train_rows" in run.train}
    data = f"{', '.join(map(str, sorted(rows)))} training rows" if rows else "the same training rows"
    return "\n".join(["## `make objectives`: the train objectives on the same data", "", stamp(cpu), "",
                      f"Profile `{profile}`; {len(runs)} runs on one split ({data}; held-out figures on its eval "
                      "prompts). The table is the one each run's report shows (`jobs/phases/report.py`); the "
                      "train time is the phase's wall time on that machine.", "",
                      *markdown_block(comparison_table(runs))])


def body(pipeline: PipelineConfig, settings: StoreSettings, run_id: str) -> tuple[str, str]:
    runs = same_data(PhaseConfig(run_id=run_id, pipeline=pipeline, store_settings=settings))
    return section(runs, pipeline.profile, machine()), f"objectives: {len(runs)} runs compared,"


def main(argv: list[str] | None = None) -> int:
    return write_run_section(__doc__ or "", "objectives", body, argv)


if __name__ == "__main__":
    sys.exit(main())
