"""The persona checks' prompts and scoring lists (`jobs.evaluation.persona`)."""
