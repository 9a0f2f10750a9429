"""One module per phase, each with `main(config: PhaseConfig) -> dict` of key figures."""

# DAG order; `python -m jobs <phase>` accepts these names
PHASES = ("preflight", "ingest", "teacher", "student", "audit", "split", "train", "evaluate", "report", "export",
          "publish")
