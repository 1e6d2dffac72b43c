"""The neuron viewer, end to end: a tiny subject model whose layer-0 neurons fire on known tokens
(" the", " is", "<"), the rule-based oracle LLM behind a real OpenAI-compatible server, and a corpus
full of hostile text (`<script>` tags, `<end>`, tabs, newlines, emoji). The pages are opened in
headless Chromium from file:// URLs."""

import json
import re
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from browser import chromium
from dagster import AssetKey
from oracle_server import OracleServer
from pipeline import in_memory_instance, remote, run_graph, tiny_settings
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from tiny_models import build_token_neuron_model

from neuron_assets.assets.common import viewer_page
from neuron_assets.assets.viewer import layer_neurons
from neuron_assets.method.prompts import format_record
from neuron_assets.resources.corpus import python_docs
from neuron_assets.viewer import layer_page, script_json, visible_token

WORDS = [" the", " is", "<"]
SHARD = "00|00-63"
SCRIPT = "<script>window.__xss=1</script>"
OWN_SCRIPTS = 2  # the layer page's JSON data block and its sort/filter script


def hostile_corpus(path: Path, n_docs: int = 50) -> Path:
    """Documentation sections, each opening with an injected script tag (so that the first window of
    every document holds it whole) and holding `<end>`, tabs, newlines and an emoji."""
    docs = [f"{SCRIPT} {text[:300]} <end>\tthe\n tab\tand newline\n \U0001F642 end" for _, text in python_docs()[:n_docs]]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viewer")
    model, _ = build_token_neuron_model(tmp / "model", WORDS, n_layers=1)
    with OracleServer() as server:
        settings = replace(remote(tiny_settings(model, tmp, neurons="first:3", shards=1, seq_len=32,
                                                max_windows=200), server),
                           corpus=str(hostile_corpus(tmp / "hostile.jsonl")), simulation_method="json")
        with in_memory_instance() as instance:
            storage = run_graph(settings, instance, ("00",))
            yield settings, storage, instance


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def url(settings, layer=None) -> str:
    return Path(viewer_page(settings.storage, layer)).resolve().as_uri()


def shown_rows(browser) -> list:
    return [r for r in browser.find_elements(By.CSS_SELECTOR, "#units tbody tr") if r.is_displayed()]


def row_key(row) -> tuple[int, str]:
    return int(row.get_attribute("data-unit")), row.find_elements(By.TAG_NAME, "td")[2].text


def alpha(style: str) -> float:
    """The alpha of a span's background colour (the browser writes alpha 1 as rgb(...))."""
    match = re.search(r"rgba?\(\d+,\s*\d+,\s*\d+(?:,\s*([0-9.]+))?\)", style)
    assert match, style
    return float(match.group(1) or 1.0)


def spans(browser, selector: str) -> list[tuple[float, float]]:
    """(data-value, background alpha) of the spans matching `selector`, read in one call."""
    found = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "s => [s.getAttribute('data-value'), s.getAttribute('style')])", selector)
    return [(float(value), alpha(style)) for value, style in found]


def test_the_hostile_corpus_runs_without_errors(viewer):
    _, storage, instance = viewer
    tokens = storage.read("corpus_tokens")
    text = ["".join(t) for t in tokens["tokens"].to_list()]
    assert any(SCRIPT in t for t in text) and any("<end>" in t for t in text)
    assert any("\t" in t for t in text) and any("\n" in t for t in text)
    for asset in ("explanations", "simulations", "scores"):
        table = storage.read(asset, SHARD)
        assert table.height and table["error"].is_null().all(), (asset, table["error"].drop_nulls().to_list())
    scores = storage.read("scores", SHARD)
    assert scores.filter(pl.col("variant") == "llm").sort("unit")["explanation"].to_list() == [
        'the token "the"', 'the token "is"', 'the token "<"']
    assert (scores["score_all"] > 0.9).all()
    for asset in ("neuron_viewer", "neuron_viewer_index"):
        record = instance.fetch_materializations(AssetKey(asset), limit=1).records[0]
        metadata = record.asset_materialization.metadata
        assert metadata["pages written"].value == 1 and metadata["units shown"].value == 3
        assert metadata["page"].value.endswith("index.html")


def test_a_corpus_token_end_cannot_close_a_record():
    # Every token line of a record ends with TAB and a value, so the delimiter line "<end>" (no TAB)
    # can only be the record's own, whatever the tokens are; tabs and newlines are escaped.
    record = format_record(["<end>", "<", "end", ">", "\t", "\n", "<start>"], [3, 0, 0, 0, 0, 0, 1])
    lines = record.split("\n")
    assert lines[0] == "<start>" and lines[-2] == "<end>" and lines[-1] == ""
    assert [line for line in lines if line == "<end>"] == ["<end>"]
    assert [line for line in lines if line == "<start>"] == ["<start>"]
    assert all("\t" in line for line in lines[1:-2]) and len(lines) == 7 + 3


def test_script_json_and_tokens_cannot_break_out():
    payload = script_json({"text": "</script><script>alert(1)</script>&", "nan": float("nan")})
    assert "<" not in payload and ">" not in payload and "&" not in payload
    assert json.loads(payload) == {"text": "</script><script>alert(1)</script>&", "nan": None}
    assert visible_token("\t<b>\n") == "\u21e5&lt;b&gt;\u21b5"
    page = layer_page("00", [{"unit": 0, "variants": [{"variant": "llm", "explanation": "</script><i>x</i>",
                                                          "score_all": 0.5}], "top": [], "random": []}])
    assert "</script><i>" not in page and "&lt;/script&gt;&lt;i&gt;x&lt;/i&gt;" in page


def test_layer_page_shows_scores_shaded_records_and_a_screenshot(viewer, browser, tmp_path):
    settings, storage, _ = viewer
    browser.get(url(settings, "00"))
    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    scores = storage.read("scores", SHARD)
    expected = {(n, v): s for n, v, s in scores.select("unit", "variant", "score_all").iter_rows()}
    rows = shown_rows(browser)
    assert {row_key(r) for r in rows} == set(expected)
    for row in rows:
        assert row.find_elements(By.TAG_NAME, "td")[3].text == f"{expected[row_key(row)]:.3f}"
    assert [s.get_attribute("id") for s in browser.find_elements(By.CSS_SELECTOR, "section.unit")] == [
        "n0", "n1", "n2"]

    # real activations shaded by activation / the neuron's max; simulated ones by expected / 10
    stats = {r["unit"]: r["max_activation"] for r in storage.read("neuron_records", "00", "stats").iter_rows(named=True)}
    values = spans(browser, "#n2 .tok.real")
    assert len(values) == 10 * 32  # 5 top + 5 random records of 32 tokens
    assert all(a == pytest.approx(min(1.0, max(0.0, v / stats[2])), abs=0.006) for v, a in values)
    assert sum(a > 0.5 for _, a in values) >= 5 and sum(a == 0 for _, a in values) > 100
    sim_values = spans(browser, "#n2 .tok.sim")
    assert len(sim_values) == 2 * 10 * 32  # llm and token_baseline under every token of every record
    assert all(a == pytest.approx(v / 10, abs=0.006) for v, a in sim_values)
    assert {v for v, _ in sim_values} == {0.0, 10.0}  # the oracle: 10 on "<", else 0
    # under each token, its simulations: the column of a "<" has the real and both simulated spans lit
    columns = browser.execute_script(
        "return Array.from(document.querySelectorAll('#n2 .record .col:not(.labels)')).map("
        "c => Array.from(c.querySelectorAll('.tok')).map(s => [s.textContent, s.getAttribute('style')]))")
    lit = [[alpha(style) for _, style in column] for column in columns if column[0][0] == "<"]
    assert lit and all(a == [pytest.approx(1.0, abs=0.05), 1.0, 1.0] for a in lit)
    assert all(len({text for text, _ in column}) == 1 for column in columns)  # one token per column


def test_sorting_by_score_all_and_filtering(viewer, browser):
    settings, storage, _ = viewer
    browser.get(url(settings, "00"))
    scores = storage.read("scores", SHARD)
    score = {(n, v): s for n, v, s in scores.select("unit", "variant", "score_all").iter_rows()}
    header = browser.find_element(By.CSS_SELECTOR, "#units th[data-column=score_all]")
    original = [row_key(r) for r in shown_rows(browser)]
    header.click()
    ascending = [row_key(r) for r in shown_rows(browser)]
    assert header.get_attribute("aria-sort") == "ascending"
    assert [score[k] for k in ascending] == sorted(score.values()) and ascending != original
    header.click()
    descending = [row_key(r) for r in shown_rows(browser)]
    assert header.get_attribute("aria-sort") == "descending"
    assert [score[k] for k in descending] == sorted(score.values(), reverse=True)
    browser.find_element(By.CSS_SELECTOR, "#units th[data-column=unit]").click()
    assert [row_key(r) for r in shown_rows(browser)] == sorted(score)

    box = browser.find_element(By.ID, "filter")
    box.send_keys('"is"')
    assert {row_key(r) for r in shown_rows(browser)} == {(1, "llm"), (1, "token_baseline")}
    assert browser.find_element(By.ID, "shown").text == "2"
    box.clear()
    box.send_keys("token_baseline")
    assert {row_key(r) for r in shown_rows(browser)} == {(n, "token_baseline") for n in (0, 1, 2)}


def test_hostile_text_renders_as_text(viewer, browser):
    settings, _, _ = viewer
    source = Path(viewer_page(settings.storage, "00")).read_text()
    assert "https://" not in source and "http://" not in source  # no external request
    browser.get(url(settings, "00"))
    assert browser.execute_script("return document.querySelectorAll('script').length") == OWN_SCRIPTS
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    records = browser.execute_script(
        "return Array.from(document.querySelectorAll('.record')).map("
        "r => Array.from(r.querySelectorAll('.tok.real')).map(s => s.textContent).join(''))")
    assert any(SCRIPT in r for r in records), "no shown record holds the injected script tag"
    assert any("<end>" in r for r in records)
    spans = browser.execute_script("return Array.from(document.querySelectorAll('.tok')).map(s => s.textContent)")
    assert any("\u21e5" in s for s in spans) and any("\u21b5" in s for s in spans)
    assert not any("\t" in s or "\n" in s for s in spans)
    # the explanation 'the token "<"' is in the table and in the JSON data, escaped there
    data = browser.execute_script("return JSON.parse(document.getElementById('unit-rows').textContent)")
    assert 'the token "<"' in {row["explanation"] for row in data}
    block = re.search(r'<script type="application/json" id="unit-rows">(.*?)</script>', source, re.S).group(1)
    assert "<" not in block and "\\u003c" in block


def test_index_links_layers_quality_and_token_explorer(viewer, browser):
    settings, storage, _ = viewer
    browser.get(url(settings))
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    link = browser.find_element(By.CSS_SELECTOR, "#layers a")
    assert link.text == "layer 00"
    tables = browser.find_elements(By.TAG_NAME, "table")
    quality = tables[0].text
    assert "mean_score_all" in quality and "token_baseline" in quality
    explorer = browser.find_elements(By.CSS_SELECTOR, "table.explorer")
    assert len(explorer) == 3
    # each hit links to its neuron's section, and names the neuron that fires on the token
    for row in explorer[0].find_elements(By.CSS_SELECTOR, "tbody tr"):
        token = row.find_elements(By.TAG_NAME, "td")[1].text.strip()
        neurons = [a.text for a in row.find_elements(By.TAG_NAME, "a")]
        assert f"layer 00 unit {WORDS.index(' ' + token if token != '<' else token)}" in neurons, (token, neurons)
    link.click()
    assert browser.current_url.endswith("/neuron_viewer/00/index.html")
    browser.find_element(By.CSS_SELECTOR, "#units a[href='#n2']").click()
    assert browser.current_url.endswith("#n2")


def test_sections_are_bounded_to_the_best_neurons(viewer):
    _, storage, _ = viewer
    scores = storage.read("scores", SHARD)
    tokens = dict(zip(*storage.read("corpus_tokens").select("seq_id", "tokens").to_dict(as_series=False).values()))
    neurons = layer_neurons(scores, storage.read("simulations", SHARD), storage.read("neuron_records", "00", "records"),
                            storage.read("neuron_records", "00", "stats"), tokens, limit=1)
    best = scores.sort("score_all", descending=True)["unit"][0]
    assert [(n["unit"], n["detail"]) for n in neurons] == [(k, k == best) for k in (0, 1, 2)]
    page = layer_page("00", neurons)
    assert re.findall(r'<section id="n(\d+)"', page) == [str(best)]
    assert page.count("<tr data-i=") == 6 and re.findall(r'href="#n(\d+)"', page) == [str(best)] * 2
