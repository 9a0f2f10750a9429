"""The stand-in as a child process, for tests, benchmarks and the runner (`TinkerServer`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from workflows.local.loopback import free_port, stop_process, wait_until_answering


class TinkerServer:
    """The server as a subprocess (so stopping or killing a client never stops it), for tests and the runner:

        with TinkerServer(data_dir, latency=0, fault_rate=0).start() as server:
            env = server.env()  # TINKER_BASE_URL, TINKER_API_KEY (a placeholder tml- key), TINKER_TELEMETRY=0

    Its output goes to `<data_dir>/tinker-server.log`; `stats()` reads the request and fault counts."""

    def __init__(self, data_dir: Path, latency: float = 0.0, fault_rate: float = 0.0, fault_seed: int = 0,
                 dtype: str = "auto", max_batch: int = 64, port: int | None = None,
                 extra_args: list[str] | None = None, models: dict[str, Path] | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.args = ["--latency", str(latency), "--fault-rate", str(fault_rate), "--fault-seed", str(fault_seed),
                     "--dtype", dtype, "--max-batch", str(max_batch),
                     *(arg for name, folder in (models or {}).items() for arg in ("--model", f"{name}={folder}")),
                     *(extra_args or [])]
        self.api_key = "tml-local-" + uuid.uuid4().hex[:12]
        self._process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "tinker-server.log"

    def env(self) -> dict[str, str]:
        return {"TINKER_BASE_URL": self.base_url, "TINKER_API_KEY": self.api_key, "TINKER_TELEMETRY": "0"}

    def start(self, timeout: float = 60.0) -> TinkerServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        repo = Path(__file__).resolve().parents[3]  # workflows/local/tinker/process.py
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "ab") as sink:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workflows.local.tinker", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), *self.args],
                stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, env=env, cwd=repo, start_new_session=True)
        try:
            wait_until_answering(self._process, f"{self.base_url}/_local/stats", timeout, "tinker server",
                                 self.log_path)
            return self
        except BaseException:
            self.stop()
            raise

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/_local/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self._process, grace=30)

    def __enter__(self) -> TinkerServer:
        return self if self._process else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


