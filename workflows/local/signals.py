"""SIGTERM, SIGINT and SIGHUP as an exception in the main thread, so that `with` blocks and `finally` clauses
run when a pod is deleted, a CI job cancelled or a terminal closed: children stop, the S3 server shuts down."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """Like KeyboardInterrupt, no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


@contextmanager
def stop_on_signals() -> Iterator[None]:
    def stop(signum, _frame):
        for each in SIGNALS:  # a second signal must not cut the clean-up short
            signal.signal(each, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {each: signal.signal(each, stop) for each in SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)
