"""What reruns when something changes: one layer's weights, a code version, every setting that shapes
results, a setting that does not, an asset added to the graph, nothing at all.

One whole graph with every feature at its default (revision, shuffled controls, detection, embedding), the
explainer and simulator behind a real OpenAI-compatible HTTP server on loopback (so every LLM
request is counted, and the response cache is the real one), a tiny Llama with 2 layers x 1 shard
and 2 neurons per shard, is materialized once for the module. Each test changes one thing, checks
what Dagster reports stale and what the automation would request, refreshes, counts
materializations and LLM requests, and puts things back.
"""

import datetime
import json
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pytest
import torch
from dagster import (
    AssetKey,
    DataVersion,
    MaterializeResult,
    asset,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
)
from openai_server import FakeOpenAIServer
from pipeline import in_memory_instance, remote, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.assets.common import CACHE_HITS, CACHE_MISSES, REUSED
from neuron_assets.definitions import build_definitions
from neuron_assets.graph import shape_of
from neuron_assets.refresh import first_stage, observe_sources, refresh, refresh_runs, stale_partitions
from neuron_assets.resources.models import load_causal_lm
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.runs import materialize_runs, shard_keys
from neuron_assets.settings import SETTINGS, SOURCES
from neuron_assets.versions import source_versions

LAYERS = ("00", "01")
SHARD_STAGE = ("explanations", "revised_explanations", "simulations", "scores", "detection_scores",
               "embedding_scores")


def quiet(_):
    pass


@dataclass
class World:
    settings: object
    defs: object
    instance: object
    server: FakeOpenAIServer
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staleness")
    model = build_tiny_model("llama", tmp / "model", n_layers=2, max_positions=4096)
    served = build_tiny_model("llama", tmp / "served", n_layers=1, max_positions=4096)
    with FakeOpenAIServer(served, digit_bias=6.0) as server, in_memory_instance() as instance:
        settings = remote(tiny_settings(model, tmp, shards=1, neurons="first:2", max_windows=40, revision="on",
                                        control="shuffled", detection="on", embedding="on"), server)
        defs = build_definitions(settings)
        materialize_runs(defs, instance, shape_of(defs).demo_runs(LAYERS, shard_keys(defs)), log=quiet)
        yield World(settings, defs, instance, server, tmp)


def materializations(world: World) -> Counter:
    """{(asset, partition): number of materializations} over every asset that ever was in the graph."""
    counts = Counter()
    for key in world.instance.get_asset_keys():
        for record in world.instance.fetch_materializations(key, limit=10_000).records:
            counts[(key.to_user_string(), record.partition_key)] += 1
    return counts


def data_versions(world: World) -> dict:
    """{(asset, partition): data version of its latest materialization}."""
    latest = {}
    for key in world.instance.get_asset_keys():
        for record in world.instance.fetch_materializations(key, limit=10_000, ascending=True).records:
            latest[(key.to_user_string(), record.partition_key)] = record.asset_materialization.tags[
                "dagster/data_version"]
    return latest


def partitions_of(defs, names) -> set:
    """Every (asset, partition) of the named assets."""
    out = set()
    for name in names:
        partitions_def = defs.resolve_assets_def(name).partitions_def
        out |= {(name, str(k)) for k in partitions_def.get_partition_keys()} if partitions_def else {(name, None)}
    return out


def stale_set(defs, instance) -> set:
    return {(a, p) for a, p, _ in stale_partitions(defs, instance, include_missing=False)}


def requested(result) -> dict[str, set]:
    """What one automation evaluation requests: {asset: partitions}."""
    return {r.key.to_user_string(): set(map(str, r.true_subset.expensively_compute_partition_keys()))
            for r in result.results if r.true_subset.size and not r.key.to_user_string().startswith("[")}


def test_nothing_changed_launches_nothing(world):
    defs, instance = world.defs, world.instance
    assert stale_partitions(defs, instance) == []
    start = evaluate_automation_conditions(defs=defs, instance=instance)
    before = materializations(world)
    lines = []
    assert refresh(defs, instance, dry_run=True, log=lines.append) == []
    assert lines[-1].startswith("nothing is stale")
    # What the nightly schedule does: observe every source and re-materialize the unchanged corpus.
    schedule = defs.get_repository_def().get_schedule_def("observe_sources_nightly")
    tick = schedule.evaluate_tick(build_schedule_context(
        instance=instance, scheduled_execution_time=datetime.datetime(2026, 1, 2, 3)))
    sources = shape_of(defs).sources
    assert set(sources) == {"subject_model_weights", *SOURCES} - {"import_source"}
    assert [sorted(k.to_user_string() for k in r.asset_selection) for r in tick.run_requests] == [
        list(sources), ["corpus_documents"]]
    materialize_runs(defs, instance, [(sources, None), (("corpus_documents",), None)], log=quiet)
    assert stale_partitions(defs, instance) == []  # same content hash, same weight and settings hashes
    # Dagster's eager() alone would rerun corpus_tokens here (a new materialization); ours waits for a new version.
    assert requested(evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)) == {}
    assert refresh(defs, instance, log=quiet) == []
    assert materializations(world) - before == Counter({("corpus_documents", None): 1})


def test_new_weights_in_one_layer_rerun_exactly_that_layer(world):
    settings, defs, instance = world.settings, world.defs, world.instance
    start = evaluate_automation_conditions(defs=defs, instance=instance)
    before, versions = materializations(world), data_versions(world)
    hashes = SubjectModel(model=settings.model, cache=settings.cache, device="cpu").layer_hashes([0, 1])
    original = world.tmp / "model-original"
    shutil.copytree(settings.model, original)
    first_scores = TableStorage(root=settings.storage).read("scores", f"01|{shard_keys(defs)[0]}")["score_all"].to_list()

    # A checkpoint in which only layer 1 (the top layer) differs, written over the old one at the same path:
    # the layers below it keep their versions (test_layer_versions_chain_up_... changes a lower one).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.model)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(settings.model)
    # In practice a new checkpoint is read by a new process (every Dagster run, every CLI call);
    # this test process still holds the old model in load_causal_lm's cache.
    load_causal_lm.cache_clear()

    new = SubjectModel(model=settings.model, cache=settings.cache, device="cpu").layer_hashes([0, 1])
    assert new[0] == hashes[0] and new[1] != hashes[1]
    observe_sources(defs, instance, log=quiet)
    stale = stale_partitions(defs, instance)
    assert [(a, p) for a, p, _ in stale] == [("neuron_records", "01")]
    assert "subject_model_weights[01]" in stale[0][2]
    # The automation sensor would request the same partition, and nothing else.
    assert requested(evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)) == {
        "neuron_records": {"01"}}
    sensor = defs.get_repository_def().get_sensor_def("refresh_stale_partitions")
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    assert [(r.job_name, r.partition_key) for r in tick.run_requests] == [("layer_assets", "01")]
    assert refresh(defs, instance, dry_run=True, log=quiet) == [(("neuron_records",), "01")]

    requests = len(world.server.posts())
    refresh(defs, instance, log=quiet)
    after = materializations(world)
    shards = shard_keys(defs)
    rerun = {("neuron_records", "01"), ("layer_summary", "01"), ("model_summary", None),
             ("exported_neurons", "01"), ("neuron_viewer", "01"), ("neuron_viewer_index", None)}
    rerun |= {(asset, f"01|{s}") for asset in SHARD_STAGE for s in shards}
    assert after - before == Counter(dict.fromkeys(rerun, 1))
    assert len(world.server.posts()) > requests  # layer 01's neurons were explained again
    now = data_versions(world)
    for (asset, partition), version in versions.items():
        if (asset, partition) not in rerun:
            assert now[(asset, partition)] == version, (asset, partition)
    assert now[("neuron_records", "01")] != versions[("neuron_records", "01")]
    assert stale_partitions(defs, instance) == []

    # The old checkpoint back: layer 01 is stale again, and its LLM work comes from the response cache.
    shutil.rmtree(settings.model)
    shutil.copytree(original, settings.model)
    load_causal_lm.cache_clear()
    storage = TableStorage(root=settings.storage)
    old_scores = storage.read("scores", f"01|{shards[0]}")
    requests = len(world.server.posts())
    refresh(defs, instance, log=quiet)
    assert len(world.server.posts()) == requests
    new_scores = storage.read("scores", f"01|{shards[0]}")
    assert new_scores["score_all"].to_list() != old_scores["score_all"].to_list()
    assert new_scores["score_all"].to_list() == pytest.approx(first_scores, nan_ok=True)


def test_new_simulations_code_version_reruns_simulations_and_scores(world):
    settings, instance = world.settings, world.instance
    start = evaluate_automation_conditions(defs=world.defs, instance=instance)
    before = materializations(world)
    version = world.defs.resolve_assets_def("simulations").specs_by_key[AssetKey("simulations")].code_version
    changed = build_definitions(settings, code_versions={"simulations": f"{version}-changed"})

    stale = stale_partitions(changed, instance)
    partitions = {f"{layer}|{s}" for layer in LAYERS for s in shard_keys(changed)}
    assert {(a, p) for a, p, _ in stale} == {("simulations", p) for p in partitions}
    assert all(reason == "has a new code version" for _, _, reason in stale)
    assert requested(evaluate_automation_conditions(defs=changed, instance=instance, cursor=start.cursor)) == {
        "simulations": partitions, "scores": partitions}

    runs = refresh(changed, instance, log=quiet)
    # the new simulation rows carry the new code version (and their cache hits): what reads them follows
    assert runs[:len(partitions)] == [(("simulations", "scores"), p) for p in sorted(partitions)]
    diff = materializations(world) - before
    assert {k for k in diff if k[0] in ("simulations", "scores")} == {
        (a, p) for a in ("simulations", "scores") for p in partitions}
    assert not [k for k in diff if k[0] in ("corpus_tokens", "neuron_records", "explanations")]
    assert stale_partitions(changed, instance) == []
    refresh(world.defs, instance, log=quiet)  # the module's code versions back


def _other_corpus(world: World) -> str:
    path = world.tmp / "other_corpus.jsonl"
    from neuron_assets.resources.corpus import python_docs

    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in python_docs()[40:80]))
    return str(path)


def _two_column_corpus(world: World) -> str:
    """The corpus with a second field holding other text: NEURON_ASSETS_TEXT_COLUMN picks it."""
    from neuron_assets.resources.corpus import python_docs

    path = world.tmp / "two_columns.jsonl"
    texts = [t for _, t in python_docs()[:40]]
    others = [t for _, t in python_docs()[80:120]]
    path.write_text("".join(json.dumps({"text": a, "body": b}) + "\n" for a, b in zip(texts, others)))
    return str(path)


def _other_subject(world: World) -> str:
    return str(build_tiny_model("llama", world.tmp / "model-seed-1", n_layers=2, max_positions=4096, seed=1))


def _exported_root(world: World) -> str:
    """A copy of our own export (the published layout), imported as a variant."""
    storage = Path(world.settings.storage)
    target = world.tmp / "import"
    if not target.exists():
        shutil.copytree(storage / "exported_neurons", target)
    return str(target)


def refresh_rounds(defs, instance, rounds: int | None) -> None:
    """`refresh`, or only its first `rounds` rounds (each runs the earliest stale stage)."""
    if rounds is None:
        refresh(defs, instance, log=quiet, include_missing=False)
        return
    shape = shape_of(defs)
    for _ in range(rounds):
        stale = stale_partitions(defs, instance, include_missing=False)
        materialize_runs(defs, instance, refresh_runs(defs, first_stage(shape, stale)), log=quiet)


# Every setting that shapes results: what to change, the assets its change makes stale (every
# partition of each), the LLM requests the refresh makes ("some", or "none" where neuron-level reuse
# and the response cache serve it), the stale cause Dagster names (the settings source, or the asset
# the setting adds or removes), and how many refresh rounds run (None: until nothing is stale).
# Changes upstream of the LLM stages run the rounds that recompute the corpus, windows or records:
# a new data version there makes the next stage stale, asserted here; the propagation from records
# through every LLM stage is what the seed row and the weights test run end to end.
CHANGES = [
    ("corpus", lambda w: {"corpus": _other_corpus(w)}, {"corpus_documents"}, "none", "corpus_source", 1),
    ("text_column", lambda w: {"corpus": _two_column_corpus(w), "text_column": "body"}, {"corpus_documents"},
     "none", "corpus_source", 1),
    ("seq_len", lambda w: {"seq_len": 12}, {"corpus_tokens"}, "none", "tokenization", 1),
    ("max_windows", lambda w: {"max_windows": 36}, {"corpus_tokens"}, "none", "tokenization", 1),
    # new weights: new records, explained again (a single-layer run's records get their own data version,
    # unlike the module's first range run over both layers, so this one runs to the end)
    ("model", lambda w: {"model": _other_subject(w)}, {"corpus_tokens", "neuron_records"}, "some", "tokenization",
     None),
    ("seed", lambda w: {"seed": 1}, {"neuron_records", *SHARD_STAGE}, "some", "sampling", None),
    # one more top or random record leaves the explained and scored splits as they are: no new request
    ("top_records", lambda w: {"top_records": 21}, {"neuron_records", *SHARD_STAGE}, "none", "sampling", None),
    ("random_records", lambda w: {"random_records": 16}, {"neuron_records", *SHARD_STAGE}, "none", "sampling",
     None),
    # a narrower selection keeps the valid rows of the neuron it leaves out: the same table (see below)
    ("neurons", lambda w: {"neurons": "first:1"}, {"explanations"}, "none", "neuron_selection", None),
    # no unit of the tiny model is that rare: the same explanations, and the summary counts again
    ("min_activation_frequency", lambda w: {"min_activation_frequency": "0.001"}, {"explanations", "layer_summary"},
     "none", "rare_units", None),
    ("explainer_model", lambda w: {"explainer_model": "gpt-4o"}, {"explanations", "revised_explanations"}, "some",
     "explainer", None),
    ("explainer_backend", lambda w: {"explainer_backend": "local", "explainer_model": w.settings.model},
     {"explanations", "revised_explanations"}, "some", "explainer", None),
    ("simulator_model", lambda w: {"simulator_model": "gpt-4o"},
     {"simulations", "revised_explanations", "detection_scores"}, "some", "simulator", None),
    # 'auto' probed all_at_once: the same requests, served by the cache
    ("simulation_method", lambda w: {"simulation_method": "all_at_once"},
     {"simulations", "revised_explanations", "detection_scores"}, "none", "simulator", None),
    ("control", lambda w: {"control": "none"}, {"simulations", "scores", "embedding_scores"}, "none", "controls", None),
    ("failed_tokens", lambda w: {"failed_tokens": "drop"}, {"scores"}, "none", "scoring", None),
    ("revision", lambda w: {"revision": "off"}, {"simulations", "scores", "detection_scores", "embedding_scores"},
     "none",
     "revised_explanations", None),
    # two new variants: explained, simulated, scored and judged (the LLM asked); putting them back asks nothing
    ("output_variants", lambda w: {"output_variants": "on"}, {"explanations"}, "some", "output_variants", None),
    ("detection", lambda w: {"detection": "off"}, {"layer_summary"}, "none", "detection_scores", None),
    ("embedding", lambda w: {"embedding": "off"}, {"layer_summary"}, "none", "embedding_scores", None),
    # the import holds our own llm explanations: their simulations come from the cache
    ("import_from", lambda w: {"import_from": _exported_root(w)},
     {"imported_explanations", "simulations", "scores", "detection_scores", "embedding_scores"}, "none",
     "imported_explanations", None),
]


# Each source (and each asset a setting adds or removes) is refreshed end to end once, through one of
# its settings; its other settings are shown to enter the same version, and no other, by
# test_each_setting_enters_exactly_its_source (refreshing them too would repeat the same runs).
# New weights are test_new_weights_in_one_layer_rerun_exactly_that_layer's.
REFRESHED = ("corpus", "seq_len", "seed", "top_records", "neurons", "min_activation_frequency", "explainer_model",
             "simulation_method", "control", "failed_tokens", "output_variants", "revision", "detection", "embedding",
             "import_from")


def test_each_setting_enters_exactly_its_source(world):
    base = source_versions(world.settings)
    for name, change, _, _, cause, _ in CHANGES:
        if cause not in SOURCES:
            continue
        changed = source_versions(replace(world.settings, **change(world)))
        assert {s for s in base if changed[s] != base[s]} == {cause}, name
    # every source is refreshed end to end through at least one of its settings
    assert {c[4] for c in CHANGES} == {c[4] for c in CHANGES if c[0] in REFRESHED}


@pytest.mark.parametrize("name,change,stale,llm,cause,rounds", [c for c in CHANGES if c[0] in REFRESHED],
                         ids=[c[0] for c in CHANGES if c[0] in REFRESHED])
def test_a_setting_that_shapes_results_makes_exactly_its_readers_stale(world, name, change, stale, llm, cause,
                                                                       rounds):
    """Change one setting, refresh, put it back, refresh. The graph is narrowed to layer 00 (the
    module's other layer stays as it is): the same assertions at half the LLM work."""
    instance, server = world.instance, world.server
    base = replace(world.settings, layers="0")
    base_defs = build_definitions(base)
    assert stale_set(base_defs, instance) == set(), "an earlier test left the module's graph stale"
    defs = build_definitions(replace(base, **change(world)))
    shape = shape_of(defs)
    before = materializations(world)
    try:
        observe_sources(defs, instance, log=quiet)
        first = stale_partitions(defs, instance, include_missing=False)
        assert {(a, p) for a, p, _ in first} == partitions_of(defs, stale)
        assert any(cause in reason for _, _, reason in first), first

        requests = len(server.posts())
        refresh_rounds(defs, instance, rounds)
        made = len(server.posts()) - requests
        assert made > 0 if llm == "some" else made == 0, f"{made} LLM requests"
        rerun = set(materializations(world) - before)
        assert partitions_of(defs, stale) <= rerun
        upstream = {a for a in shape.order if shape.stage_of(a) < min(shape.stage_of(s) for s in stale)}
        assert not {(a, p) for a, p in rerun if a in upstream}, "an asset upstream of the change was recomputed"
        assert not {(a, p) for a, p in rerun if p and p.startswith("01")}, "the other layer was recomputed"
        if name == "neurons":  # first:2 -> first:1: one neuron reused, the other kept, nothing asked
            meta = latest_metadata(world, "explanations", "00|00-63")
            assert (meta[REUSED], meta["kept (valid, outside the selection)"], meta[CACHE_MISSES]) == (2, 1, 0)
        after = stale_partitions(defs, instance, include_missing=False)
        if rounds is None:
            assert after == []
        else:  # the recomputed stage has new data versions: the next stage is stale now
            assert after and min(shape.stage_of(a) for a, _, _ in after) > max(shape.stage_of(a) for a, _ in rerun)
    finally:
        # Back to the module's settings: stale again, and recomputed from reuse and the response cache.
        back = materializations(world)
        observe_sources(base_defs, instance, log=quiet)
        reverted = stale_set(base_defs, instance)
        requests = len(server.posts())
        refresh_rounds(base_defs, instance, rounds)
    assert reverted and set(materializations(world) - back)
    assert len(server.posts()) == requests, "reverting a setting asked the LLM again"
    assert stale_partitions(world.defs, instance, include_missing=False) == []
    if name == "control":  # controls back on: only the controls are simulated, and the cache answers
        sims = TableStorage(root=world.settings.storage).read("simulations", "00|00-63")
        controls = sims.filter(pl.col("variant").str.ends_with("_shuffled") & pl.col("seq_id").is_not_null()).height
        meta = latest_metadata(world, "simulations", "00|00-63")
        assert controls > 0 and meta["sequences simulated now"] == meta[CACHE_HITS] == controls


def latest_metadata(world: World, asset: str, partition: str) -> dict:
    record = next(r for r in world.instance.fetch_materializations(AssetKey(asset), limit=1_000).records
                  if r.partition_key == partition)
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


IRRELEVANT = [("workers", 2), ("llm_rpm", 600), ("llm_tpm", 100_000), ("llm_concurrency", 2), ("llm_timeout", 30),
              ("llm_retries", 2), ("batch_size", 8), ("device", "auto"), ("executor", "k8s"),
              ("cache", "{tmp}/other-cache"), ("prices", "{tmp}/prices.json"),
              ("explainer_base_url", "{base_url}/"), ("simulator_base_url", "{base_url}/")]


def test_settings_that_change_no_result_change_no_version(world, monkeypatch):
    shutil.copy(world.settings.prices, world.tmp / "prices.json")
    versions = source_versions(world.settings)
    for field, value in IRRELEVANT:
        if isinstance(value, str):
            value = value.format(tmp=world.tmp, base_url=world.server.base_url.rstrip("/"))
        changed = replace(world.settings, **{field: value})
        assert source_versions(changed) == versions, field
        defs = build_definitions(changed)
        observe_sources(defs, world.instance, log=quiet)
        assert stale_partitions(defs, world.instance) == [], field
    monkeypatch.setenv("NEURON_ASSETS_EXPLAINER_API_KEY", "sk-another-key")
    assert source_versions(world.settings) == versions
    # The declaration says which settings enter which version; every one of them is exercised above.
    entering = {s.env.removeprefix("NEURON_ASSETS_").lower() for s in SETTINGS if s.enters}
    # units: tests/test_units.py (partitions of a coders folder, and a retrained coder's layer stale);
    # the number formats: tests/test_llm_dtype.py (this module's LLMs are endpoints, which have none)
    tested = {c[0] for c in CHANGES} | {"explainer_base_url", "simulator_base_url", "simulator_backend", "layers",
                                        "shards", "units", "explainer_dtype", "simulator_dtype"}
    assert entering <= tested, entering - tested


def test_an_asset_added_to_the_definitions_is_refreshed_unedited(world):
    """A new layer x shard asset reading scores: refresh fills it in the shard stage, and reruns it
    with scores when they change; the demo's runs include it."""
    from neuron_assets.graph import LAYER_SHARD

    partitions_def = world.defs.resolve_assets_def("scores").partitions_def

    @asset(partitions_def=partitions_def, deps=["scores"], code_version="1")
    def score_digest(context) -> MaterializeResult:
        scores = TableStorage(root=world.settings.storage).read("scores", context.partition_key)
        return MaterializeResult(data_version=DataVersion(str(scores["score_all"].sum())))

    base = build_definitions(world.settings)
    from dagster import Definitions

    defs = Definitions.merge(base, Definitions(assets=[score_digest]))
    shape = shape_of(defs)
    assert shape.group["score_digest"] == LAYER_SHARD and shape.stage_of("score_digest") == shape.stage_of("scores")
    assert "score_digest" in shape.readers({"simulations"})
    assert any("score_digest" in selection for selection, _ in shape.demo_runs(LAYERS, shard_keys(defs)))
    runs = refresh(defs, world.instance, log=quiet)
    assert {p for selection, p in runs if selection == ("score_digest",)} == {
        f"{layer}|{s}" for layer in LAYERS for s in shard_keys(defs)}
    assert stale_partitions(defs, world.instance) == []
    changed = build_definitions(world.settings, code_versions={"scores": "changed"})
    changed = Definitions.merge(changed, Definitions(assets=[score_digest]))
    runs = refresh(changed, world.instance, log=quiet)
    assert runs[0][0] == ("scores", "score_digest")  # rerun with the scores it reads, in one run
    refresh(defs, world.instance, log=quiet)


def test_missing_partitions_are_proposed_only_where_their_inputs_exist(world, tmp_path):
    defs = build_definitions(replace(world.settings, storage=str(tmp_path / "data")))
    shape = shape_of(defs)
    with in_memory_instance() as instance:
        assert stale_partitions(defs, instance) == [("corpus_documents", None, "missing; its inputs exist")]
        materialize_runs(defs, instance, [(("corpus_documents", "corpus_tokens"), None)], log=quiet)
        stale = stale_partitions(defs, instance)
        assert [(a, p) for a, p, _ in stale] == [("neuron_records", k) for k in LAYERS]
        assert refresh_runs(defs, first_stage(shape, stale)) == [(("neuron_records",), ("00", "01"))]
        materialize_runs(defs, instance, [(("neuron_records",), "00")], log=quiet)
        # explanations of layer 00 can run; nothing of layer 01, nothing that needs explanations
        assert [(a, p) for a, p, _ in stale_partitions(defs, instance)] == [("neuron_records", "01")] + [
            ("explanations", f"00|{s}") for s in shard_keys(defs)]
        assert stale_partitions(defs, instance, include_missing=False) == []
        # These ran before the sources were ever observed: once observed, they are stale, so that
        # what a source says from now on is what their results were made from.
        observe_sources(defs, instance, log=quiet)
        stale = stale_partitions(defs, instance, include_missing=False)
        assert [(a, p) for a, p, _ in stale] == [("corpus_documents", None), ("corpus_tokens", None),
                                                 ("neuron_records", "00")]
        assert [cause in reason for (_, _, reason), cause in zip(stale, ("corpus_source", "tokenization",
                                                                         "sampling"))] == [True] * 3, stale


def test_refresh_jobs_hold_the_assets_the_settings_add(world):
    defs = build_definitions(replace(world.settings, import_from=_exported_root(world)))
    jobs = {name: {k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.executable_asset_keys}
            for name in ("unpartitioned_assets", "layer_assets", "layer_shard_assets")}
    assert jobs == {
        "unpartitioned_assets": {"corpus_documents", "corpus_tokens", "model_summary", "neuron_viewer_index"},
        "layer_assets": {"neuron_records", "layer_summary", "exported_neurons", "neuron_viewer"},
        "layer_shard_assets": {"explanations", "revised_explanations", "imported_explanations", "simulations",
                               "scores", "detection_scores", "embedding_scores"},
    }
    # every stage's assets fit in one of those jobs
    for stage in shape_of(defs).stages:
        for name in stage:
            assert sum(name in names for names in jobs.values()) == 1, name


def test_refresh_runs_group_by_stage(world):
    defs = build_definitions(replace(world.settings, import_from=_exported_root(world)))
    shape = shape_of(defs)
    assert shape.stages == [("corpus_documents", "corpus_tokens"), ("neuron_records",),
                            ("explanations", "imported_explanations", "revised_explanations", "detection_scores",
                             "embedding_scores", "simulations", "scores"),
                            ("exported_neurons", "layer_summary", "neuron_viewer"),
                            ("model_summary", "neuron_viewer_index")]
    stale = [("model_summary", None, ""), ("layer_summary", "01", ""), ("scores", "01|a", ""),
             ("simulations", "01|a", ""), ("explanations", "00|b", ""), ("neuron_records", "01", ""),
             ("neuron_records", "00", ""), ("corpus_tokens", None, ""),
             ("detection_scores", "01|c", ""), ("imported_explanations", "01|b", "")]
    shard = ("explanations", "revised_explanations", "detection_scores", "embedding_scores", "simulations", "scores")
    assert refresh_runs(defs, stale) == [
        (("corpus_tokens",), None),
        (("neuron_records",), ("00", "01")),
        (shard, "00|b"),
        (("simulations", "scores"), "01|a"),
        (("imported_explanations", "detection_scores", "embedding_scores", "simulations", "scores"), "01|b"),
        (("detection_scores",), "01|c"),  # the judge reads explanations, not simulations
        (("layer_summary",), "01"),
        (("model_summary", "neuron_viewer_index"), None),  # the index reads model_summary
    ]
    # Non-neighbouring layers are separate range runs (one forward pass each).
    three = build_definitions(replace(world.settings, layers="0,1"))
    assert refresh_runs(three, [("neuron_records", "01", "")]) == [(("neuron_records",), "01")]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_layer_versions_chain_up_through_each_architectures_layers(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path / "model", n_layers=2)
    subject = SubjectModel(model=str(path), cache=str(tmp_path / "cache"), device="cpu")
    hashes = subject.layer_hashes([0, 1])
    assert len(set(hashes.values())) == 2 and all(len(h) == 16 for h in hashes.values())
    from transformers import AutoModelForCausalLM

    def edit(module: str) -> dict[int, str]:
        """Add 1 to the first parameter of `module`, save, and hash again."""
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            next(model.get_submodule(module).parameters()).add_(1)
        model.save_pretrained(path)
        return subject.layer_hashes([0, 1])

    blocks, final_norm = ("transformer.h", "transformer.ln_f") if arch == "gpt2" else ("gpt_neox.layers",
                                                                                       "gpt_neox.final_layer_norm")
    # the upper layer alone: only its version changes; the lower one: both (its output feeds the upper one)
    upper = edit(f"{blocks}.1")
    assert upper[0] == hashes[0] and upper[1] != hashes[1]
    lower = edit(f"{blocks}.0")
    assert lower[0] != upper[0] and lower[1] != upper[1]
    # outside the layers (what each layer's units promote goes through the final norm): every layer
    outside = edit(final_norm)
    assert outside[0] != lower[0] and outside[1] != lower[1]


def test_settings_that_cannot_be_versioned_fail_before_any_run(world, tmp_path, monkeypatch):
    from neuron_assets.versions import source_version

    with pytest.raises(ValueError, match=r"NEURON_ASSETS_IMPORT_FROM='.*nowhere'.*cannot be versioned"):
        source_versions(replace(world.settings, import_from=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"NEURON_ASSETS_SIMULATOR_BASE_URL='localhost:8000'.*cannot be identified"):
        source_version(replace(world.settings, simulator_base_url="localhost:8000"), "simulator")
    with pytest.raises(ValueError, match=r"NEURON_ASSETS_CORPUS='.*missing.jsonl'"):
        source_version(replace(world.settings, corpus=str(tmp_path / "missing.jsonl")), "corpus_source")
    # The command line says it in one line, before it opens the instance or runs anything.
    from neuron_assets.cli import main

    for name, value in {**world.settings.environment(), "NEURON_ASSETS_IMPORT_FROM": str(tmp_path / "nowhere"),
                        "DAGSTER_HOME": str(tmp_path / "no-instance")}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match="neuron-assets: NEURON_ASSETS_IMPORT_FROM=.*cannot be versioned"):
        main(["refresh", "--dry-run"])
    assert not (tmp_path / "no-instance").exists()
