"""Dagster resources: subject model, LLMs, corpus source, table storage, study settings."""
