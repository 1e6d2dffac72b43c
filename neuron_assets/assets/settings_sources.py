"""The settings sources: one observable source asset per group of settings that shape results
(explainer, simulator, sampling, ...; `settings.SOURCES`). Observing one records a data version
that hashes those settings and what they point at (neuron_assets/versions.py), so a changed setting
makes exactly the assets that depend on it stale, and the UI's stale causes name the source.
"""

import dagster as dg

from neuron_assets.settings import SOURCES, Settings
from neuron_assets.versions import source_settings, source_version, sources_in_force

GROUP = "settings"


def _build(settings: Settings, source: str):
    @dg.observable_source_asset(
        name=source,
        group_name=GROUP,
        tags={"dagster/kind/python": ""},
        description=f"Settings source: {SOURCES[source]}. Its data version hashes these settings "
        "(`neuron-assets settings` lists them); observed by `neuron-assets refresh`, the demo, the nightly "
        "schedule or 'Observe' in the UI.",
    )
    def observe() -> dg.ObserveResult:
        values = source_settings(settings, source)
        return dg.ObserveResult(data_version=dg.DataVersion(source_version(settings, source)),
                             metadata={env: value or "(empty)" for env, value in values.items()})

    return observe


def build_settings_sources(settings: Settings) -> list:
    """The settings source assets of these settings' graph."""
    return [_build(settings, source) for source in sources_in_force(settings)]
