"""The Dagster UI on a real run: a tiny model's graph (1 layer, 2 neurons, one of two shards) is
materialized into an on-disk instance, then `dagster dev` serves that instance and the definitions
built from the same settings (as NEURON_ASSETS_* variables). The asset graph, its partitions and the
materializations are read over GraphQL, and the global lineage page is opened in headless Chromium
and screenshotted (also to $NEURON_ASSETS_SCREENSHOTS/asset_graph.png when that is set).

After the run, one setting is changed (NEURON_ASSETS_SEED) and the sources observed, as `refresh`
does: the UI then shows what that change made stale, and names the settings source as the cause."""

import io
import os
import shutil
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from browser import chromium
from dagster import AssetKey, DagsterInstance
from dagster_dev import dagster_dev, graphql, make_home, wait_for_code_location
from pipeline import run_graph, tiny_settings
from selenium.webdriver.common.by import By
from tiny_models import build_tiny_model

from neuron_assets.definitions import build_definitions
from neuron_assets.refresh import observe_sources

LAYER, SHARD, OTHER_SHARD = "00", "00-31", "32-63"
SCORES_KEY = f"{LAYER}|{SHARD}"  # multi-partition keys: dimensions in name order, layer|shard
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    model = build_tiny_model("gpt2", tmp / "model", n_layers=1)  # 64 neurons: shards 00-31 and 32-63
    settings = tiny_settings(model, tmp)
    home = make_home(tmp / "home")
    changed = replace(settings, seed=1)
    with DagsterInstance.from_config(str(home)) as instance:
        run_graph(settings, instance, (LAYER,), shards=[SHARD])
        assert instance.get_latest_materialization_event(AssetKey("scores")) is not None
        observe_sources(build_definitions(changed), instance, log=lambda _: None)
    with dagster_dev(home, changed.environment(), tmp / "logs") as url:
        wait_for_code_location(url)
        yield url, changed, tmp


ASSET_NODES = """
query { assetNodes { assetKey { path } dependencyKeys { path } groupName isPartitioned
  partitionKeysByDimension { name partitionKeys } } }
"""

SCORES_STATUS = """
query ($partitions: [String!]) { assetNodes(assetKeys: [{path: ["scores"]}]) {
  partitionStats { numMaterialized numPartitions }
  latestMaterializationByPartition(partitions: $partitions) { partition runId timestamp } } }
"""


def nodes(url) -> dict[str, dict]:
    return {"/".join(n["assetKey"]["path"]): n for n in graphql(url, ASSET_NODES)["assetNodes"]}


def deps(node) -> set[str]:
    return {"/".join(d["path"]) for d in node["dependencyKeys"]}


def test_asset_graph_over_graphql(ui):
    url, settings, _ = ui
    graph = nodes(url)
    expected = {k.to_user_string() for k in build_definitions(settings).resolve_all_asset_keys()}
    assert set(graph) == expected
    assert "corpus_tokens" in deps(graph["neuron_records"])
    assert "subject_model_weights" in deps(graph["neuron_records"])
    assert "simulations" in deps(graph["scores"])
    assert "explanations" in deps(graph["simulations"])
    assert "corpus_documents" in deps(graph["corpus_tokens"])
    assert deps(graph["corpus_documents"]) == {"corpus_source"}  # the settings source of the corpus
    # revision, controls and detection are off in these settings: their assets are not in the graph
    assert "revised_explanations" not in graph and "detection_scores" not in graph


def test_partitions_over_graphql(ui):
    url, _, _ = ui
    graph = nodes(url)
    records = graph["neuron_records"]
    assert records["isPartitioned"]
    assert [(d["name"], d["partitionKeys"]) for d in records["partitionKeysByDimension"]] == [("default", [LAYER])]
    dims = {d["name"]: d["partitionKeys"] for d in graph["scores"]["partitionKeysByDimension"]}
    assert dims == {"layer": [LAYER], "shard": [SHARD, OTHER_SHARD]}
    assert not graph["model_summary"]["isPartitioned"]


def test_materialization_status_over_graphql(ui):
    url, _, _ = ui
    other = f"{LAYER}|{OTHER_SHARD}"
    node, = graphql(url, SCORES_STATUS, {"partitions": [SCORES_KEY, other]})["assetNodes"]
    assert node["partitionStats"] == {"numMaterialized": 1, "numPartitions": 2}
    done, missing = node["latestMaterializationByPartition"]
    assert done is not None and done["partition"] == SCORES_KEY and done["runId"]
    assert float(done["timestamp"]) / 1000 <= time.time()
    assert missing is None  # the other shard was never run


STALE = """
query ($key: [String!]!, $partition: String) { assetNodes(assetKeys: [{path: $key}]) {
  staleStatus(partition: $partition)
  staleCauses(partition: $partition) { key { path } category reason dependency { path } } } }
"""


def stale(url, asset: str, partition: str | None) -> dict:
    node, = graphql(url, STALE, {"key": [asset], "partition": partition})["assetNodes"]
    return node


def test_a_changed_setting_is_a_stale_cause_in_the_ui(ui):
    url, _, _ = ui
    graph = nodes(url)
    assert "sampling" in deps(graph["neuron_records"]) and "explainer" in deps(graph["explanations"])
    assert graph["sampling"]["groupName"] == "settings"
    for asset, partition in (("explanations", SCORES_KEY), ("neuron_records", LAYER)):
        node = stale(url, asset, partition)
        assert node["staleStatus"] == "STALE", node
        causes = {("/".join((c["dependency"] or c["key"])["path"]), c["category"], c["reason"])
                  for c in node["staleCauses"]}
        assert causes == {("sampling", "DATA", "has a new data version")}, causes  # the source itself changed
    tokens = stale(url, "corpus_tokens", None)
    assert tokens["staleStatus"] == "FRESH" and tokens["staleCauses"] == []  # the seed is not read there


GRAPH_BOX = """const boxes = [...document.querySelectorAll('svg foreignObject')].map(e => e.getBoundingClientRect())
  .filter(r => r.width > 0);
return [Math.min(...boxes.map(r => r.left)), Math.min(...boxes.map(r => r.top)),
        Math.max(...boxes.map(r => r.right)), Math.max(...boxes.map(r => r.bottom)), window.devicePixelRatio];"""


def wait_for_text(browser, text: str, tmp: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not browser.find_elements(By.XPATH, f"//*[contains(text(), '{text}')]"):
        if time.monotonic() > deadline:
            browser.save_screenshot(str(tmp / "asset_graph_failed.png"))
            body = browser.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"the asset graph did not show {text} within {seconds:.0f} s at "
                                 f"{browser.current_url} (screenshot: {tmp / 'asset_graph_failed.png'}); "
                                 f"page text:\n{body[:2000]}")
        time.sleep(0.5)


def test_asset_graph_page_screenshot(ui):
    url, _, tmp = ui
    # With several groups the lineage page shows them collapsed; `expanded` opens them all
    # (group ids are `global@global:<group>` in Dagster 1.13's UI).
    groups = sorted({n["groupName"] for n in nodes(url).values()})
    assert len(groups) > 1
    expanded = ",".join(f"global@global:{g}" for g in groups)
    width, height = 1700, 1250
    with chromium(width=width, height=height) as browser:
        # 1.5 device pixels per CSS pixel: the same layout, legible labels in the screenshot
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1.5, "mobile": False})
        browser.get(f"{url}/asset-groups?{urllib.parse.urlencode({'expanded': expanded})}")
        wait_for_text(browser, "neuron_records", tmp)
        # more room for the graph: the navigation and the asset tree beside the graph folded away
        browser.find_element(By.XPATH, "//*[text()='Hide navigation']").click()
        browser.find_element(By.XPATH, "//input[@placeholder='Jump to…']/following::button[1]").click()
        time.sleep(3)  # the layout settles and the partition status of each node loads
        text = browser.find_element(By.TAG_NAME, "body").text
        left, top, right, bottom, scale = browser.execute_script(GRAPH_BOX)
        page = browser.get_screenshot_as_png()
    shown = [name for name in ("corpus_documents", "corpus_tokens", "neuron_records", "explanations", "simulations",
                               "scores", "layer_summary", "model_summary", "exported_neurons") if name in text]
    assert len(shown) >= 7, f"asset names on the page: {shown}\n{text[:2000]}"
    assert page.startswith(PNG) and len(page) > 20_000
    (tmp / "asset_graph_page.png").write_bytes(page)
    image = Image.open(io.BytesIO(page))
    assert image.size == (int(width * scale), int(height * scale))
    margin = 24
    box = (max(0, int(scale * (left - margin))), max(0, int(scale * (top - margin))),
           min(image.width, int(scale * (right + margin))), min(image.height, int(scale * (bottom + margin))))
    # the nodes span most of the viewport (a graph that failed to lay out would be a dot or nothing)
    assert box[2] - box[0] > image.width / 3 and box[3] - box[1] > image.height / 3, box
    path = tmp / "asset_graph.png"
    image.crop(box).save(path, optimize=True)
    assert path.read_bytes().startswith(PNG) and 20_000 < path.stat().st_size < 400_000
    if os.environ.get("NEURON_ASSETS_SCREENSHOTS"):
        target = Path(os.environ["NEURON_ASSETS_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / "asset_graph.png")
