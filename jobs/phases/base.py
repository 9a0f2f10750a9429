"""What every phase shares: its typed config, and the skip-or-run logic around a unit of output (verify on reuse,
one writer per unit)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jobs.backends import open_backend as open_configured
from jobs.backends.base import Backend
from jobs.config import PipelineConfig, digest
from jobs.lease import Lease
from jobs.log import get_logger
from jobs.phases import PHASE
from jobs.store import MANIFEST, ArtifactStore, StoreSettings, UnitWriter
from jobs.verify import check_sources, reusable, source_record


@dataclass(frozen=True)
class PhaseConfig:
    run_id: str
    pipeline: PipelineConfig
    store_settings: StoreSettings
    shard: int | None = None

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_settings, self.run_id)


def shard_unit(index: int) -> str:
    return f"teacher/shard-{index:05d}"


def units(store: ArtifactStore, phase: str) -> tuple[str, ...]:
    """The units a phase writes: its own, or one per shard that ingest assigned for a sharded phase."""
    if not PHASE[phase].sharded:
        return (phase,)
    return tuple(shard_unit(i) for i in store.require("ingest")["metrics"]["shards"])


def run_unit(config: PhaseConfig, phase: str, body: Callable[[UnitWriter], None], extra_key: object = None) -> dict:
    """Runs `body` unless the unit's manifest already matches this config and these inputs and its outputs are intact.

    The unit is the phase's own (a sharded phase's: its shard's). The fingerprint covers the config sections the
    phase declares (jobs.phases.TABLE), the fingerprint of every unit of the phases it reads, and `extra_key`;
    the code version is recorded in the manifest but not part of the key, so editing code does not
    silently redo expensive phases (pass a new run id to force that). Before a unit is reused its outputs are
    checked against its manifest and its inputs against the `write_id`s it recorded (`jobs.verify`): a mismatch
    redoes it, and so everything downstream. The unit is computed under its lease (`jobs.lease`): another run
    computing it first is waited for, and its output reused.
    """
    declared = PHASE[phase]
    if declared.sharded:
        assert config.shard is not None, f"a sharded phase ({phase}) refuses to start without --shard"
        unit = shard_unit(config.shard)
    else:
        unit = phase
    store, log = config.store, get_logger().bind(unit=unit, run_id=config.run_id)
    inputs = {name: store.require(name) for read in declared.reads for name in units(store, read)}
    input_fingerprints = {name: manifest["fingerprint"] for name, manifest in inputs.items()}
    input_writes = {name: manifest.get("write_id") for name, manifest in inputs.items()}
    fingerprint = digest({"unit": unit, "config": config.pipeline.section_hash(*declared.sections),
                          "inputs": input_fingerprints, "extra": extra_key})
    found = store.manifest(unit)
    record = {}
    if phase == "ingest":  # the user's card and prompts: nothing can recompute them
        record["sources"] = source_record(config.pipeline.ingest, config.store_settings)
        check_sources(config.run_id, found, record["sources"])
    done = reusable(store, unit, found, fingerprint, input_writes, log)
    if done is not None:
        log.info("skipped: outputs already match config and inputs", manifest=store.key(unit, MANIFEST))
        return done["metrics"]
    with Lease(store, unit) as lease:
        # another run may have written the unit since it was looked at (while this one waited for the lease)
        now = store.manifest(unit)
        if now is not None and (found is None or now.get("write_id") != found.get("write_id")):
            done = reusable(store, unit, now, fingerprint, input_writes, log)
            if done is not None:
                log.info("skipped: another run wrote it", waited_s=round(lease.waited_s, 1))
                return done["metrics"]
        log.info("started")
        with store.writing(unit, fingerprint, input_fingerprints, input_writes=input_writes, record=record,
                           before_manifest=lease.confirm) as out:
            body(out)
    log.info("finished", **{k: v for k, v in out.metrics.items() if isinstance(v, int | float | str)})
    return out.metrics


def open_backend(config: PhaseConfig) -> Backend:
    """The backend `model.backend` names (`jobs.backends`)."""
    return open_configured(config.pipeline, config.store, scratch_dir(config, "backend"))


def scratch_dir(config: PhaseConfig, name: str) -> Path:
    """A local working folder for large intermediate files (an emptyDir in a pod)."""
    root = Path(os.environ.get("DISTILL_SCRATCH") or tempfile.gettempdir()) / "distill" / config.run_id / name
    root.mkdir(parents=True, exist_ok=True)
    return root
