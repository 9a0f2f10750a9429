"""Evaluate's parts (`jobs.phases.evaluate` runs them): what the models give (`measure`), the figures computed from
that (`figures`), the persona checks (`persona`), each model's own conversations and its consistency across turns
(`consistency`), and the store's cache of what does not depend on the student (`cache`)."""
