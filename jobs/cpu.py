"""This machine's processor as /proc/cpuinfo names it: for the engine's precision choice and beside every timing."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no name or flags known (so no native bf16 is assumed)
        return ""


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def cpu_flags() -> set[str]:
    return {flag for line in _cpuinfo().splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}
