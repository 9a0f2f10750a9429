"""The pipeline's phases, each declared once: a module `jobs/phases/<name>.py` with
`main(config: PhaseConfig) -> dict` of key figures, and one row of TABLE.

Derived from the table: the DAG's edges, fan-out, resources and output parameters (workflows/pipeline.py),
the phase images (images/build.py over the one images/phase/Dockerfile), each unit's fingerprint inputs
(jobs.phases.base.run_unit), the report's phase times and the `python -m jobs` commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.metrics import COST_RATIO, SIMILARITY, TOKEN_REDUCTION


@dataclass(frozen=True)
class Phase:
    name: str
    summary: str  # what it does, in a line (the image's description)
    # phases whose outputs it reads: its DAG edges and the inputs of its fingerprint
    reads: tuple[str, ...] = ()
    # phases it waits for without reading their outputs (preflight's checks gate the run)
    after: tuple[str, ...] = ()
    # config sections its outputs depend on: part of its fingerprint
    sections: tuple[str, ...] = ()
    # drives a model: its image is built over the engine image, and its pod gets engine resources
    engine: bool = False
    # the package extra its image adds (pyproject.toml's optional-dependencies), "" for none
    extra: str = ""
    # metrics the step exposes as Argo output parameters (the UI, Prometheus gauges, fan-out lists)
    figures: tuple[str, ...] = ()
    # one step per shard that ingest assigns (its `shards` figure), each run with `--shard N`
    sharded: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        """Every phase that must finish first."""
        return (*self.after, *self.reads)


TABLE = (
    Phase("preflight", "checks the store, the bucket and that the models in the cache load",
          sections=("model",), engine=True),
    Phase("ingest", "validates and profiles the card and the prompts, synthesizes prompts where there are too few, "
                    "and assigns shards",
          after=("preflight",), sections=("ingest", "model", "teacher"), engine=True, extra="data",
          figures=("prompts", "shards")),
    Phase("teacher", "the teacher model answers one shard of prompts with the card, some as conversations with a "
                     "simulated visitor",
          reads=("ingest",), sections=("model", "teacher", "conversations"), engine=True, sharded=True),
    Phase("audit", "drops empty, truncated, duplicate, out-of-character and over-long replies from every shard's "
                   "conversations; cuts a conversation before its first bad turn",
          reads=("teacher",), sections=("audit",), figures=("kept", "dropped")),
    Phase("split", "splits the conversations into train, validation and held-out eval sets (single-turn and whole "
                   "conversations)",
          reads=("audit",), sections=("split", "conversations")),
    Phase("train", "trains the LoRA student toward the teacher (sft, logit or on-policy; resumable checkpoints)",
          reads=("ingest", "split"), sections=("model", "train"), engine=True, figures=("first_loss", "last_loss")),
    Phase("evaluate", "scores the student against the teacher: KL, in-character judge, similarity, cost, latency",
          reads=("ingest", "split", "train"), sections=("model", "teacher", "audit", "evaluate"), engine=True,
          figures=(SIMILARITY.of("student"), TOKEN_REDUCTION.key, COST_RATIO.key)),
    Phase("report", "renders the run's report with plots (matplotlib)",
          reads=("preflight", "ingest", "teacher", "audit", "split", "train", "evaluate"),
          sections=("tinker",), extra="report"),
    Phase("export", "a merged model folder, the LoRA adapter and a model card",
          reads=("ingest", "split", "train", "evaluate"), sections=("model", "export"), engine=True),
    Phase("publish", "pushes the export to a Hugging Face Hub model repo, or says what would be pushed",
          reads=("export",), sections=("publish",), extra="publish", figures=("mode", "files")),
)
PHASE = {phase.name: phase for phase in TABLE}
# DAG order; `python -m jobs <phase>` accepts these names
PHASES = tuple(PHASE)


def check_table() -> None:
    """Every phase needs only phases declared before it (so TABLE's order is a topological order)."""
    seen: set[str] = set()
    for phase in TABLE:
        unknown = [name for name in phase.needs if name not in seen]
        if unknown:
            raise ValueError(f"phase {phase.name} needs {', '.join(unknown)}, not declared before it in TABLE")
        seen.add(phase.name)


check_table()
