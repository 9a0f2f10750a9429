"""Evaluate's parts (`jobs.phases.evaluate` runs them): what the models give (`measure`), the figures computed from
that (`figures`), and the store's cache of what does not depend on the student (`cache`)."""
