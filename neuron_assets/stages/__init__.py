"""Per-unit work as plain code, no Dagster: what the assets call (the rest moves here stage by stage)."""
