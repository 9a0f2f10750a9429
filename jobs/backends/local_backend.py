"""The local backend: the engine in this process, its saved states kept as folders in the run's store.

A saved state's location is the S3 key of its folder; the folder's `files.json` (each file's sha256) is
written last, so a folder without it is never read, and a file that does not match it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.backends.base import ADAPTER_FILES, Adapter, Datum, Done
from jobs.config import ModelConfig, TrainConfig
from jobs.store import ArtifactStore, sha256_file

INDEX = "files.json"


class StoredFolders:
    """Folders of files under one unit of the run's store, addressed by their S3 key."""

    def __init__(self, store: ArtifactStore, unit: str, scratch: Path):
        self.store, self.unit, self.scratch = store, unit, scratch

    def put(self, name: str, folder: Path, only: tuple[str, ...] | None = None) -> str:
        location = self.store.key(self.unit, name)
        files = {}
        for path in sorted(folder.iterdir()):
            if only is None or path.name in only:
                self.store.put_file(f"{location}/{path.name}", path)
                files[path.name] = sha256_file(path)
        self.store.put_bytes(f"{location}/{INDEX}", json.dumps(files, sort_keys=True).encode())
        return location

    def get(self, location: str, folder: Path | None = None) -> Path:
        folder = folder or self.scratch / location.rsplit("/", 1)[-1]
        files = json.loads(self.store.get_bytes(f"{location}/{INDEX}"))
        for name, digest in files.items():
            self.store.get_file(f"{location}/{name}", folder / name)
            if sha256_file(folder / name) != digest:
                raise RuntimeError(f"saved state {location}/{name} does not match its {INDEX}")
        return folder


class LocalTrainer:
    def __init__(self, engine, folders: StoredFolders):
        self.engine, self.folders = engine, folders
        self.renderer = engine.renderer

    def forward_backward(self, batch: list[Datum]) -> Done[dict[str, float]]:
        result = self.engine.forward_backward(batch)
        return Done({"loss": result["loss"], "tokens": result["tokens"]})

    def optim_step(self, learning_rate: float) -> Done[None]:
        self.engine.optim_step(learning_rate)
        return Done(None)

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.compute_logprobs(sequences)

    def save_state(self, name: str) -> str:
        folder = self.folders.scratch / name
        self.engine.save_state(folder)
        return self.folders.put(f"checkpoints/{name}", folder)

    def save_adapter(self, name: str) -> Adapter:
        folder = self.folders.scratch / name
        self.engine.save_state(folder)
        location = self.folders.put(f"adapters/{name}", folder, only=ADAPTER_FILES)
        return Adapter(sampling=location, download=location)

    def adapter_parameters(self) -> dict[str, object]:
        return self.engine.adapter_parameters()


class LocalBackend:
    name = "local"

    def __init__(self, model: ModelConfig, folders: StoredFolders):
        self.model, self.folders = model, folders

    def precision(self) -> dict[str, str]:
        from jobs.backends.local import resolve_precision

        precision = resolve_precision(self.model)
        return {"device": precision.device, "dtype": precision.dtype}

    def sampler(self, adapter: str | None = None):
        from jobs.backends.local import LocalEngine

        return LocalEngine.for_sampling(self.model, self.folders.get(adapter) if adapter else None)

    def trainer(self, train: TrainConfig, resume_from: str | None = None) -> LocalTrainer:
        from jobs.backends.local import LocalEngine

        engine = LocalEngine.for_training(self.model, train)
        if resume_from:
            engine.load_state(self.folders.get(resume_from))
        return LocalTrainer(engine, self.folders)

    def adapter_files(self, adapter: Adapter, folder: Path) -> Path:
        return self.folders.get(adapter.download, folder)
