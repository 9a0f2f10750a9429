"""`python -m jobs <command> ...`: builds a phase's typed config from a profile, a YAML file and overrides.

This is the exact command each container runs. It reads the environment only for the store's location
and credentials; everything else comes from its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from jobs import interactive
from jobs.backends import check_credentials
from jobs.card import card_bytes
from jobs.config import PipelineConfig, digest
from jobs.errors import InputError, TransientError
from jobs.phases import PHASES
from jobs.phases.base import PhaseConfig
from jobs.prompts import source_bytes
from jobs.run_options import OneLineParser, add_input_options, add_run_options, input_overrides, pipeline_config
from jobs.store import StoreSettings, sha256_bytes

TOOLS = ("run-id", "chat", "review")


def derive_run_id(pipeline: PipelineConfig, settings: StoreSettings) -> str:
    """`<profile>-<hash>` of the card's and prompts' bytes and the whole config: same inputs, same run."""
    inputs = {"card": sha256_bytes(card_bytes(pipeline.ingest, settings)),
              "prompts": sha256_bytes(source_bytes(pipeline.ingest, settings)),
              "config": pipeline.model_dump(mode="json")}
    return f"{pipeline.profile}-{digest(inputs)[:12]}"


def write_output_parameters(metrics: dict, folder: Path) -> None:
    """Each figure as a file, where Argo reads output parameters (`valueFrom.path`)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # not in a pod and no folder asked for: figures are in the manifest anyway
    for name, value in metrics.items():
        text = value if isinstance(value, str) else json.dumps(value)
        (folder / name).write_text(text)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m jobs", description="Character prompt distillation phases.")
    p.add_argument("command", choices=PHASES + TOOLS, help="a pipeline phase, or a tool")
    add_run_options(p)
    add_input_options(p)
    p.add_argument("--shard", type=int, help="shard index (teacher)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        pipeline = pipeline_config(args, input_overrides(args))
        settings = StoreSettings.from_env()
        run_id = args.run_id or derive_run_id(pipeline, settings)
        if args.command == "run-id":
            print(run_id)
            return 0
        check_credentials(pipeline)
        config = PhaseConfig(run_id=run_id, pipeline=pipeline, store_settings=settings, shard=args.shard)
        if args.command in TOOLS:
            getattr(interactive, args.command)(config)
            return 0
        metrics = importlib.import_module(f"jobs.phases.{args.command}").main(config)
        write_output_parameters(metrics, Path(os.environ.get("DISTILL_OUTPUTS_DIR", "/tmp/outputs")))
        return 0
    except (InputError, TransientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
