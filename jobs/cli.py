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

from jobs.config import PROFILES, PipelineConfig, backend_override, digest, load_pipeline_config
from jobs.errors import InputError, TransientError
from jobs.phases import PHASES
from jobs.store import StoreSettings, check_run_id, sha256_bytes

TOOLS = ("run-id", "chat", "review")


def derive_run_id(pipeline: PipelineConfig, settings: StoreSettings) -> str:
    """`<profile>-<hash>` of the card's and prompts' bytes and the whole config: same inputs, same run."""
    from jobs.card import card_bytes
    from jobs.prompts import source_bytes

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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are bad input like any other: one line, exit 2 (not the usage block)."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m jobs", description="Character prompt distillation phases.")
    p.add_argument("command", choices=PHASES + TOOLS, help="a pipeline phase, or a tool")
    p.add_argument("--profile", default="demo", choices=PROFILES, help="built-in profile (default: demo)")
    p.add_argument("--config", help="YAML file merged over the profile")
    p.add_argument("--config-yaml", default="", help="inline YAML merged over the profile and --config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one setting")
    p.add_argument("--backend", default="", choices=("", "local", "tinker"),
                   help="model.backend, over the profile and config (default: theirs)")
    p.add_argument("--run-id", help="run id (default: derived from card, prompts and config)")
    p.add_argument("--shard", type=int, help="shard index (teacher)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.run_id is not None:
            check_run_id(args.run_id)
        overrides = [*args.set, *backend_override(args.backend)]
        pipeline = load_pipeline_config(args.profile, args.config, overrides, inline=args.config_yaml)
        settings = StoreSettings.from_env()
        run_id = args.run_id or derive_run_id(pipeline, settings)
        if args.command == "run-id":
            print(run_id)
            return 0
        from jobs.backends import check_credentials
        from jobs.phases.base import PhaseConfig

        check_credentials(pipeline)
        config = PhaseConfig(run_id=run_id, pipeline=pipeline, store_settings=settings, shard=args.shard)
        if args.command in TOOLS:
            from jobs import interactive

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
