"""Container mode of the local runner: every DAG step runs inside its own phase image, as its pod would.

`ContainerExecutor` is a `ProcessExecutor` whose process is a container: it reuses the step's volume folders
(the `cache` volume is the shared model cache, every other volume a fresh folder per step) and the pod's
environment (secrets and config maps from the local S3 server), and runs the template's exact command and
arguments in `<image-registry>/<phase>:<image-tag>` with docker or podman when a daemon answers, else with
buildah (`buildah run`, chroot isolation, host network, so the step reaches the S3 server on 127.0.0.1).

What a pod gets and a step here gets too: the template's image, command, args and env (nothing from this
shell's environment but the runner's DISTILL_THREADS and DISTILL_LOG_FORMAT), the pod's `runAsUser`
(`runAsNonRoot` is enforced before the step starts), its volumes at their mount paths with Kubernetes'
ownership rules (an emptyDir is world-writable; `fsGroup` gets group read/write on the volume's files, the
way the kubelet applies it), and dropped capabilities. A read-only root filesystem is enforced by docker and
podman (`--read-only`); `buildah run` has no such switch, but the image's files belong to root and the step
runs as 10001, so it cannot change them either. Each step gets a fresh container, removed when it ends.

The engine helpers here (`detect_engine`, `engine_cmd`, `engine_env`, `image_exists`, `inspect_image`) are
shared with `images/build.py` and the image tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from workflows.local.steps import ProcessExecutor, Step, StepFailed, substitute

ENGINES = ("docker", "podman", "buildah")
# buildah without a daemon, as root on a plain Debian machine: chroot isolation needs no namespaces set up.
# Storage: buildah's own choice (overlay where the kernel allows it, else vfs); $STORAGE_DRIVER forces one
# (buildah 1.28 ignores that variable itself, so it is passed as --storage-driver).
BUILDAH_DEFAULTS = {"BUILDAH_ISOLATION": "chroot"}
REPO = Path(__file__).resolve().parents[2]
# what the base image copies from the build context (images/base/Dockerfile: the product, not workflows/local),
# and the label that carries its digest on every image built over it
SOURCES = ("pyproject.toml", "jobs", "workflows/__init__.py", "workflows/pipeline.py", "workflows/submit.py")
SOURCES_LABEL = "io.distill.sources"
# variables the runner itself sets for every step (the local stand-in for resource requests and log shipping)
RUNNER_ENV = ("DISTILL_THREADS", "DISTILL_LOG_FORMAT")


def source_digest() -> str:
    """Hash of what the base image copies in (ignoring caches that .dockerignore leaves out), 16 hex digits."""
    digest = hashlib.sha256()
    for top in SOURCES:
        path = REPO / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def engine_env(engine: str) -> dict[str, str]:
    """This process's environment, plus buildah's defaults when the engine is buildah."""
    env = dict(os.environ)
    if engine == "buildah":
        for key, value in BUILDAH_DEFAULTS.items():
            env.setdefault(key, value)
    return env


def engine_cmd(engine: str) -> list[str]:
    """The engine's command with its global options (buildah: the storage driver from $STORAGE_DRIVER)."""
    if engine == "buildah" and os.environ.get("STORAGE_DRIVER"):
        return ["buildah", "--storage-driver", os.environ["STORAGE_DRIVER"]]
    return [engine]


def _answers(engine: str) -> bool:
    """True when the engine is installed and usable (a docker client without a daemon is not)."""
    if shutil.which(engine) is None:
        return False
    probe = {"docker": ["info", "--format", "{{.ServerVersion}}"],
             "podman": ["info", "--format", "{{.Version.Version}}"], "buildah": ["version"]}[engine]
    try:
        return subprocess.run(engine_cmd(engine) + probe, env=engine_env(engine), capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect_engine(preferred: str | None = None) -> str | None:
    """`preferred` (or $DISTILL_CONTAINER_ENGINE) if given, else the first of docker, podman, buildah that works."""
    preferred = preferred or os.environ.get("DISTILL_CONTAINER_ENGINE") or None
    if preferred:
        if preferred not in ENGINES:
            raise ValueError(f"container engine {preferred!r}: expected one of {', '.join(ENGINES)}")
        return preferred if _answers(preferred) else None
    return next((engine for engine in ENGINES if _answers(engine)), None)


def _capture(engine: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(engine_cmd(engine) + argv, env=engine_env(engine), capture_output=True, text=True)


def image_exists(engine: str, ref: str) -> bool:
    kind = ["inspect", "--type", "image", ref] if engine == "buildah" else ["image", "inspect", ref]
    return _capture(engine, kind).returncode == 0


def inspect_image(engine: str, ref: str) -> dict:
    """One shape for every engine: user, env (list of K=V), labels, history (the commands that made each
    layer), size in bytes (shared layers counted in every image, as `images` shows it) and id."""
    if engine == "buildah":
        found = _capture(engine, ["inspect", "--type", "image", ref])
        if found.returncode != 0:
            raise LookupError(f"image {ref} not found: {found.stderr.strip()}")
        data = json.loads(found.stdout)
        config = data.get("OCIv1", {}).get("config", {})
        history = data.get("OCIv1", {}).get("history", [])
        # layers stored locally are uncompressed tars: their sizes add up to the image's size
        layers = json.loads(data.get("Manifest") or "{}").get("layers", [])
        size = sum(int(layer.get("size", 0)) for layer in layers)
        return {"id": data.get("FromImageID", ""), "user": config.get("User", ""), "env": config.get("Env") or [],
                "labels": config.get("Labels") or {}, "size": size,
                "history": [h.get("created_by", "") for h in history]}
    found = _capture(engine, ["image", "inspect", ref])
    if found.returncode != 0:
        raise LookupError(f"image {ref} not found: {found.stderr.strip()}")
    data = json.loads(found.stdout)[0]
    config = data.get("Config", {})
    lines = _capture(engine, ["image", "history", "--no-trunc", "--format", "{{json .}}", ref]).stdout.splitlines()
    history = [json.loads(line) for line in lines if line.strip()]
    return {"id": data.get("Id", ""), "user": config.get("User", ""), "env": config.get("Env") or [],
            "labels": config.get("Labels") or {}, "size": int(data.get("Size", 0)),
            "history": [h.get("CreatedBy", "") for h in history]}


def _referenced(step: Step) -> set[str]:
    """Names of the step's variables that come from secrets and config maps."""
    return {var["name"] for var in step.template["container"].get("env", []) if "valueFrom" in var}


def _is_root(user: str) -> bool:
    name = user.split(":")[0]
    return name in ("", "0", "root")


class ContainerExecutor(ProcessExecutor):
    """Runs a step's container in its image. Same interface as `ProcessExecutor`; `run` returns the exit
    code of the step's command and the host folders of its volumes (for the output parameters)."""

    def __init__(self, work: Path, shared: dict[str, Path], secrets: dict[str, str], engine: str | None = None,
                 pod_security: dict | None = None):
        """`pod_security` is the template's pod `securityContext` (runAsUser, runAsGroup, fsGroup, runAsNonRoot)."""
        super().__init__(work, shared, secrets)
        found = detect_engine(engine)
        if found is None:
            raise RuntimeError(f"no container engine answers ({engine or ' or '.join(ENGINES)}): "
                               "`make images` installs buildah")
        self.engine = found
        self.pod = pod_security or {}
        self._local = threading.local()  # what `run` prepares for `command` in the same worker thread
        self._image_users: dict[str, str] = {}  # image -> its USER, once checked
        self._granted: set[str] = set()  # shared folders given to fsGroup
        self._lock = threading.Lock()

    # -- the hooks ProcessExecutor.run calls: volume folders, environment, command
    def volume_dirs(self, step: Step) -> dict[str, Path]:
        folders = super().volume_dirs(step)
        shared = {str(folder) for folder in self.shared.values()}
        for folder in folders.values():
            if str(folder) in shared:
                self._grant_fs_group(folder)
            else:
                folder.chmod(0o777)  # an emptyDir: world-writable, as the kubelet makes it
        self._local.folders = folders
        return folders

    def pod_environment(self, step: Step, threads: int) -> dict[str, str]:
        """Exactly the variables the pod gets: the template's env (values under mount paths unchanged,
        secrets from the local S3 server, optional ones left out when absent) and the runner's two."""
        container = step.template["container"]
        mounts = {m["mountPath"]: Path(m["mountPath"]) for m in container.get("volumeMounts", [])}
        everything = super().environment(step, mounts, threads)
        declared = {var["name"] for var in container.get("env", [])} | set(RUNNER_ENV)
        return {name: value for name, value in everything.items() if name in declared}

    def environment(self, step: Step, folders: dict[str, Path], threads: int) -> dict[str, str]:
        """The engine process's own environment. docker and podman read the values of secrets and config
        maps from it by name (`-e NAME`), so none appears on their command line; buildah got the pod's
        environment with its working container (`_container`)."""
        if self.engine == "buildah":
            return engine_env(self.engine)
        return {**engine_env(self.engine), **{k: v for k, v in self._local.pod_env.items() if k in _referenced(step)}}

    def command(self, step: Step) -> list[str]:
        container = step.template["container"]
        argv = [substitute(a, step.values) for a in container.get("command", []) + container.get("args", [])]
        image = substitute(container["image"], step.values)
        security = {**self.pod, **container.get("securityContext", {})}
        user = [] if security.get("runAsUser") is None else ["--user", self._user(security)]
        volumes = [flag for mount, folder in self._local.folders.items() for flag in ("-v", f"{folder}:{mount}")]
        caps = [flag for cap in security.get("capabilities", {}).get("drop", []) for flag in ("--cap-drop", cap)]
        if self.engine == "buildah":  # the environment is the working container's (see `_container`)
            return [*engine_cmd("buildah"), "run", "--isolation", engine_env("buildah")["BUILDAH_ISOLATION"], *user,
                    *caps, *volumes, self._local.container, "--", *argv]
        referenced = _referenced(step)
        env = [flag for name, value in self._local.pod_env.items()
               for flag in ("-e", name if name in referenced else f"{name}={value}")]
        hardening = ["--read-only"] if security.get("readOnlyRootFilesystem") else []
        if security.get("allowPrivilegeEscalation") is False:
            hardening += ["--security-opt", "no-new-privileges"]
        return [*engine_cmd(self.engine), "run", "--rm", "--network", "host", "--name", self._local.container,
                *user, *caps, *hardening, *volumes, *env, image, *argv]

    def run(self, step: Step, threads: int, log_path: Path, on_line) -> tuple[int, dict[str, Path]]:
        image = substitute(step.template["container"]["image"], step.values)
        self._check_image(image, step)
        self._local.pod_env = self.pod_environment(step, threads)
        with self._container(image, step, self._local.pod_env) as name:
            self._local.container = name
            return super().run(step, threads, log_path, on_line)

    # -- helpers
    def _user(self, security: dict) -> str:
        uid = str(security["runAsUser"])
        group = security.get("runAsGroup")
        return uid if group is None else f"{uid}:{group}"

    def _check_image(self, image: str, step: Step) -> None:
        """The image is built, and a pod with runAsNonRoot would start it (the kubelet refuses root)."""
        with self._lock:
            if image not in self._image_users:
                if not image_exists(self.engine, image):
                    raise StepFailed(f"{step.label}: image {image} is not built ({self.engine}): run `make images`")
                self._image_users[image] = inspect_image(self.engine, image)["user"]
        security = {**self.pod, **step.template["container"].get("securityContext", {})}
        user = str(security["runAsUser"]) if security.get("runAsUser") is not None else self._image_users[image]
        if security.get("runAsNonRoot") and _is_root(user):
            raise StepFailed(f"{step.label}: image {image} runs as root ({user or 'no USER'}) "
                             "but the pod requires runAsNonRoot")

    @contextmanager
    def _container(self, image: str, step: Step, pod_env: dict[str, str]):
        """A fresh container per step, removed afterwards: for docker and podman a name for `run --rm`; for
        buildah a working container whose configuration carries the pod's environment. buildah 1.28 takes
        variables only as NAME=VALUE arguments, so they go to the short `buildah config` call, not to
        `buildah run`, which lasts as long as the step (secrets are on a command line for milliseconds)."""
        name = "distill-" + re.sub(r"[^a-zA-Z0-9_.-]+", "-", step.label).strip("-") + "-" + uuid.uuid4().hex[:8]
        if self.engine != "buildah":
            yield name
            return
        made = _capture("buildah", ["from", "--pull=never", "--quiet", "--name", name, image])
        if made.returncode != 0:
            raise StepFailed(f"{step.label}: buildah from {image} failed: {made.stderr.strip()[-300:]}")
        try:
            env = [flag for key, value in pod_env.items() for flag in ("--env", f"{key}={value}")]
            configured = _capture("buildah", ["config", *env, name])
            if configured.returncode != 0:
                raise StepFailed(f"{step.label}: buildah config failed: {configured.stderr.strip()[-300:]}")
            yield name
        finally:
            _capture("buildah", ["rm", name])

    def _grant_fs_group(self, folder: Path) -> None:
        """The kubelet's fsGroup rule for a volume: group `fsGroup` owns everything, with group read/write
        (and setgid on folders). Applied to the shared cache once per run, as root only."""
        group = self.pod.get("fsGroup")
        if group is None or os.geteuid() != 0:
            return
        with self._lock:
            if str(folder) in self._granted:
                return
            for root, dirs, files in os.walk(folder):
                for name in [".", *dirs, *files]:
                    path = Path(root) / name if name != "." else Path(root)
                    info = path.lstat()
                    if stat.S_ISLNK(info.st_mode):
                        continue
                    if info.st_gid != group:
                        os.chown(path, -1, group)
                    wanted = stat.S_IRGRP | stat.S_IWGRP
                    if stat.S_ISDIR(info.st_mode):
                        wanted |= stat.S_IXGRP | stat.S_ISGID
                    if info.st_mode & wanted != wanted:
                        path.chmod(stat.S_IMODE(info.st_mode) | wanted)
            self._granted.add(str(folder))
