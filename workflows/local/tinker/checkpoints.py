"""The stand-in's checkpoints and training runs on disk, and the REST views of them the SDK's RestClient reads.

    <data-dir>/models/<model_id>/run.json                 the training run (base model, LoRA rank, user metadata)
    <data-dir>/models/<model_id>/<kind>/<name>/meta.json  a checkpoint: kind weights (training state),
                                                          sampler_weights or external_weights

A checkpoint's `tinker://<model_id>/<kind>/<name>` path and its REST id `<kind>/<name>` are the SDK's
(`ParsedCheckpointTinkerPath`). A checkpoint with a time to live expires `ttl_seconds` after it was saved (or after
its TTL was last set): from then on it is gone, to every route, and its folder is deleted by the next sweep.
External weights saved with `age_encryption_recipients` are written only encrypted (pyrage, the age format), each
file `<name>.age`, as the SDK documents.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from workflows.local.tinker.common import UserError, log

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
EPHEMERAL = "_session-"  # the unnamed sampler snapshots of save_weights_and_get_sampling_client: never listed


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def parse_recipients(recipients) -> list:
    """age recipients ("age1..." X25519 keys or SSH public keys) as pyrage objects; a malformed one is a UserError."""
    import pyrage

    if not isinstance(recipients, list) or not recipients or not all(isinstance(r, str) for r in recipients):
        raise UserError("age_encryption_recipients must be a non-empty list of age recipients (age1... or ssh-...)")
    parsed = []
    for recipient in recipients:
        try:
            if recipient.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(recipient))
            elif recipient.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(recipient))
            else:
                raise ValueError("neither an age1... key nor an ssh- public key")
        except Exception as error:
            raise UserError(f"age_encryption_recipients: {recipient[:24]!r}... is not an age recipient "
                            f"({error})") from None
    return parsed


class Checkpoints:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.last_sweep = 0.0

    # -- paths
    def model_root(self, model_id: str) -> Path:
        if not model_id or "/" in model_id or model_id.startswith("."):
            raise UserError(f"bad model id {model_id!r}")
        return self.data_dir / "models" / model_id

    def folder(self, model_id: str, checkpoint_id: str) -> Path:
        """The folder of `<kind>/<name>` of `model_id`, which may not exist."""
        kind, _, name = checkpoint_id.partition("/")
        if kind not in KINDS or not name or "/" in name or name.startswith("."):
            raise UserError(f"not a checkpoint id (weights|sampler_weights|external_weights)/<name>: {checkpoint_id!r}")
        return self.model_root(model_id) / kind / name

    def find(self, model_id: str, checkpoint_id: str) -> Path | None:
        """The checkpoint's folder, or None when there is none (or it has expired: then it is deleted)."""
        folder = self.folder(model_id, checkpoint_id)
        if not (folder / "meta.json").is_file():
            return None
        if self._expired(folder):
            self._remove(folder, "expired")
            return None
        return folder

    def resolve(self, path: str, kinds: tuple[str, ...]) -> Path:
        match = re.fullmatch(r"tinker://([^/]+)/([a-z_]+)/([^/]+)", path or "")
        if not match or match.group(2) not in kinds:
            raise UserError(f"not a tinker://<model_id>/{'|'.join(kinds)}/<name> path: {path!r}")
        folder = self.find(match.group(1), f"{match.group(2)}/{match.group(3)}")
        if folder is None:
            raise UserError(f"no checkpoint at {path} (never saved, deleted or expired)")
        return folder

    @staticmethod
    def meta(folder: Path) -> dict:
        return json.loads((folder / "meta.json").read_text())

    def _expired(self, folder: Path) -> bool:
        expires = self.meta(folder).get("expires_at")
        return expires is not None and expires <= time.time()

    @staticmethod
    def _remove(folder: Path, why: str) -> None:
        log().info("checkpoint removed", folder=str(folder), why=why)
        shutil.rmtree(folder, ignore_errors=True)

    # -- writing
    def write(self, model, kind: str, name: str, save, ttl: int | None = None, overwrite: bool = True,
              user_metadata: dict | None = None, recipients: list | None = None) -> Path:
        """`save(staging)` writes the files; then meta.json, encryption to `recipients` (the plain files are never
        left on disk) and an atomic rename into place."""
        folder = self.folder(model.model_id, f"{kind}/{name}")
        if not overwrite and self.find(model.model_id, f"{kind}/{name}") is not None:
            raise UserError(f"tinker://{model.model_id}/{kind}/{name} exists (overwrite=True replaces it)")
        staging = folder.with_name(f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        save(staging)
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub: not part of the weights
        if recipients:
            import pyrage

            for file in sorted(p for p in staging.iterdir() if p.is_file()):
                file.with_name(file.name + ".age").write_bytes(pyrage.encrypt(file.read_bytes(), recipients))
                file.unlink()
        now = time.time()
        (staging / "meta.json").write_text(json.dumps({
            "base_model": model.base_model, "rank": model.rank, "alpha": model.alpha, "seed": model.seed,
            "model_id": model.model_id, "kind": kind, "created": now,
            "expires_at": now + ttl if ttl is not None else None, "encrypted": bool(recipients),
            "user_metadata": {str(k): str(v) for k, v in (user_metadata or {}).items()}}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder

    def set_ttl(self, model_id: str, checkpoint_id: str, ttl: int | None) -> bool:
        folder = self.find(model_id, checkpoint_id)
        if folder is None:
            return False
        meta = self.meta(folder)
        meta["expires_at"] = time.time() + ttl if ttl is not None else None
        staging = folder / "meta.json.partial"
        staging.write_text(json.dumps(meta))
        staging.replace(folder / "meta.json")
        return True

    def delete(self, model_id: str, checkpoint_id: str) -> bool:
        folder = self.find(model_id, checkpoint_id)
        if folder is None:
            return False
        self._remove(folder, "deleted")
        return True

    def sweep(self) -> None:
        """Delete every expired checkpoint (the routes already treat them as gone)."""
        self.last_sweep = time.time()
        for meta in self.data_dir.glob("models/*/*/*/meta.json"):
            try:
                if self._expired(meta.parent):
                    self._remove(meta.parent, "expired")
            except (OSError, ValueError):
                continue  # a checkpoint being written or removed at this moment

    # -- training runs
    def record_run(self, model, user_metadata: dict | None, lora: dict | None) -> None:
        root = self.model_root(model.model_id)
        root.mkdir(parents=True, exist_ok=True)
        (root / "run.json").write_text(json.dumps({
            "training_run_id": model.model_id, "base_model": model.base_model, "lora_rank": model.rank,
            "created": time.time(), "lora": lora or {},
            "user_metadata": {str(k): str(v) for k, v in (user_metadata or {}).items()}}))

    def run(self, model_id: str, last_request: float | None = None) -> dict | None:
        """A TrainingRun (the SDK's type) as JSON, or None."""
        root = self.model_root(model_id)
        if not (root / "run.json").is_file():
            return None
        run = json.loads((root / "run.json").read_text())
        checkpoints = self.checkpoints(model_id)
        latest = {kind: max((c for c in checkpoints if c["checkpoint_type"] == kind), key=lambda c: c["time"],
                            default=None) for kind in ("training", "sampler")}
        return {"training_run_id": model_id, "base_model": run["base_model"], "model_owner": "local",
                "is_lora": True, "corrupted": False, "lora_rank": run["lora_rank"],
                "last_request_time": iso(max(filter(None, [last_request, run["created"],
                                                           *(c["_created"] for c in checkpoints)]))),
                "last_checkpoint": _public(latest["training"]), "last_sampler_checkpoint": _public(latest["sampler"]),
                "user_metadata": run["user_metadata"] or None}

    def run_ids(self) -> list[str]:
        """Every training run, newest first."""
        runs = [(p.stat().st_mtime, p.parent.name) for p in self.data_dir.glob("models/*/run.json")]
        return [model_id for _, model_id in sorted(runs, reverse=True)]

    def weights_info(self, path: str) -> dict:
        folder = self.resolve(path, tuple(KINDS))
        meta = self.meta(folder)
        run_file = self.model_root(meta["model_id"]) / "run.json"
        lora = json.loads(run_file.read_text()).get("lora", {}) if run_file.is_file() else {}
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": meta["rank"],
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn")}

    # -- listing
    def checkpoints(self, model_id: str | None = None) -> list[dict]:
        """Checkpoints (the SDK's Checkpoint, as JSON, plus "_created" for sorting) of one run or of all, newest
        first; expired ones are removed on the way."""
        pattern = f"models/{model_id}/*/*/meta.json" if model_id else "models/*/*/*/meta.json"
        if model_id:
            self.model_root(model_id)  # refuses a malformed id
        found = []
        for meta_file in self.data_dir.glob(pattern):
            folder = meta_file.parent
            if folder.parent.name not in KINDS or folder.name.startswith((".", EPHEMERAL)):
                continue
            try:
                if self._expired(folder):
                    self._remove(folder, "expired")
                    continue
                meta = self.meta(folder)
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != "meta.json")
            except (OSError, ValueError):
                continue  # removed or replaced while we looked
            owner, kind = folder.parent.parent.name, folder.parent.name
            created = meta.get("created") or meta_file.stat().st_mtime
            found.append({"checkpoint_id": f"{kind}/{folder.name}", "checkpoint_type": KINDS[kind],
                          "time": iso(created), "tinker_path": f"tinker://{owner}/{kind}/{folder.name}",
                          "training_run_id": owner, "size_bytes": size, "public": False,
                          "user_metadata": meta.get("user_metadata") or None,
                          "expires_at": iso(meta.get("expires_at")), "_created": created})
        return sorted(found, key=lambda c: c["_created"], reverse=True)


def _public(checkpoint: dict[str, Any] | None) -> dict | None:
    return None if checkpoint is None else {k: v for k, v in checkpoint.items() if not k.startswith("_")}


def page(items: list, query: dict[str, list[str]], default_limit: int) -> tuple[list, dict]:
    """items[offset:offset + limit] by the query's limit and offset, and the SDK's Cursor."""
    try:
        limit = int(query.get("limit", [default_limit])[0])
        offset = int(query.get("offset", [0])[0])
    except ValueError:
        raise UserError("limit and offset must be integers") from None
    if limit < 0 or offset < 0:
        raise UserError("limit and offset must not be negative")
    return items[offset:offset + limit], {"offset": offset, "limit": limit, "total_count": len(items)}


def public(checkpoints: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if not k.startswith("_")} for c in checkpoints]
