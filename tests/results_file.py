"""docs/RESULTS.md, the one file of measured figures: a section per command that measures (`make bench`,
`make objectives`), each between its own markers. A command replaces its section and keeps every other one, so
the file holds the last result of each, with the CPU and the date it was measured on."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from jobs.cli import derive_run_id
from jobs.config import PipelineConfig
from jobs.cpu import cpu_name
from jobs.errors import InputError, TransientError
from jobs.run_options import add_input_options, add_run_options, input_overrides, pipeline_config
from jobs.store import StoreSettings

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEAD = """# Measured results

Written by the commands that measure, never by hand: each replaces its own section (between its `<!-- ... -->`
markers) and keeps the others. Figures compare only within one section, measured on one machine at one time;
from a machine under other load they do not compare at all.
"""
NAME = re.compile(r"[a-z][a-z0-9-]*")


def markers(name: str) -> tuple[str, str]:
    if not NAME.fullmatch(name):
        raise ValueError(f"section name {name!r}: lower-case letters, digits and '-'")
    return f"<!-- results: {name} -->", f"<!-- end: {name} -->"


def stamp(cpu: str, when: datetime | None = None) -> str:
    """The line every section opens with: when (default: now) and where its figures were measured."""
    return f"Measured {when or datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu}."


def sections(text: str) -> dict[str, str]:
    """Every section's body, by name, in the file's order."""
    return {name: body.strip("\n") for name, body in
            re.findall(r"^<!-- results: ([a-z0-9-]+) -->\n(.*?)^<!-- end: \1 -->$", text, re.MULTILINE | re.DOTALL)}


def replace_section(path: Path, name: str, body: str) -> None:
    """Write `body` as section `name` of the file at `path`: in place of the section's old body, or appended when
    the file (made with its heading when missing) has none yet. The file is replaced whole, never half written."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else HEAD
    block = f"{begin}\n{body.strip(chr(10))}\n{end}"
    found = [text.count(begin), text.count(end)]
    if found == [1, 1] and text.index(begin) < text.index(end):
        before, rest = text.split(begin)
        text = before + block + rest.split(end, 1)[1]
    elif found == [0, 0]:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        raise ValueError(f"{path}: section {name!r} has {found[0]} begin and {found[1]} end markers, not one of "
                         "each in order: mend the file by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(text)
    part.replace(path)


def machine() -> str:
    """The CPU a section was measured on, as its stamp names it, with the kernels torch runs there (a CPU limited
    to AVX2, e.g. ATEN_CPU_CAPABILITY=avx2, says so: `model.dtype=auto` is float32 there)."""
    import torch

    return f"{cpu_name()}, {os.cpu_count()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}"


# a run's section: (its config, the store's settings, its run id) -> (its body, what the printed line opens with)
RunSection = Callable[[PipelineConfig, StoreSettings, str], tuple[str, str]]


def write_run_section(doc: str, name: str, body: RunSection, argv: list[str] | None = None) -> int:
    """The main of a command that writes section `name` from a run's data in the store: the run options say which
    run (as `make run` derives its id), `--results` which file; bad input or an unreachable store is one line."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_run_options(parser)
    add_input_options(parser)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (docs/RESULTS.md)")
    parser.add_argument("--section", default=name, help=f"the section it replaces (default {name}; e.g. "
                        f"{name}-demo-large for a second profile's)")
    args = parser.parse_args(argv)
    try:
        pipeline = pipeline_config(args, input_overrides(args))
        settings = StoreSettings.from_env()
        text, said = body(pipeline, settings, args.run_id or derive_run_id(pipeline, settings))
        replace_section(args.results, args.section, text)
    except (InputError, TransientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{said} written to {args.results}")
    return 0
