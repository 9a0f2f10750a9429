"""The run options every command line shares, with one meaning in each: `python -m jobs`, the local runner
(`python -m workflows.local.runner`) and `python -m workflows.submit`.

They say which built-in profile, what the user layers over it (a YAML file, inline YAML, single settings), the
backend and the run id. An entry adds its own options beside them and may add settings of its own, which go over
--set: the runner and `python -m jobs` take --card and --prompts (`add_input_options`), so that `make chat CARD=...`
names the run `make run CARD=...` made; submit does not (a pod cannot read this machine's files).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from jobs.backends import BACKENDS
from jobs.config import PROFILES, PipelineConfig, backend_override, load_pipeline_config, user_layers
from jobs.errors import InputError
from jobs.prompts import SYNTHESIZE
from jobs.store import check_run_id

# the registered backends; empty keeps the profile's and config's (the DAG passes its `backend` parameter, empty
# by default, as it is)
BACKEND_CHOICES = ("", *BACKENDS)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are bad input like any other: one line, exit 2 (not the usage block)."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


def config_file(path: str) -> str:
    """--config names a file, checked while parsing: inline YAML given there is refused with a pointer to the
    option that takes it, not read as a path."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no such file {path!r} (--config names a YAML file; inline YAML goes "
                                         "in --config-yaml)")
    return path


def add_run_options(parser: argparse.ArgumentParser) -> None:
    options = parser.add_argument_group("run options (shared by python -m jobs, the local runner, workflows.submit)")
    options.add_argument("--profile", default="demo", choices=PROFILES, help="built-in profile (default: demo)")
    options.add_argument("--config", type=config_file, metavar="FILE", help="YAML file merged over the profile")
    options.add_argument("--config-yaml", default="", metavar="TEXT",
                         help="inline YAML merged over the profile and --config")
    options.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="one setting over the profile, --config and --config-yaml (repeatable)")
    options.add_argument("--backend", default="", choices=BACKEND_CHOICES,
                         help="model.backend for every phase, over everything else (default: the profile's and "
                              "config's)")
    # checked while parsing, so before anything is written under it
    options.add_argument("--run-id", type=check_run_id,
                         help="run id (default: derived from card, prompts and config, as `python -m jobs run-id` "
                              "prints it)")


def add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--card", help="a character card: YAML, Character Card V2/V3 JSON or a PNG with one "
                                       "(sets ingest.card)")
    parser.add_argument("--prompts", help="a JSONL/Parquet prompt file, or `synthesize` (sets ingest.prompts; with "
                                          "--card alone the prompts are synthesized)")


def input_overrides(args: argparse.Namespace) -> list[str]:
    """--card and --prompts as settings. A local path is made absolute, as the steps may run in another folder
    (and the run id, a hash of the config, then does not depend on the folder it was given from); JSON quoting
    keeps it a string whatever characters it holds (JSON is YAML)."""
    def value(source: str) -> str:
        named = source == SYNTHESIZE or source.startswith(("s3://", "hf:", "builtin:"))
        return json.dumps(source if named else str(Path(source).resolve()))

    return [f"ingest.{key}={value(source)}" for key, source in (("card", args.card), ("prompts", args.prompts))
            if source]


def pipeline_config(args: argparse.Namespace, settings: Sequence[str] = ()) -> PipelineConfig:
    """The validated config the options describe: the profile, the user's layers, --backend over them all."""
    return load_pipeline_config(args.profile, args.config, [*args.set, *settings, *backend_override(args.backend)],
                                inline=args.config_yaml)


def workflow_parameters(args: argparse.Namespace, settings: Sequence[str] = ()) -> dict[str, str]:
    """The options as the DAG's `profile`, `config` and `backend` parameters, which every step passes on to
    `python -m jobs` as --profile, --config-yaml and --backend. The user's layers travel as one inline YAML
    (a step cannot read the user's files), `{}` when there are none; an empty backend is not sent (the
    template's empty default keeps the profile's)."""
    layers = user_layers(args.config, [*args.set, *settings], inline=args.config_yaml)
    return {"profile": args.profile, "config": yaml.safe_dump(layers, sort_keys=True).strip() if layers else "{}",
            **({"backend": args.backend} if args.backend else {})}
