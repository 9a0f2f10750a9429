"""Structured logs (JSON lines in a pod, readable lines at a terminal) and progress for long loops."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence

import structlog

_configured = False
# a pod's progress lines come at least this often while a bar is open, so nobody waits on a silent step for long
HEARTBEAT_S = 20.0
# how often a terminal's bar redraws while nothing advances (its elapsed time keeps counting)
REDRAW_S = 1.0


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
    """Long work's progress: a tqdm bar at a terminal; in a pod, a structured log line ("progress") when it starts,
    on its first step, about every 10%, at a new stage, at the end, and whenever `every_s` seconds passed without
    one: a heartbeat thread writes it while a single long call (a forward pass over every row) keeps the loop from
    advancing.

    `desc` names the work, `stage` what of it runs now: "teacher shard 0" at "turn 2/4: visitor questions". `stages`
    names the stages by their counts instead, in order (the stage is where `done` has reached). A line holds task
    (desc and stage), stage, done, total, elapsed_s, eta_s (at this run's rate: `initial` steps were done before it
    started, e.g. by the run it resumes) and the fields of the last `advance`. `each` logs every step."""

    def __init__(self, total: int, desc: str, stage: str = "", stages: Sequence[tuple[int, str]] = (),
                 initial: int = 0, each: bool = False, every_s: float = HEARTBEAT_S):
        self.total, self.desc, self.done = total, desc, initial
        self._stage, self._stages = stage, list(stages)
        self.initial, self.each, self.every_s = initial, each, every_s
        self._started = self._logged = time.time()
        self._next_log = initial + max(1, total // 10)
        self._fields: dict = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._bar = None
        if _interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=self.task, dynamic_ncols=True)
        else:
            self._log()
        self._beat = threading.Thread(target=self._heartbeat, name=f"progress {desc}", daemon=True)
        self._beat.start()

    @property
    def stage(self) -> str:
        reached = 0
        for count, name in self._stages:
            reached += count
            if self.done < reached:
                return name
        return self._stages[-1][1] if self._stages else self._stage

    @property
    def task(self) -> str:
        return f"{self.desc} {self.stage}" if self.stage else self.desc

    def eta_s(self) -> float | None:
        """Seconds left at this run's rate so far; None before its first step."""
        done = self.done - self.initial
        if done <= 0:
            return None
        return round((time.time() - self._started) / done * max(self.total - self.done, 0), 1)

    def advance(self, n: int = 1, **fields) -> None:
        with self._lock:
            stage = self.stage
            self.done += n
            self._fields = fields
            if self._bar is not None:
                if self.stage != stage:
                    self._bar.set_description(self.task, refresh=False)
                self._bar.update(n)
                if fields:
                    self._bar.set_postfix(fields)
            elif (self.each or self.done - self.initial == n or self.done >= self._next_log or self.stage != stage
                  or self.done >= self.total or time.time() - self._logged >= self.every_s):
                self._log()
                while self._next_log <= self.done:
                    self._next_log += max(1, self.total // 10)

    def _log(self) -> None:
        eta = self.eta_s()
        extra = {**({"stage": self.stage} if self.stage else {}), **({"eta_s": eta} if eta is not None else {})}
        get_logger().info("progress", task=self.task, done=self.done, total=self.total,
                          elapsed_s=round(time.time() - self._started, 1), **extra, **self._fields)
        self._logged = time.time()

    def _heartbeat(self) -> None:
        wait = REDRAW_S if self._bar is not None else self.every_s
        while not self._closed.wait(wait):
            with self._lock:
                if self._closed.is_set():
                    return
                if self._bar is not None:
                    self._bar.refresh()
                    continue
                silent = time.time() - self._logged
                if silent >= self.every_s:
                    self._log()
                    silent = 0.0
            wait = self.every_s - silent

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
