"""neuron_assets: automated neuron interpretability (explain, simulate, score) as a Dagster asset graph."""
