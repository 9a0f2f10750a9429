"""`make objectives`, after its runs: the comparison of the objectives trained on the same data, as every run's
report has it (`jobs.phases.report`: the evaluated runs whose split is this run's), written to the `objectives`
section of docs/RESULTS.md with the CPU and the date. Run with the run options of the last run (its id names the
data), inside the local S3 server (`workflows.local.s3 -- ...`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from results_file import RESULTS, replace_section, stamp

from jobs.cli import derive_run_id
from jobs.cpu import cpu_name
from jobs.errors import InputError, TransientError
from jobs.page import markdown_block
from jobs.phases.base import PhaseConfig
from jobs.phases.report import Compared, comparison_table, same_data
from jobs.run_options import add_input_options, add_run_options, input_overrides, pipeline_config
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(parser)
    add_input_options(parser)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (docs/RESULTS.md)")
    args = parser.parse_args(argv)
    try:
        pipeline = pipeline_config(args, input_overrides(args))
        settings = StoreSettings.from_env()
        run_id = args.run_id or derive_run_id(pipeline, settings)
        runs = same_data(PhaseConfig(run_id=run_id, pipeline=pipeline, store_settings=settings))
        cpu = f"{cpu_name()}, {os.cpu_count()} cores"
        replace_section(args.results, "objectives", section(runs, pipeline.profile, cpu))
    except (InputError, TransientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"objectives: {len(runs)} runs compared, written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
