"""Publish: push the export unit's files to a Hugging Face Hub model repo, or say what would be.

A push needs both `HF_TOKEN` in the environment and `publish.repo_id` in the config; without either, the
phase is a dry run that lists every file it would push (path in the repo, bytes, sha256); both modes
download every file and check it against the export manifest first. The token is
read here and handed to `huggingface_hub` only: it never reaches a log line, an artifact or an error
message, and the unit's fingerprint records only *whether* there is one (so adding a token reruns the
phase, changing it does not). `HF_ENDPOINT` points the client at another Hub (a mirror, a test stand-in).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from jobs.errors import InputError, TransientError
from jobs.log import get_logger
from jobs.phases.base import PhaseConfig, run_unit, scratch_dir
from jobs.store import UnitWriter, sha256_file


def _safe_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise InputError(f"publish: export lists an unsafe file name {name!r}")
    return str(path)


def fetch_export(config: PhaseConfig) -> tuple[Path, list[dict]]:
    """The export unit's outputs, downloaded (hash-checked) into a fresh folder that mirrors the repo."""
    store = config.store
    outputs = store.require("export")["outputs"]
    if not outputs:
        raise InputError(f"publish: {store.key('export')} lists no files to publish")
    folder = scratch_dir(config, "publish") / "export"
    shutil.rmtree(folder, ignore_errors=True)  # stale files would be uploaded too
    files = []
    for name in sorted(outputs):
        local = store.download("export", _safe_name(name), folder / name)
        files.append({"path": name, "bytes": local.stat().st_size, "sha256": sha256_file(local)})
    return folder, files


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _hub_error(exc: BaseException, repo_id: str, endpoint: str, token: str) -> InputError | TransientError:
    """One line for whatever the Hub client raised, with nothing of the token in it; an unreachable Hub or
    its 5xx and 429 answers are transient, the rest (a refused token, a bad repo id) is not."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, HfHubHTTPError | httpx2.HTTPError):
        seen = seen.__cause__  # an LFS upload failure arrives as RuntimeError(...) from the HTTP error
    response = getattr(seen, "response", None) if isinstance(seen, HfHubHTTPError | httpx2.HTTPStatusError) else None
    if response is not None:
        message = f"publish to {repo_id}: {response.status_code} {response.reason_phrase}"
        kind = TransientError if response.status_code >= 500 or response.status_code == 429 else InputError
    elif isinstance(seen, httpx2.HTTPError):
        message = f"publish to {repo_id}: cannot reach the Hub at {endpoint} ({type(seen).__name__})"
        kind = TransientError
    else:  # the client's own checks (ValueError), or hf_xet's errors (ConnectionError, RuntimeError, ...)
        first = (str(exc).strip().splitlines() or [""])[0]
        message = f"publish to {repo_id}: {type(exc).__name__}: {first}".rstrip(": ")
        kind = TransientError if isinstance(exc, ConnectionError | TimeoutError) else InputError
    return kind(_scrub(message, token))


def push(config: PhaseConfig, folder: Path, token: str) -> dict:
    """create_repo + upload_folder; returns the repo URL and the commit's revision."""
    from huggingface_hub import HfApi

    publish = config.pipeline.publish
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(token=token, endpoint=endpoint)
    try:
        repo_url = api.create_repo(publish.repo_id, repo_type="model", private=publish.private, exist_ok=True)
        commit = api.upload_folder(repo_id=publish.repo_id, folder_path=folder, repo_type="model",
                                   commit_message=f"distill run {config.run_id}: publish the export")
    except Exception as exc:
        raise _hub_error(exc, publish.repo_id, api.endpoint, token) from None
    return {"url": str(repo_url), "revision": commit.oid, "commit_url": commit.commit_url}


def main(config: PhaseConfig) -> dict:
    publish = config.pipeline.publish
    token = os.environ.get("HF_TOKEN", "").strip()
    pushing = bool(token and publish.repo_id)

    def build(out: UnitWriter) -> None:
        log = get_logger().bind(unit="publish", run_id=config.run_id)
        folder, files = fetch_export(config)
        total = sum(f["bytes"] for f in files)
        if not pushing:
            reason = "no HF_TOKEN" if not token else "no publish.repo_id"
            if not token and not publish.repo_id:
                reason = "no HF_TOKEN and no publish.repo_id"
            for f in files:
                log.info("would push", path=f["path"], bytes=f["bytes"], sha256=f["sha256"])
            out.write_json("publish.json", {"mode": "dry-run", "reason": reason, "repo_id": publish.repo_id or None,
                                            "private": publish.private, "files": files, "bytes": total})
            out.metrics.update({"mode": "dry-run", "files": len(files), "bytes": total})
            return
        for f in files:
            log.info("pushing", repo_id=publish.repo_id, path=f["path"], bytes=f["bytes"], sha256=f["sha256"])
        pushed = push(config, folder, token)
        log.info("pushed", repo_id=publish.repo_id, revision=pushed["revision"], url=pushed["url"])
        out.write_json("publish.json", {"mode": "push", "repo_id": publish.repo_id, "private": publish.private,
                                        **pushed, "files": files, "bytes": total})
        out.metrics.update({"mode": "push", "revision": pushed["revision"], "files": len(files)})

    return run_unit(config, "publish", build, extra_key={"push": pushing})
