"""The neuron viewer: self-contained static HTML pages, one per layer plus an index.

Plain data in, an HTML string out; no Dagster import (the assets in `neuron_assets/assets/viewer.py`
read the tables and write the pages). Every page is one file with its CSS and JS inline: it makes
no network request and opens from a file:// URL, an S3 console or any static web server.

Safety: every piece of corpus text and every explanation goes through `html.escape`; the one data
block inside a <script> is JSON with `<`, `>` and `&` written as \\u003c, \\u003e, \\u0026
(`script_json`), so a corpus holding `</script>` or `<script>` shows as text and never runs.
Tabs, newlines and carriage returns in tokens show as ⇥, ↵ and ␍ (`visible_token`), so a token
never breaks the layout of a record.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence

from neuron_assets.method.controls import is_control
from neuron_assets.stages.capture import STATS_SCHEMA

# Shading: real activations in orange, simulated ones in blue, alpha = value / scale (0..1).
REAL_RGB = "255,140,0"
SIM_RGB = "40,110,255"
TABLE_COLUMNS = ("layer", "unit", "variant", "score_all", "score_top", "score_random", "explanation")
NUMERIC = {"layer", "unit", "score_all", "score_top", "score_random"}
# the scalar columns of the stats table, in its order
STAT_COLUMNS = tuple(c for c, kind in STATS_SCHEMA.items() if c != "unit" and kind.is_numeric())

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-top:1px solid #ddd;padding-top:.6em}
h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
th.sortable{cursor:pointer;user-select:none;background:#f4f4f4}
th.sortable[aria-sort=ascending]::after{content:" \\25B2"}
th.sortable[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
#filter{margin:.5em 0;padding:.3em;width:30em;max-width:100%}
.record{display:flex;flex-wrap:wrap;align-items:flex-start;margin:.2em 0 .6em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.col{display:flex;flex-direction:column;margin:0 0 2px 0}
.col.labels{color:#666;margin-right:.4em}
.col span{white-space:pre;padding:0;line-height:1.35em;min-height:1.35em;min-width:.4em}
.tok.sim{border-top:1px dotted #ccc}
.tok.nosim{color:#bbb}
.legend span{padding:0 .4em;margin-right:.6em}
.muted{color:#777}.error{color:#a00}
.explorer td.tokcell{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre}
"""

SORT_JS = """
(function(){
  var data = JSON.parse(document.getElementById('unit-rows').textContent);
  var table = document.getElementById('units'), body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  function key(row, column){ var v = data[+row.getAttribute('data-i')][column]; return v; }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th){
    th.addEventListener('click', function(){
      var column = th.getAttribute('data-column');
      var ascending = th.getAttribute('aria-sort') !== 'ascending';
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function(o){ o.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      rows.sort(function(a, b){
        var x = key(a, column), y = key(b, column);
        if (x === null && y === null) return (+a.getAttribute('data-i')) - (+b.getAttribute('data-i'));
        if (x === null) return 1;   // missing (NaN) scores last in both directions
        if (y === null) return -1;
        var c = (typeof x === 'number') ? x - y : String(x).localeCompare(String(y));
        if (c === 0) c = (+a.getAttribute('data-i')) - (+b.getAttribute('data-i'));
        return ascending ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
  var box = document.getElementById('filter');
  box.addEventListener('input', function(){
    var q = box.value.toLowerCase();
    var shown = 0;
    rows.forEach(function(r){
      var hit = !q || r.textContent.toLowerCase().indexOf(q) >= 0;
      r.style.display = hit ? '' : 'none';
      if (hit) shown++;
    });
    document.getElementById('shown').textContent = shown;
  });
})();
"""


def script_json(value) -> str:
    """JSON that is safe inside a <script> element: `<`, `>` and `&` escaped as \\u003c etc. (and
    U+2028 / U+2029, which old JavaScript parsers take as line ends); NaN written as null."""
    text = json.dumps(_no_nan(value), ensure_ascii=False, allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _no_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def visible_token(token: str) -> str:
    """A token as shown: tab, newline and carriage return as visible symbols (⇥ ↵ ␍), escaped."""
    shown = token.replace("\t", "\u21e5").replace("\r\n", "\u21b5").replace("\n", "\u21b5").replace("\r", "\u240d")
    return html.escape(shown)


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "NaN" if isinstance(value, float) else ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _alpha(value: float, scale: float) -> float:
    if not (scale > 0) or value is None or not math.isfinite(value):
        return 0.0
    return round(min(1.0, max(0.0, value / scale)), 2)


def _shade(rgb: str, alpha: float) -> str:
    return f"background:rgba({rgb},{alpha:g})"


def _page(title: str, body: str, scripts: Iterable[str] = ()) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n{body}\n"
            + "".join(scripts) + "</body></html>\n")


def _record_html(tokens: Sequence[str], activations: Sequence[float], scale: float,
                 simulated: dict[str, Sequence[float] | None], caption: str) -> str:
    """One record: a column per token, the token shaded by its real activation on top and, under it,
    one row per variant shaded by the simulated activation (0-10); unshaded (grey) where that
    variant has no simulation of this record. Values are in each span's data-value (and the real
    activation in its title, shown on hover)."""
    labels = ["<span>real</span>"] + [f"<span>{html.escape(v)}</span>" for v in simulated]
    cols = [f"<div class=\"col labels\">{''.join(labels)}</div>"]
    for i, token in enumerate(tokens):
        text = visible_token(token)
        a = float(activations[i]) if i < len(activations) else float("nan")
        cells = [f"<span class=\"tok real\" data-value=\"{_number(a)}\" title=\"{_number(a)}\" "
                 f"style=\"{_shade(REAL_RGB, _alpha(a, scale))}\">{text}</span>"]
        for variant, expected in simulated.items():
            if expected is None or i >= len(expected) or expected[i] is None or not math.isfinite(expected[i]):
                cells.append(f"<span class=\"tok nosim\" data-variant=\"{html.escape(variant)}\">{text}</span>")
                continue
            e = float(expected[i])
            cells.append(f"<span class=\"tok sim\" data-variant=\"{html.escape(variant)}\" data-value=\"{e:.2f}\" "
                         f"style=\"{_shade(SIM_RGB, _alpha(e, 10.0))}\">{text}</span>")
        cols.append(f"<div class=\"col\">{''.join(cells)}</div>")
    return f"<div class=\"muted\">{html.escape(caption)}</div><div class=\"record\">{''.join(cols)}</div>"


def _table(columns: Sequence[str], rows: Iterable[Sequence], numeric: set[str] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f"<td class=\"num\">{html.escape(_number(v))}</td>" if c in numeric else f"<td>{html.escape(_number(v))}</td>"
        for c, v in zip(columns, row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _neuron_section(layer: str, neuron: dict) -> str:
    """Explanations and scores per variant, the top and the random records, the stats."""
    n = neuron["unit"]
    stats = neuron.get("stats") or {}
    max_activation = stats.get("max_activation")
    records = [*neuron.get("top", []), *neuron.get("random", [])]
    if not (max_activation and max_activation > 0):  # no stats: the records' own maximum
        max_activation = max((max(r["activations"], default=0.0) for r in records), default=0.0)
    variants = neuron.get("variants", [])
    parts = [f"<section id=\"n{n}\" class=\"unit\"><h2>Layer {html.escape(layer)}, unit {n}</h2>"]
    parts.append(_table(("variant", "method", "score_all", "score_top", "score_random", "explanation", "error"),
                        [(v["variant"], v.get("method"), v.get("score_all"), v.get("score_top"),
                          v.get("score_random"), v.get("explanation"), v.get("error")) for v in variants],
                        {"score_all", "score_top", "score_random"}))
    shaded = neuron.get("simulated_variants", [])
    for kind, title in (("top", "Top records (valid split)"), ("random", "Random records (valid split)")):
        shown = neuron.get(kind, [])
        parts.append(f"<h3>{title}</h3>")
        if not shown:
            parts.append("<p class=\"muted\">none</p>")
        for r in shown:
            sims = {v: r.get("simulated", {}).get(v) for v in shaded}
            window_max = max(r["activations"], default=float("nan"))
            parts.append(_record_html(r["tokens"], r["activations"], max_activation, sims,
                                      f"seq {r['seq_id']}, max activation {_number(float(window_max))}"))
    if stats:
        row = [stats.get(c) for c in STAT_COLUMNS]
        parts.append("<h3>Stats</h3>" + _table(STAT_COLUMNS, [row], set(STAT_COLUMNS)))
        if stats.get("quantile_boundaries"):
            bounds = ", ".join(_number(float(b)) for b in stats["quantile_boundaries"])
            parts.append(f"<p class=\"muted\">quantile boundaries: {html.escape(bounds)}</p>")
    parts.append("<p><a href=\"#top\">back to the table</a></p></section>")
    return "".join(parts)


def layer_page(layer: str, neurons: list[dict], title: str = "Neuron viewer", note: str = "") -> str:
    """The page of one layer.

    neurons: one dict per neuron, in display order:
      neuron (int); variants: [{variant, method, explanation, score_all, score_top, score_random,
      error}] (the table lists those not ending in `_shuffled`; the section lists all);
      detail (default True): whether the neuron has a section (False: a table row only);
      simulated_variants: the variants shaded under the records; top / random: [{seq_id, tokens,
      activations, simulated: {variant: expected 0-10 per token}}]; stats: {mean, variance, skewness,
      kurtosis, max_activation, n_tokens, quantile_boundaries} (max_activation is the shading scale of
      real activations).
    """
    rows = []
    for neuron in neurons:
        for v in neuron.get("variants", []):
            if is_control(v["variant"]):
                continue
            rows.append({"layer": layer, "unit": neuron["unit"], "variant": v["variant"],
                         "detail": neuron.get("detail", True),
                         "score_all": v.get("score_all"), "score_top": v.get("score_top"),
                         "score_random": v.get("score_random"), "explanation": v.get("explanation") or ""})
    head = "".join(f"<th class=\"sortable\" data-column=\"{c}\">{c}</th>" for c in TABLE_COLUMNS)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for c in TABLE_COLUMNS:
            value = row[c]
            if c == "unit" and row["detail"]:
                cells.append(f"<td class=\"num\"><a href=\"#n{value}\">{value}</a></td>")
            elif c in NUMERIC:
                cells.append(f"<td class=\"num\">{html.escape(_number(value))}</td>")
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append(f"<tr data-i=\"{i}\" data-unit=\"{row['unit']}\">{''.join(cells)}</tr>")
    legend = (f"<p class=\"legend\"><span style=\"{_shade(REAL_RGB, 0.8)}\">real activation</span>"
              f"<span style=\"{_shade(SIM_RGB, 0.8)}\">simulated activation (0-10)</span>"
              "<span class=\"tok nosim\">no simulation</span> ⇥ tab, ↵ newline</p>")
    page = [f"<h1 id=\"top\">{html.escape(title)}: layer {html.escape(layer)}</h1>",
            "<p><a href=\"../index.html\">all layers</a></p>",
            f"<p class=\"muted\">{html.escape(note)}</p>" if note else "", legend,
            "<input id=\"filter\" type=\"search\" placeholder=\"filter rows (unit, variant, explanation...)\">",
            f" <span class=\"muted\"><span id=\"shown\">{len(rows)}</span> of {len(rows)} rows</span>",
            f"<table id=\"units\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
            *(_neuron_section(layer, n) for n in neurons if n.get("detail", True))]
    scripts = [f"<script type=\"application/json\" id=\"unit-rows\">{script_json(rows)}</script>",
               f"<script>{SORT_JS}</script>"]
    return _page(f"{title}: layer {layer}", "\n".join(page), scripts)


def explorer_html(excerpts: list[dict]) -> str:
    """The token explorer view: per excerpt its text, then per token the most active explained
    neurons (`explorer.top_explained`) with activation, explanation and score_all, linked to their
    layer page.

    excerpts: [{title, tokens, hits: per token [{layer, neuron, activation, relative, explanation,
    score_all}]}]; `layer` is the layer key of the page to link to."""
    parts = []
    for excerpt in excerpts:
        parts.append(f"<h3>{html.escape(excerpt['title'])}</h3>")
        strongest = [max((h["relative"] for h in hits), default=0.0) for hits in excerpt["hits"]]
        text = "".join(f"<span class=\"tok real\" style=\"{_shade(REAL_RGB, _alpha(s, 1.0))}\">{visible_token(t)}</span>"
                       for t, s in zip(excerpt["tokens"], strongest))
        parts.append(f"<div class=\"record\" style=\"white-space:pre\">{text}</div>")
        rows = []
        for i, (token, hits) in enumerate(zip(excerpt["tokens"], excerpt["hits"])):
            if not hits:
                continue
            listed = "<br>".join(
                f"<a href=\"{html.escape(h['layer'])}/index.html#n{h['unit']}\">layer {html.escape(h['layer'])} "
                f"unit {h['unit']}</a> <span class=\"muted\">act {_number(float(h['activation']), 2)}, "
                f"score_all {html.escape(_number(h['score_all']))}</span>: {html.escape(h['explanation'])}"
                for h in hits)
            rows.append(f"<tr><td class=\"num\">{i}</td><td class=\"tokcell\">{visible_token(token)}</td>"
                        f"<td>{listed}</td></tr>")
        if rows:
            parts.append("<table class=\"explorer\"><thead><tr><th>#</th><th>token</th>"
                         f"<th>most active explained units</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
        else:
            parts.append("<p class=\"muted\">no explained unit is active on this excerpt</p>")
    return "".join(parts)


def index_page(layers: list[tuple[str, int]], quality: tuple[list[str], list[list]] | None,
               explorer: list[dict], title: str = "Neuron viewer", note: str = "") -> str:
    """The index: a link per layer page present ((layer key, neurons shown)), the quality report
    (columns, rows) of model_summary, and the token explorer view of a few corpus excerpts."""
    links = "".join(f"<li><a href=\"{html.escape(k)}/index.html\">layer {html.escape(k)}</a> "
                    f"<span class=\"muted\">({n} units)</span></li>" for k, n in layers)
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class=\"muted\">{html.escape(note)}</p>" if note else "",
             "<h2>Layers</h2>", f"<ul id=\"layers\">{links}</ul>" if links else "<p class=\"muted\">no layer page yet</p>",
             "<h2>Model quality</h2>"]
    if quality:
        columns, rows = quality
        parts.append(_table(columns, rows, {c for c in columns if c not in ("variant", "method")}))
    else:
        parts.append("<p class=\"muted\">no model_summary yet</p>")
    parts.append("<h2>Token explorer</h2><p class=\"muted\">Corpus excerpts where explained units fire most; "
                 "per token the most active explained units of each layer (`neuron-assets explore TEXT` "
                 "shows the same for any text).</p>")
    parts.append(explorer_html(explorer) if explorer else "<p class=\"muted\">no explained unit yet</p>")
    return _page(title, "\n".join(parts))
