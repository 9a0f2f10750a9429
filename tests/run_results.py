"""After a `make run`: that run's phase times and its figure table (the rows its report shows) as the `run` section
of docs/RESULTS.md, with the CPU and the time the run finished. Everything comes from the run's manifests and
evaluate's figures in the store; the run options (or --run-id) only name the run. Run inside the local S3 server,
on the machine the run ran on:

    .venv/bin/python -m workflows.local.s3 --data-dir .distill -- .venv/bin/python tests/run_results.py [run options]
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from results_file import machine, stamp, write_run_section

from jobs.config import PipelineConfig
from jobs.errors import InputError
from jobs.metrics import HEADER
from jobs.page import Table, markdown_block
from jobs.phases import PHASES
from jobs.phases.base import units
from jobs.phases.report import figures
from jobs.store import ArtifactStore, StoreSettings

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # a manifest's finished_at


def finished(manifest: dict) -> datetime:
    return datetime.strptime(manifest["finished_at"], TIME_FORMAT).replace(tzinfo=UTC)


def note(unit: str, metrics: dict) -> str:
    """What a unit's time does not show: work it read from a cache instead of doing."""
    if metrics.get("cache_hit"):
        return "replies read from the teacher's cache"
    if unit == "evaluate":
        return f"{len(metrics.get('cached', []))} parts read from evaluate's cache"
    return ""


def section(store: ArtifactStore, cpu: str) -> str:
    """The section's body: what ran, each unit's wall time, first start to last end, and the report's figures."""
    store.require("ingest")  # its manifest names the teacher's shards
    done = {unit: found for phase in PHASES for unit in units(store, phase)
            if (found := store.manifest(unit)) is not None}
    for needed in ("audit", "train", "evaluate"):
        if needed not in done:
            raise InputError(f"run {store.run_id}: its {needed} phase has not finished (no {needed}/_SUCCESS.json)")
    train, ev = done["train"]["metrics"], store.read_json("evaluate", "metrics.json")
    starts = [finished(m).timestamp() - m["wall_s"] for m in done.values()]
    span = max(finished(m).timestamp() for m in done.values()) - min(starts)
    settings = "".join(f", {key.replace('_', ' ')} {value}" for key, value in train.get("settings", {}).items())
    times = Table.of(("unit", "seconds", "notes"), [(unit, f"{m['wall_s']:.1f}", note(unit, m["metrics"]))
                                                    for unit, m in done.items()])
    last = max(finished(m) for m in done.values())
    return "\n".join([
        f"## `make run`: run `{store.run_id}`, phase times and figures", "", stamp(cpu, last), "",
        f"Objective {train['objective']}, {train['steps']} steps{settings}; {train['train_rows']} training rows, "
        f"{ev['eval_prompts']} held-out prompts; {ev.get('device', '?')} {ev.get('dtype', '?')}, backend "
        f"{ev.get('backend', '?')}. From its first phase's start to its last phase's end: {span:.0f} s (phases "
        "that ran side by side overlap; a phase reused from an earlier run shows that run's time).", "",
        *markdown_block(times), "", "The figures its report shows:", "",
        *markdown_block(Table.of(HEADER, figures(train, ev, store.read_json("audit", "audit.json"))))])


def body(pipeline: PipelineConfig, settings: StoreSettings, run_id: str) -> tuple[str, str]:
    return section(ArtifactStore(settings, run_id), machine()), f"run {run_id}:"


def main(argv: list[str] | None = None) -> int:
    return write_run_section(__doc__ or "", "run", body, argv)


if __name__ == "__main__":
    sys.exit(main())
