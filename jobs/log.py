"""Structured logs (JSON lines in a pod, readable lines at a terminal) and progress for long loops."""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog

_configured = False


def _interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("DISTILL_LOG_FORMAT") != "json"


def get_logger(name: str = "jobs") -> structlog.stdlib.BoundLogger:
    global _configured
    if not _configured:
        renderer = (structlog.dev.ConsoleRenderer(colors=False) if _interactive()
                    else structlog.processors.JSONRenderer())
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso", utc=True), renderer],
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        _configured = True
    return structlog.get_logger(name)


class Progress:
    """Long work's progress: a tqdm bar at a terminal, a structured log line about every 10% in a pod."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._started, self._next_log = time.time(), max(1, total // 10)
        self._bar = None
        if _interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix(fields)
        elif self.done >= self._next_log or self.done >= self.total:
            get_logger().info("progress", task=self.desc, done=self.done, total=self.total,
                              elapsed_s=round(time.time() - self._started, 1), **fields)
            self._next_log = self.done + max(1, self.total // 10)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
