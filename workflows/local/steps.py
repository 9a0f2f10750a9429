"""A DAG step of the local runner and the executor that runs it as a local process (`ProcessExecutor`), with the
command, arguments, environment and volumes its container would get. `containers.ContainerExecutor` runs the
same step inside its phase image."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")


class UnsupportedFeature(Exception):
    """The template uses an Argo feature the local runner does not implement."""


class StepFailed(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code  # the step's exit code


@dataclass
class Step:
    task: str
    template: dict
    item: str | None
    values: dict[str, str]  # placeholder -> value for this step

    @property
    def label(self) -> str:
        return self.task if self.item is None else f"{self.task}({self.item})"


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise UnsupportedFeature(f"placeholder {{{{{key}}}}} is not supported or has no value")
        return values[key]

    return PLACEHOLDER.sub(one, text)


class ProcessExecutor:
    """Runs a step's container command as a local process."""

    def __init__(self, work: Path, shared: dict[str, Path], secrets: dict[str, str]):
        """`shared` maps volume names to one local folder kept across steps and runs (a pod starts with
        them empty); every other volume is a fresh folder per step."""
        self.work, self.shared, self.secrets = work, shared, secrets
        self._running: set[subprocess.Popen] = set()
        self._running_lock = threading.Lock()
        self._stopping = False

    def volume_dirs(self, step: Step) -> dict[str, Path]:
        """mount path -> local folder for this attempt of the step: its own volumes start empty, as a new pod's
        emptyDirs do (a retry does not see what the failed attempt left)."""
        folders = {}
        for mount in step.template["container"].get("volumeMounts", []):
            name = mount["name"]
            base = self.shared.get(name)
            if base is None:
                base = self.work / step.label / name
                shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True, exist_ok=True)
            folders[mount["mountPath"]] = base
        return folders

    def release(self, step: Step) -> None:
        """Removes a finished step's own volumes, as Kubernetes does with a pod's emptyDirs: its scratch (an
        export's merged model, the checkpoints train downloads) is in S3 or no longer needed. A failed step's
        stay for a look."""
        shutil.rmtree(self.work / step.label, ignore_errors=True)

    @staticmethod
    def local_path(path: str, folders: dict[str, Path]) -> str:
        for mount in sorted(folders, key=len, reverse=True):
            if path == mount or path.startswith(mount.rstrip("/") + "/"):
                return str(folders[mount] / path[len(mount):].lstrip("/"))
        return path

    def environment(self, step: Step, folders: dict[str, Path], threads: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL_", "AWS_", "HF_TOKEN"))}
        for var in step.template["container"].get("env", []):
            name = var["name"]
            if "value" in var:
                env[name] = self.local_path(substitute(var["value"], step.values), folders)
                continue
            ref = var.get("valueFrom", {})
            source = ref.get("secretKeyRef") or ref.get("configMapKeyRef")
            if source is None:
                raise UnsupportedFeature(f"env {name}: only value, secretKeyRef and configMapKeyRef are supported")
            if name in self.secrets:
                env[name] = self.secrets[name]
            elif not source.get("optional"):
                raise StepFailed(f"{step.label}: env {name} needs {source['name']}/{source['key']}, "
                                 "which this machine does not provide")
        env["DISTILL_THREADS"] = str(threads)
        env["DISTILL_LOG_FORMAT"] = "json"
        return env

    def command(self, step: Step) -> list[str]:
        container = step.template["container"]
        argv = [substitute(a, step.values) for a in container.get("command", []) + container.get("args", [])]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the image's python is this virtual environment's here
        return argv

    def run(self, step: Step, threads: int, log_path: Path, on_line) -> tuple[int, dict[str, Path]]:
        folders = self.volume_dirs(step)
        env = self.environment(step, folders, threads)
        with open(log_path, "ab") as log:
            with self._running_lock:
                if self._stopping:
                    return -signal.SIGTERM, folders
                # its own process group: a terminal's Ctrl-C reaches the runner, which stops the whole group
                process = subprocess.Popen(self.command(step), env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
                self._running.add(process)
            assert process.stdout is not None  # stdout=PIPE above
            try:
                for raw in process.stdout:
                    log.write(raw)
                    on_line(step, raw.decode(errors="replace").rstrip())
                return process.wait(), folders
            finally:
                with self._running_lock:
                    self._running.discard(process)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM to every running step's process group, SIGKILL after `grace` seconds; no new step starts.
        Returns how many were running."""
        with self._running_lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.time() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        return len(running)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signum)
