"""The local backend: the engine in this process, its saved states kept as folders in the run's store.

A saved state is a unit of the store under the train unit (`train/checkpoints/step-N`, `train/adapters/final`),
written like any phase's outputs: files first, the manifest with each file's sha256 last, so a folder without
its manifest is never read and a file that does not match it is refused. Its location is the unit's S3 key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jobs.backends.base import ADAPTER_FILES, Adapter, Backend, Datum, Done, LossFn
from jobs.backends.model_files import model_dir
from jobs.store import ArtifactStore

if TYPE_CHECKING:  # jobs.config validates with the registry of backends, so it is imported for types only
    from jobs.config import ModelConfig, PipelineConfig, TrainConfig


class StoredFolders:
    """Folders of files as units under one unit of the run's store, addressed by their S3 key."""

    def __init__(self, store: ArtifactStore, unit: str, scratch: Path):
        self.store, self.unit, self.scratch = store, unit, scratch

    def put(self, name: str, folder: Path, only: tuple[str, ...] | None = None) -> str:
        unit = f"{self.unit}/{name}"
        with self.store.writing(unit, fingerprint=name) as out:
            for path in sorted(folder.iterdir()):
                if only is None or path.name in only:
                    out.upload_file(path.name, path)
        return self.store.key(unit)

    def get(self, location: str, folder: Path | None = None) -> Path:
        prefix = self.store.key(self.unit) + "/"
        if not location.startswith(prefix):
            raise RuntimeError(f"saved state {location} is not under {prefix}")
        folder = folder or self.scratch / location.rsplit("/", 1)[-1]
        return self.store.download_unit(location.removeprefix(self.store.key("") + "/"), folder)


class LocalTrainer:
    def __init__(self, engine, folders: StoredFolders):
        self.engine, self.folders = engine, folders
        self.renderer = engine.renderer

    def forward_backward(self, batch: list[Datum], loss_fn: LossFn = "cross_entropy") -> Done[dict[str, float]]:
        result = self.engine.forward_backward(batch, loss_fn=loss_fn)
        return Done({"loss": result["loss"], "tokens": result["tokens"]})

    def optim_step(self, learning_rate: float) -> Done[None]:
        self.engine.optim_step(learning_rate)
        return Done(None)

    def compute_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.compute_logprobs(sequences)

    def sampler(self):
        """The training engine itself: it samples with the current weights (no dropout, so no mode to switch)."""
        return self.engine

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


class LocalBackend(Backend):
    name = "local"
    settings = ("model.dtype", "model.device")

    def __init__(self, model: ModelConfig, folders: StoredFolders):
        self.model, self.folders = model, folders

    @classmethod
    def open(cls, pipeline: PipelineConfig, store: ArtifactStore, scratch: Path) -> LocalBackend:
        return cls(pipeline.model, StoredFolders(store, "train", scratch))

    @classmethod
    def preflight(cls, pipeline: PipelineConfig) -> Path:
        return model_dir(pipeline.model.base)  # converts the packaged model once, warming the cache

    def precision(self) -> dict[str, str]:
        from jobs.backends.precision import resolve_precision

        precision = resolve_precision(self.model)
        return {"device": precision.device, "dtype": precision.dtype}

    def sampler(self, adapter: str | None = None):
        from jobs.backends.local import LocalEngine

        return LocalEngine.for_sampling(self.model, self.folders.get(adapter) if adapter else None, kv_cache=True)

    def trainer(self, train: TrainConfig, resume_from: str | None = None) -> LocalTrainer:
        from jobs.backends.local import LocalEngine

        engine = LocalEngine.for_training(self.model, train)
        if resume_from:
            engine.load_state(self.folders.get(resume_from))
        return LocalTrainer(engine, self.folders)

    def adapter_files(self, adapter: Adapter, folder: Path) -> Path:
        return self.folders.get(adapter.download, folder)
