"""Verify on reuse: a finished unit's outputs are checked against its manifest before they are reused.

Every output's size is checked against one listing of the unit's prefix, and its sha256 against a streamed read
(`DIGESTS`): on the demo the whole run's outputs hash in a few seconds of CPU, mostly export's merged model. The
units a unit keeps under its own prefix (train's `adapters/final` and `checkpoints/step-N`) are checked with it. A
mismatch is logged, one line per file with the expected and actual digest and size, and the unit is redone as if
its manifest were absent; every unit downstream of it is redone too, because a manifest records the `write_id` of
each input it read and a redone unit has a new one.

The user's card and prompts cannot be recomputed: ingest records their sha256 (`sources`), and an S3 object that
no longer matches under the same run is a one-line error, not a silent new ingest.

`python -m jobs.verify [--run-id R]` (`make verify [RUN=R]`) checks a whole run, or every run in the store, and prints
what is intact, what is not, what a `make run` would redo, and which units are being written (their leases). Exit 0:
all intact; 1: something would be redone; 2: a source changed under a run, or bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from jobs.card import card_bytes
from jobs.config import IngestConfig
from jobs.errors import InputError, TransientError
from jobs.lease import Lease, describe
from jobs.phases import PHASE, PHASES
from jobs.prompts import SYNTHESIZE, prompt_source, source_bytes
from jobs.run_options import OneLineParser
from jobs.store import MANIFEST, ArtifactStore, StoreSettings, sha256_bytes

# sha256 too, not size alone (a same-size edit is the likely one). Measured against rclone serve s3 on a 2-core AMD
# EPYC (SHA-NI): export's 538 MB float32 model costs 0.65 s of CPU to read and hash here and 2.3 s in rclone to serve,
# train's adapter and three checkpoints (177 MB) 0.3 s and 0.9 s; hashlib alone runs at ~1.4 GB/s. A run that skips
# every unit spends about 4 CPU-seconds on it: a few seconds, for outputs known to be intact
DIGESTS = True
# the most a source is read for its digest (ingest refuses more than ingest.max_input_mb anyway)
SOURCE_MAX_MB = 1024


@dataclass(frozen=True)
class Mismatch:
    """One output that is not what its manifest says: missing (actual_bytes None), another size, or another sha256."""

    unit: str
    key: str
    expected_sha256: str | None
    actual_sha256: str | None
    expected_bytes: int | None
    actual_bytes: int | None

    def fields(self) -> dict[str, Any]:
        return {"file": self.key, "expected_sha256": self.expected_sha256, "actual_sha256": self.actual_sha256,
                "expected_bytes": self.expected_bytes, "actual_bytes": self.actual_bytes}

    def line(self) -> str:
        if self.actual_bytes is None:
            return f"{self.key}: missing"
        if self.actual_sha256 is None:
            return f"{self.key}: {self.actual_bytes} bytes, its manifest says {self.expected_bytes}"
        return (f"{self.key}: sha256 {str(self.actual_sha256)[:12]}…, its manifest says "
                f"{str(self.expected_sha256)[:12]}… ({self.actual_bytes} bytes, expected {self.expected_bytes})")


def nested_units(store: ArtifactStore, unit: str, sizes: dict[str, int]) -> list[str]:
    """Units kept under `unit`'s prefix, each with its own manifest (train's adapters and checkpoints)."""
    root = store.key("") + "/"
    own = store.key(unit, MANIFEST)
    return sorted(key[len(root):-len("/" + MANIFEST)] for key in sizes
                  if key.endswith("/" + MANIFEST) and key != own)


def check_unit(store: ArtifactStore, unit: str, manifest: dict, digests: bool = DIGESTS) -> list[Mismatch]:
    """Every output of the unit (and of the units under it) against its manifest: size always, sha256 with
    `digests`. One listing of the prefix gives every size; only outputs of the right size are read."""
    sizes = store.sizes(store.key(unit) + "/")
    found: list[Mismatch] = []
    manifests = {unit: manifest}
    for inner in nested_units(store, unit, sizes):
        inner_manifest = store.manifest(inner)
        if inner_manifest is None:
            found.append(Mismatch(inner, store.key(inner, MANIFEST), None, None, None, None))
        else:
            manifests[inner] = inner_manifest
    for owner, listed in manifests.items():
        for name, entry in sorted(listed.get("outputs", {}).items()):
            key = store.key(owner, name)
            expected_sha, expected_bytes = entry.get("sha256"), entry.get("bytes")
            size = sizes.get(key)
            if size is None:
                found.append(Mismatch(owner, key, expected_sha, None, expected_bytes, None))
            elif expected_bytes is not None and size != expected_bytes:
                found.append(Mismatch(owner, key, expected_sha, None, expected_bytes, size))
            elif digests:
                actual, size = store.digest_object(key)
                if actual != expected_sha:
                    found.append(Mismatch(owner, key, expected_sha, actual, expected_bytes, size))
    return found


def changed_inputs(manifest: dict, input_writes: dict[str, str | None]) -> list[str]:
    """The inputs written again since the unit read them (a manifest from before write ids were recorded: none)."""
    recorded = manifest.get("input_writes")
    if not recorded:
        return []
    return sorted(name for name, written in input_writes.items() if recorded.get(name) != written)


def reusable(store: ArtifactStore, unit: str, found: dict | None, fingerprint: str,
             input_writes: dict[str, str | None], log, digests: bool = DIGESTS) -> dict | None:
    """`found`, the unit's manifest, when its outputs can be reused as they are: written for this fingerprint, from
    the inputs as they are now, every output intact. Otherwise None, and the reason is logged (a line per bad file)."""
    if found is None or found.get("fingerprint") != fingerprint:
        return None
    rewritten = changed_inputs(found, input_writes)
    if rewritten:
        log.info("redo: inputs were written again since", inputs=rewritten)
        return None
    mismatches = check_unit(store, unit, found, digests)
    for mismatch in mismatches:
        log.warning("output mismatch", **mismatch.fields(), action="redo")
    return None if mismatches else found


# what a step logs about reuse and leases, as the local runner shows it: one line each
STEP_LINES = {
    "output mismatch": "{file} does not match its manifest (sha256 {actual_sha256}, {actual_bytes} bytes; expected "
                       "{expected_sha256}, {expected_bytes} bytes): redoing it",
    "redo: inputs were written again since": "redoing it: {inputs} written again since it ran",
    "cache entry mismatch": "cache entry {key} does not match its record (sha256 {actual_sha256}; expected "
                            "{expected_sha256}): computing it again",
    "skipped: another run wrote it": "reused (another run wrote it while this one waited)",
    "waiting for lease": "waiting for {holder}, which is writing it (waited {waited_s}s)",
    "lease taken over": "took the unit over from {holder}: {reason}",
    "lease lost": "lost its lease to {holder}",
}


def step_line(event: dict) -> str | None:
    """The line for one of a step's structured log events in STEP_LINES (a field it lacks reads '?'), else None."""
    template = STEP_LINES.get(str(event.get("event")))
    if template is None:
        return None
    fields = {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in event.items()}
    return template.format_map(defaultdict(lambda: "?", fields))


# -- the user's inputs
def source_record(ingest: IngestConfig, settings: StoreSettings) -> dict[str, dict[str, str]]:
    """What ingest read: the card's and the prompts' source and the sha256 of their raw bytes."""
    source = prompt_source(ingest)
    return {"card": {"uri": ingest.card, "sha256": sha256_bytes(card_bytes(ingest, settings))},
            "prompts": {"uri": source, "sha256": sha256_bytes(source_bytes(ingest, settings))}}


def changed_sources(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    """One line per S3 source whose bytes differ from those the run ingested, or that is gone (local files are the
    user's to edit: a changed one is a new run's input)."""
    lines = []
    for kind, was in sorted(recorded.items()):
        now = current.get(kind)
        if now is None or now["uri"] != was.get("uri") or not now["uri"].startswith("s3://"):
            continue
        if "error" in now:
            lines.append(f"{now['uri']} can no longer be read ({now['error']})")
        elif now["sha256"] != was.get("sha256"):
            lines.append(f"{now['uri']} changed since run ingested it (sha256 {str(was.get('sha256'))[:12]}…, now "
                         f"{now['sha256'][:12]}…)")
    return lines


def check_sources(run_id: str, previous: dict | None, current: dict[str, dict[str, str]]) -> None:
    """Refuses, in one line, a run whose S3 card or prompts changed since its ingest read them: its outputs cannot
    be recomputed from them."""
    changed = changed_sources((previous or {}).get("sources") or {}, current)
    if changed:
        raise InputError(f"run {run_id}: {'; '.join(changed)}: a run's inputs cannot be recomputed; put the "
                         "object back, or start a new run (without --run-id the run id follows the inputs)")


def current_sources(recorded: dict[str, dict[str, str]], settings: StoreSettings) -> dict[str, dict[str, str]]:
    """The sources a run recorded, read again: their sha256 now, or why they cannot be read."""
    card = recorded.get("card", {}).get("uri", "builtin:beethoven")
    prompts = recorded.get("prompts", {}).get("uri", "")
    ingest = IngestConfig(card=card, prompts="" if prompts == SYNTHESIZE else prompts, max_input_mb=SOURCE_MAX_MB)
    found = {}
    for kind, read in (("card", card_bytes), ("prompts", source_bytes)):
        if kind not in recorded:
            continue
        try:
            found[kind] = {"uri": recorded[kind]["uri"], "sha256": sha256_bytes(read(ingest, settings))}
        except (InputError, OSError) as exc:
            found[kind] = {"uri": recorded[kind]["uri"], "error": str(exc)}
    return found


# -- a whole run
@dataclass
class RunCheck:
    run_id: str
    intact: list[str] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=dict)  # unit -> what is wrong with it
    redo: list[str] = field(default_factory=list)  # every unit a `make run` would compute again, in DAG order
    errors: list[str] = field(default_factory=list)  # inputs that cannot be recomputed
    writing: dict[str, str] = field(default_factory=dict)  # unit -> the holder of its lease


def run_units(store: ArtifactStore, phase: str, ingest: dict | None) -> list[str]:
    if not PHASE[phase].sharded:
        return [phase]
    if ingest is not None:
        return [f"teacher/shard-{i:05d}" for i in ingest["metrics"]["shards"]]
    # no ingest manifest to list the shards: the shards that left one
    parts = [key.split("/") for key in store.list_keys(store.key(phase) + "/")]
    return sorted("/".join(p[2:4]) for p in parts if len(p) == 5 and p[4] == MANIFEST)


def check_run(store: ArtifactStore, digests: bool = DIGESTS) -> RunCheck:
    result = RunCheck(store.run_id)
    manifests: dict[str, dict | None] = {}
    redo: set[str] = set()
    for phase in PHASES:
        ingest = manifests.get("ingest")
        for unit in run_units(store, phase, ingest):
            manifest = manifests[unit] = store.manifest(unit)
            inputs = [name for read in PHASE[phase].reads for name in run_units(store, read, ingest)]
            if manifest is None:
                result.bad[unit] = ["no manifest (unfinished or never run)"]
                redo.add(unit)
                continue
            problems = [m.line() for m in check_unit(store, unit, manifest, digests)]
            for name in inputs:
                upstream = manifests.get(name)
                if upstream is None:
                    continue  # redone anyway, below
                recorded = manifest.get("input_writes", {}).get(name, upstream.get("write_id"))
                if recorded != upstream.get("write_id") or manifest["inputs"].get(name) != upstream["fingerprint"]:
                    problems.append(f"its input {name} was written again after it")
            if problems:
                result.bad[unit] = problems
                redo.add(unit)
            elif redo & set(inputs):
                redo.add(unit)
            else:
                result.intact.append(unit)
            if unit == "ingest" and manifest.get("sources"):
                changed = changed_sources(manifest["sources"], current_sources(manifest["sources"],
                                                                               store.settings))
                result.errors += [f"run {store.run_id}: {line}: cannot be recomputed" for line in changed]
    result.redo = [unit for unit in manifests if unit in redo]
    for unit in store.leased_units():
        lease = Lease(store, unit).read()
        if lease is not None:
            expires = float(lease.get("expires_at") or 0) - time.time()
            result.writing[unit] = f"{describe(lease)}, lease " + (f"expires in {expires:.0f}s" if expires > 0
                                                                  else f"expired {-expires:.0f}s ago")
    return result


def check_readable(store: ArtifactStore, digests: bool = DIGESTS) -> RunCheck:
    """`check_run`, except that a run whose manifests lack what this version writes (another version's, or not
    written by a phase) is reported as not intact, to be redone whole, instead of ending the listing of every run."""
    try:
        return check_run(store, digests)
    except (KeyError, TypeError, AttributeError) as exc:
        found = RunCheck(store.run_id, bad={"manifests": [f"not in the shape this version writes ({exc!r})"]})
        found.redo = list(PHASES)
        return found


def render(check: RunCheck) -> list[str]:
    lines = [f"run {check.run_id}: {len(check.intact)} units intact, {len(check.bad)} not, "
             f"{len(check.redo)} to redo"]
    if check.intact:
        lines.append("  intact      " + " ".join(check.intact))
    for unit, problems in check.bad.items():
        lines += [f"  not intact  {unit}: {problem}" for problem in problems]
    if check.redo:
        lines.append("  would redo  " + " ".join(check.redo))
    lines += [f"  writing     {unit}: by {holder}" for unit, holder in check.writing.items()]
    return lines


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m jobs.verify",
                      description="Check a run's (or every run's) outputs against their manifests.")
    p.add_argument("--run-id", help="the run to check (default: every run in the store)")
    p.add_argument("--sizes-only", action="store_true", help="check sizes, not sha256 (reads no object)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        settings = StoreSettings.from_env()
        listing = ArtifactStore(settings, "verify")
        listing.check_bucket()
        runs = listing.run_ids()
        if args.run_id and args.run_id not in runs:
            raise InputError(f"no run {args.run_id} in {settings.where}"
                             + (f" (runs: {', '.join(runs)})" if runs else " (it holds no run)"))
        checks = [check_readable(ArtifactStore(settings, run_id), digests=not args.sizes_only)
                  for run_id in ([args.run_id] if args.run_id else runs)]
    except (InputError, TransientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for check in checks:
        print("\n".join(render(check)))
    errors = [line for check in checks for line in check.errors]
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if not args.run_id:
        print(f"{len(checks)} runs: {sum(not c.redo for c in checks)} intact, {sum(bool(c.redo) for c in checks)} "
              "with units to redo")
    return InputError.exit_code if errors else (1 if any(c.redo for c in checks) else 0)


if __name__ == "__main__":
    sys.exit(main())
