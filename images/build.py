"""Builds every image of the pipeline (`make images`): base, engine, then one thin image per phase.

    python images/build.py [--engine docker|podman|buildah] [--registry localhost/distill] [--tag 0.1.0]
                           [--only PHASE ...] [--force]

The engine is docker or podman when one answers, else buildah; buildah is installed with apt-get when it is
missing and this runs as root on Debian (CI, a fresh machine). buildah runs daemonless with chroot isolation
($BUILDAH_ISOLATION overrides) and its own choice of storage driver (overlay where the kernel allows it, else
vfs; $STORAGE_DRIVER=vfs forces vfs).

The base image `docker.io/library/python:3.11-slim` is pulled when it can be. When it cannot (no registry
reachable, as on this project's build machines), a STAND-IN for it is made locally: Debian bookworm's
python3 (3.11) installed with debootstrap, committed under that same name, so every Dockerfile builds
unchanged. The stand-in carries the label `io.distill.stand-in=true`, which every image built over it
inherits; `--no-stand-in` refuses to make one.

pip inside the builds reaches PyPI; on a machine behind a TLS-inspecting proxy the host's CA folder is
mounted read-only into the build and PIP_CERT names the bundle. torch comes from the folder that
$PIP_FIND_LINKS names when the CPU wheel lies there (mounted read-only, `--find-links`), else from
$TORCH_PIP_ARGS, else from the Dockerfile's default, the PyTorch CPU index.

An image whose inputs (Dockerfile, build arguments, the parent image, and for the base the project's
source) are unchanged since its last build is kept, so a second `make images` takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs import __version__  # noqa: E402
from jobs.phases import PHASE, PHASES  # noqa: E402
from workflows.local.containers import (  # noqa: E402
    SOURCES_LABEL,
    detect_engine,
    engine_cmd,
    engine_env,
    image_exists,
    inspect_image,
    source_digest,
)

BASE_IMAGE = "docker.io/library/python:3.11-slim"
# the stand-in for BASE_IMAGE when no registry answers: Debian bookworm (python3 is 3.11) with venv and CA certs
STANDIN_SUITE = "bookworm"
STANDIN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
STANDIN_LABEL = "io.distill.stand-in"
INPUTS_LABEL = "io.distill.inputs"
TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"


class ImageConfig(TypedDict):
    env: list[str]  # NAME=value
    labels: dict[str, str]


def say(text: str) -> None:
    print(text, flush=True)


def layer_of(phase: str) -> str:
    return "engine" if PHASE[phase].engine else "base"


def dockerfile_of(name: str) -> Path:
    """The layers' own Dockerfiles; every phase image comes from images/phase/Dockerfile."""
    return ROOT / "images" / ("phase" if name in PHASES else name) / "Dockerfile"


def phase_args(name: str) -> dict[str, str]:
    """What makes a phase's image its own: the build arguments of images/phase/Dockerfile, from the phase table."""
    if name not in PHASES:
        return {}
    return {"PHASE": name, "SUMMARY": PHASE[name].summary, "LAYER": layer_of(name), "EXTRA": PHASE[name].extra}


def build_order(only: list[str] | None) -> list[str]:
    """base, engine (when an engine phase is wanted), then the phases."""
    phases = [p for p in PHASES if not only or p in only]
    return ["base"] + (["engine"] if any(layer_of(p) == "engine" for p in phases) else []) + phases


def parent_of(name: str) -> str:
    return {"base": "", "engine": "base"}.get(name, layer_of(name) if name in PHASES else "")


# -- tools
def ensure_buildah() -> None:
    """buildah (and debootstrap for the stand-in base) from Debian's archive when missing, as CI needs."""
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"error: {' and '.join(missing)} missing; install them (Debian: "
                         f"apt-get install -y buildah debootstrap), or docker or podman")
    say(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "buildah", "debootstrap",
                    "crun", "containernetworking-plugins"], check=True, env=env, stdout=subprocess.DEVNULL)


# -- the base image or its stand-in
def try_pull(engine: str, ref: str) -> bool:
    argv = [*engine_cmd(engine), "pull", ref]
    try:
        done = subprocess.run(argv, env=engine_env(engine), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False
    if done.returncode != 0:
        say(f"  cannot pull {ref}: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    return done.returncode == 0


def make_standin_base(engine: str, ref: str) -> None:
    """A STAND-IN for `ref` (python:3.11-slim): Debian bookworm minbase with python3 3.11, python3-venv and CA
    certificates, a `python` link, committed under `ref`. Not the real image: it is labelled as a stand-in."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("error: debootstrap is needed for the stand-in base image: apt-get install -y debootstrap")
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    started = time.time()
    (ROOT / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="standin-", dir=ROOT / "build") as tmp:
        rootfs = Path(tmp) / "rootfs"
        say(f"  debootstrap {STANDIN_SUITE} ({', '.join(STANDIN_PACKAGES)}) from {mirror}")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(STANDIN_PACKAGES)}",
                        STANDIN_SUITE, str(rootfs), mirror], check=True, stdout=subprocess.DEVNULL)
        # what an image does not carry: device nodes (the runtime makes them), apt's caches and lists
        for folder in ("dev", "var/cache/apt/archives", "var/lib/apt/lists", "tmp", "run"):
            target = rootfs / folder
            for child in target.iterdir() if target.is_dir() else ():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        (rootfs / "var/cache/apt").joinpath("pkgcache.bin").unlink(missing_ok=True)
        (rootfs / "var/cache/apt").joinpath("srcpkgcache.bin").unlink(missing_ok=True)
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")  # as the real image has `python`
        description = (f"STAND-IN for {ref}, made locally because no registry was reachable: Debian "
                       f"{STANDIN_SUITE} minbase with {', '.join(STANDIN_PACKAGES)} (python3 3.11)")
        config: ImageConfig = {
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "labels": {STANDIN_LABEL: "true", "org.opencontainers.image.description": description}}
        if engine == "buildah":
            commit_rootfs_buildah(rootfs, ref, config)
        else:
            changes = [f"ENV {e.replace('=', ' ', 1)}" for e in config["env"]]
            changes += [f'LABEL {k}="{v}"' for k, v in config["labels"].items()] + ['CMD ["python3"]']
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            argv = [*engine_cmd(engine), "import", *[flag for c in changes for flag in ("--change", c)], "-", ref]
            subprocess.run(argv, stdin=tar.stdout, check=True, env=engine_env(engine), stdout=subprocess.DEVNULL)
            if tar.wait() != 0:
                raise SystemExit("error: could not archive the stand-in root filesystem")
    say(f"  stand-in {ref} committed in {time.time() - started:.0f}s")


def commit_rootfs_buildah(rootfs: Path, ref: str, config: ImageConfig) -> None:
    env = engine_env("buildah")

    def buildah(*argv: str) -> str:
        return subprocess.run(engine_cmd("buildah") + list(argv), env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    container = buildah("from", "scratch")
    try:
        mount = buildah("mount", container)
        subprocess.run(["cp", "-a", f"{rootfs}/.", mount], check=True)
        buildah("umount", container)
        flags = [f for e in config["env"] for f in ("--env", e)]
        flags += [f for k, v in config["labels"].items() for f in ("--label", f"{k}={v}")]
        buildah("config", *flags, "--cmd", '["python3"]', "--os", "linux", "--arch", "amd64", container)
        buildah("commit", "--quiet", "--rm", container, ref)
    except BaseException:
        subprocess.run(engine_cmd("buildah") + ["rm", container], env=env, capture_output=True)
        raise


def ensure_base(engine: str, allow_standin: bool) -> str:
    if image_exists(engine, BASE_IMAGE):
        standin = inspect_image(engine, BASE_IMAGE)["labels"].get(STANDIN_LABEL) == "true"
        say(f"base {BASE_IMAGE}: present{' (the local STAND-IN)' if standin else ''}")
        return "stand-in" if standin else "present"
    say(f"base {BASE_IMAGE}: pulling")
    if try_pull(engine, BASE_IMAGE):
        return "pulled"
    if not allow_standin:
        raise SystemExit(f"error: {BASE_IMAGE} cannot be pulled and --no-stand-in was given")
    say(f"base {BASE_IMAGE}: no registry reachable; making a local STAND-IN (Debian {STANDIN_SUITE} python3)")
    make_standin_base(engine, BASE_IMAGE)
    return "stand-in"


# -- building
def revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_settings(engine: str) -> tuple[dict[str, str], list[str]]:
    """Build arguments and (buildah/podman) build-time mounts for certificates and the torch wheel."""
    args: dict[str, str] = {}
    mounts: list[str] = []
    mountable = engine in ("buildah", "podman")
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file() and mountable:
        folder = str(Path(cert).parent)
        mounts += ["-v", f"{folder}:{folder}:ro"]
        args["PIP_CERT"] = cert
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    wheels = next((folder for folder in links if list(Path(folder).glob(TORCH_WHEEL))), None)
    if os.environ.get("TORCH_PIP_ARGS"):
        args["TORCH_PIP_ARGS"] = os.environ["TORCH_PIP_ARGS"]
    elif wheels and mountable:
        mounts += ["-v", f"{wheels}:{wheels}:ro"]
        args["TORCH_PIP_ARGS"] = f"--find-links {wheels}"
    return args, mounts


def declared_args(name: str, args: dict[str, str]) -> dict[str, str]:
    """The build arguments the image's Dockerfile declares (ARG), from `args`."""
    text = dockerfile_of(name).read_text()
    return {k: v for k, v in args.items() if re.search(rf"^ARG\s+{k}\b", text, re.MULTILINE)}


def build_image(engine: str, name: str, ref: str, args: dict[str, str], mounts: list[str],
                labels: dict[str, str]) -> None:
    dockerfile = dockerfile_of(name)
    flags = [f for k, v in args.items() for f in ("--build-arg", f"{k}={v}")]
    flags += [f for k, v in labels.items() for f in ("--label", f"{k}={v}")]
    if engine == "buildah":
        argv = [*engine_cmd(engine), "bud", "--pull=never", "--isolation", engine_env(engine)["BUILDAH_ISOLATION"],
                "--format", "oci", *mounts, *flags, "-f", str(dockerfile), "-t", ref, str(ROOT)]
    elif engine == "podman":
        argv = [*engine_cmd(engine), "build", "--pull=never", *mounts, *flags, "-f", str(dockerfile), "-t", ref,
                str(ROOT)]
    else:
        argv = [*engine_cmd(engine), "build", *flags, "-f", str(dockerfile), "-t", ref, str(ROOT)]
    log = ROOT / "build" / "images" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(argv, env=engine_env(engine), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{tail}\nerror: building {ref} failed (exit {done.returncode}); full log: {log}")


def kind_load(engine: str, refs: list[str], cluster: str) -> None:
    """Loads the images into the nodes of kind cluster `cluster`, through an image archive (works with docker,
    podman and buildah alike; the pods never pull them: imagePullPolicy IfNotPresent)."""
    kind = shutil.which("kind")
    if kind is None:
        raise SystemExit("error: kind not found (https://kind.sigs.k8s.io)")
    folder = ROOT / "build" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for image in refs:
        archive = folder / (image.rsplit("/", 1)[-1].replace(":", "-") + ".tar")
        archive.unlink(missing_ok=True)
        if engine == "buildah":
            save = [*engine_cmd(engine), "push", "--quiet", image, f"docker-archive:{archive}:{image}"]
        else:
            save = [*engine_cmd(engine), "save", *(["--format", "docker-archive"] if engine == "podman" else []),
                    "-o", str(archive), image]
        subprocess.run(save, env=engine_env(engine), check=True)
        subprocess.run([kind, "load", "image-archive", str(archive), "--name", cluster], check=True)
        archive.unlink()
        say(f"loaded {image} into kind cluster {cluster}")


def storage_driver() -> str:
    found = subprocess.run(engine_cmd("buildah") + ["info", "--format", "{{.store.GraphDriverName}}"],
                           env=engine_env("buildah"), capture_output=True, text=True)
    return found.stdout.strip() or "default"


def human(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python images/build.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("docker", "podman", "buildah"), help="default: the first that answers")
    p.add_argument("--registry", default="localhost/distill", help="image names are REGISTRY/<phase>:TAG")
    p.add_argument("--tag", default=__version__)
    p.add_argument("--only", nargs="+", choices=PHASES, help="build these phases (and their layers) only")
    p.add_argument("--force", action="store_true", help="rebuild even when an image's inputs are unchanged")
    p.add_argument("--no-stand-in", action="store_true", help="fail instead of making a stand-in base image")
    p.add_argument("--kind-load", metavar="CLUSTER", help="then load the phase images into this kind cluster")
    args = p.parse_args(argv)

    started = time.time()
    engine = detect_engine(args.engine)
    if engine is None and args.engine in (None, "buildah"):
        ensure_buildah()
        engine = detect_engine("buildah")
    if engine is None:
        raise SystemExit(f"error: no container engine answers ({args.engine or 'docker, podman, buildah'})")
    say(f"engine: {engine}" + (f" ({storage_driver()} storage, {engine_env(engine)['BUILDAH_ISOLATION']} isolation)"
                               if engine == "buildah" else ""))
    base_state = ensure_base(engine, not args.no_stand_in)
    build_args, mounts = build_settings(engine)
    build_args.update({"VERSION": __version__, "REVISION": revision(), "REGISTRY": args.registry, "TAG": args.tag})
    shown = {k: v for k, v in build_args.items() if k != "PIP_CERT"}
    say(f"build arguments: {shown}" + (f"; build-time mounts: {' '.join(mounts[1::2])}" if mounts else ""))

    rows = []
    parent_ids = {"": inspect_image(engine, BASE_IMAGE)["id"]}
    # the base labels itself with the source it copies in; every image over it inherits the label, which the
    # image tests compare with the tree they test
    sources = {SOURCES_LABEL: source_digest()}
    for name in build_order(args.only):
        ref = f"{args.registry}/{name}:{args.tag}"
        dockerfile = dockerfile_of(name).read_bytes()
        args_here = declared_args(name, {**build_args, **phase_args(name)})
        labels_here = sources if name == "base" else {}
        inputs = hashlib.sha256(b"\0".join([
            dockerfile, repr(sorted(args_here.items())).encode(), parent_ids[parent_of(name)].encode(),
            repr(sorted(labels_here.items())).encode()])).hexdigest()[:16]
        t0 = time.time()
        kept = (not args.force and image_exists(engine, ref)
                and inspect_image(engine, ref)["labels"].get(INPUTS_LABEL) == inputs)
        if not kept:
            say(f"building {ref} ...")
            build_image(engine, name, ref, args_here, mounts, {INPUTS_LABEL: inputs, **labels_here})
        info = inspect_image(engine, ref)
        parent_ids[name] = info["id"]
        took = time.time() - t0
        rows.append((ref, info["size"], "unchanged" if kept else f"{took:.0f}s"))
        say(f"{'kept' if kept else 'built'} {ref}: {human(info['size'])} ({rows[-1][2]})")

    say(f"\n{'image':<40} {'size':>10}  build")
    for ref, size, timing in rows:
        say(f"{ref:<40} {human(size):>10}  {timing}")
    say(f"\n{len(rows)} images in {time.time() - started:.0f}s with {engine}; base {BASE_IMAGE}: {base_state}"
        + (" (a local STAND-IN, not the real image)" if base_state == "stand-in" else "")
        + ". Sizes count shared layers in every image.")
    if args.kind_load:
        kind_load(engine, [ref for ref, _, _ in rows if ref.rsplit("/", 1)[-1].split(":")[0] in PHASES], args.kind_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
