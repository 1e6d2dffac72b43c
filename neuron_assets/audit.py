"""`neuron-assets audit LAYER NEURON`: the lineage of one neuron's score, checked end to end.

score rows -> simulation -> explanation -> neuron records -> corpus tokens (+ subject model weights),
each with the Dagster run id, time, data and code version of the materialization that produced
its partition, then consistency checks between the tables and the instance, each ok / MISMATCH
(n/a where a check does not apply):

- the score's explanation_id is the explanation row's, and so is every simulation row's;
- the score's records_hash is recomputed from neuron_records over the simulated valid-split rows,
  the explanation's over the train split; the simulated sequences are the valid split;
- the explanation's prompt_version is the suffix of the explanations materialization's code version;
- every table file still hashes to the data version its materialization recorded;
- every step was computed from the upstream version that is current now (the latest upstream
  event of the mapped partition before the step's own materialization has today's data version).

`audit()` returns plain nested dicts; `format_audit()` renders them; `main_audit(args)` is the CLI.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import polars as pl
from dagster import AssetKey, AssetRecordsFilter

from neuron_assets.assets.common import records_hash, records_of
from neuron_assets.method.records import split_top
from neuron_assets.resources.storage import TableStorage

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
OK, MISMATCH, NA = "ok", "MISMATCH", "n/a"
WEIGHTS = "subject_model_weights"


class AuditError(ValueError):
    """A neuron that cannot be audited, with what to run first (a ValueError: the CLI prints it)."""


# ---------------------------------------------------------------------------------------------
# events in the instance


def _event(instance, asset: str, partition: str | None = None, before: int | None = None,
           kind: str = "materialization"):
    """The latest materialization (or observation) record of an asset partition, optionally the
    latest one stored before the event with storage id `before`; None when there is none."""
    records_filter = AssetRecordsFilter(AssetKey(asset), asset_partitions=[partition] if partition else None,
                                        before_storage_id=before)
    fetch = instance.fetch_materializations if kind == "materialization" else instance.fetch_observations
    records = fetch(records_filter, limit=1).records
    return records[0] if records else None


def _metadata_value(value):
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _describe(record, *metadata_keys: str) -> dict | None:
    if record is None:
        return None
    event = record.asset_materialization or record.asset_observation
    tags = dict(event.tags or {})
    metadata = {k: _metadata_value(event.metadata[k]) for k in metadata_keys if k in event.metadata}
    return {
        "run_id": record.run_id,
        "timestamp": record.timestamp,
        "time": datetime.fromtimestamp(record.timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "storage_id": record.storage_id,
        "partition": record.partition_key,
        "data_version": tags.get(DATA_VERSION_TAG),
        "code_version": tags.get(CODE_VERSION_TAG),
        "metadata": metadata,
    }


# ---------------------------------------------------------------------------------------------
# checks


def _check(checks: list, check: str, status: str, detail: str, variant: str | None = None) -> None:
    checks.append({"check": check, "variant": variant, "status": status, "detail": detail})


def _equal(checks, check, ours, theirs, what, variant=None) -> None:
    if ours is None and theirs is None:
        _check(checks, check, NA, f"no {what} on either side", variant)
    elif ours == theirs:
        _check(checks, check, OK, f"{what} {ours}", variant)
    else:
        _check(checks, check, MISMATCH, f"{what} {ours} != {theirs}", variant)


def _file_hash(storage: TableStorage, asset: str, partition: str | None = None, table: str = "data") -> str | None:
    """The content hash TableStorage.write returned for this file (sha256 of the Parquet bytes)."""
    path = storage.path(asset, partition, table)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def _file_check(checks, name: str, on_disk: str | None, materialization: dict | None, recorded: str | None) -> None:
    check = f"{name}_file_matches_materialization"
    if materialization is None:
        _check(checks, check, NA, f"{name} has no materialization of this partition in this instance")
    elif on_disk is None:
        _check(checks, check, MISMATCH, f"{name}: the table file is missing")
    elif on_disk == recorded:
        _check(checks, check, OK, f"{name}: the file hashes to the recorded version {recorded}")
    else:
        _check(checks, check, MISMATCH, f"{name}: the file hashes to {on_disk}, the materialization recorded "
                                        f"{recorded} (the file was changed outside Dagster)")


def _provenance_check(checks, instance, downstream: str, down_record, upstream: str, partition: str | None,
                      kind: str = "materialization") -> dict | None:
    """Was `downstream` computed from the upstream version that is current now? Returns the
    upstream event that was current when the downstream was materialized (described)."""
    check = f"{downstream}_uses_current_{upstream}"
    if down_record is None:
        _check(checks, check, NA, f"{downstream} has no materialization in this instance")
        return None
    used = _describe(_event(instance, upstream, partition, before=down_record.storage_id, kind=kind))
    now = _describe(_event(instance, upstream, partition, kind=kind))
    where = f"{upstream}[{partition}]" if partition else upstream
    if used is None:
        detail = (f"{where} has no {kind}" if now is None
                  else f"{where} was first recorded after {downstream} was materialized")
        _check(checks, check, NA, detail)
    elif used["data_version"] == now["data_version"]:
        _check(checks, check, OK, f"{where} version {used['data_version']} (run {used['run_id']})")
    else:
        _check(checks, check, MISMATCH,
               f"{downstream} was computed from {where} version {used['data_version']} (run {used['run_id']}); "
               f"it is now {now['data_version']} (run {now['run_id']}): rematerialize {downstream}")
    return used


# ---------------------------------------------------------------------------------------------
# the audit


def _read(storage: TableStorage, asset: str, partition: str, table: str = "data") -> pl.DataFrame:
    if not storage.exists(asset, partition, table):
        raise AuditError(
            f"{asset} has no table for partition {partition} under {storage.root}: run "
            f"`dagster asset materialize -m neuron_assets.definitions --select explanations,simulations,scores "
            f"--partition '{partition}'` (or `neuron-assets demo`) first"
        )
    return storage.read(asset, partition, table)


def _none_if_nan(x):
    return None if isinstance(x, float) and not np.isfinite(x) else x


def audit(storage: TableStorage, instance, layer: int, neuron: int, shard_key: str, *,
          layer_key: str | None = None) -> dict:
    """The lineage of neuron `neuron` of layer `layer`, whose scores live in partition
    `layer_key|shard_key` (`layer_key` defaults to the layer zero-padded to 2 digits)."""
    layer_key = layer_key or f"{int(layer):02d}"
    partition = f"{layer_key}|{shard_key}"
    where = f"layer {layer_key} neuron {neuron}"

    scores = _read(storage, "scores", partition)
    score_rows = scores.filter(pl.col("neuron") == neuron).sort("variant")
    if score_rows.height == 0:
        raise AuditError(
            f"{where} has no score in scores[{partition}] (scored there: "
            f"{sorted(set(scores['neuron'].to_list())) or 'none'}): select it with NEURON_ASSETS_NEURONS and run "
            f"`dagster asset materialize -m neuron_assets.definitions --select explanations,simulations,scores "
            f"--partition '{partition}'` first"
        )
    sims = _read(storage, "simulations", partition).filter(pl.col("neuron") == neuron)
    explanations = _read(storage, "explanations", partition).filter(pl.col("neuron") == neuron)
    if not storage.exists("neuron_records", layer_key, "records"):
        raise AuditError(f"neuron_records has no table for layer {layer_key}: run "
                         f"`dagster asset materialize -m neuron_assets.definitions --select neuron_records "
                         f"--partition {layer_key}` first")
    records = records_of(storage.read("neuron_records", layer_key, "records"), [neuron])[neuron]

    # materializations (and the observation of the weights) that produced each partition
    rec = {name: _event(instance, name, partition) for name in ("scores", "simulations", "explanations")}
    rec["neuron_records"] = _event(instance, "neuron_records", layer_key)
    rec["corpus_tokens"] = _event(instance, "corpus_tokens")
    weights_kind = "observation"
    rec[WEIGHTS] = _event(instance, WEIGHTS, layer_key, kind="observation")
    if rec[WEIGHTS] is None and _event(instance, WEIGHTS, layer_key) is not None:
        weights_kind = "materialization"  # tolerate a materialized rather than observed weights asset
        rec[WEIGHTS] = _event(instance, WEIGHTS, layer_key)
    mat = {
        "scores": _describe(rec["scores"], "llm score_all mean"),
        "simulations": _describe(rec["simulations"], "simulator", "method"),
        "explanations": _describe(rec["explanations"], "explainer", "prompt version"),
        "neuron_records": _describe(rec["neuron_records"], "content hash", "subject model"),
        "corpus_tokens": _describe(rec["corpus_tokens"], "dagster/row_count", "seq_len"),
        WEIGHTS: _describe(rec[WEIGHTS]),
    }
    checks: list[dict] = []
    explanation_by_variant = {r["variant"]: r for r in explanations.iter_rows(named=True)}

    # scores
    score_out, score_text = [], {}
    for row in score_rows.iter_rows(named=True):
        score_text[row["variant"]] = row.get("explanation")
        score_out.append({k: _none_if_nan(row.get(k)) for k in (
            "variant", "score_all", "score_top", "score_random", "rsquared", "abs_dev_explained", "method",
            "simulator_model", "n_failed_tokens", "explanation_id", "records_hash", "error")})

    # simulations, per variant
    sim_out = []
    for (variant,), group in sims.group_by("variant", maintain_order=True):
        simulated = group.filter(pl.col("expected").is_not_null())
        sim_out.append({
            "variant": variant,
            "simulator_model": group["simulator_model"][0],
            "method": ", ".join(sorted(set(group["method"].drop_nulls().to_list()))),
            "sequences": group.height,
            "simulated": simulated.height,
            "failed_tokens": int(group["n_failed_tokens"].sum()),
            "explanation_ids": sorted(set(group["explanation_id"].drop_nulls().to_list())),
            "errors": sorted(set(group["error"].drop_nulls().to_list())),
        })
    sim_out.sort(key=lambda s: s["variant"])

    # explanations, per variant
    expl_out = [{k: row.get(k) for k in ("variant", "text", "explainer_model", "prompt_version", "cache_hit",
                                         "records_hash", "explanation_id", "code_version", "error")}
                for row in explanations.sort("variant").iter_rows(named=True)]

    # --- consistency of the tables with each other
    for score in score_out:
        variant = score["variant"]
        explanation = explanation_by_variant.get(variant)
        _equal(checks, "score_explanation_id", score["explanation_id"],
               explanation["explanation_id"] if explanation else "(no explanation row)", "explanation_id", variant)
        if explanation and score_text[variant] != explanation["text"]:
            _check(checks, "score_explanation_text", MISMATCH,
                   f"the score row's explanation {score_text[variant]!r} != the explanation's {explanation['text']!r}",
                   variant)
        group = sims.filter(pl.col("variant") == variant)
        ids = sorted(set(group["explanation_id"].to_list()), key=str)
        expected_id = explanation["explanation_id"] if explanation else None
        if not ids:
            _check(checks, "simulation_explanation_id", MISMATCH, "no simulation rows", variant)
        elif ids == [expected_id]:
            _check(checks, "simulation_explanation_id", OK, f"{group.height} rows, explanation_id {expected_id}",
                   variant)
        else:
            _check(checks, "simulation_explanation_id", MISMATCH,
                   f"simulation rows name {ids}, the explanation row {expected_id}", variant)
        _records_checks(checks, variant, score, group, records)
    for explanation in expl_out:
        variant = explanation["variant"]
        _explanation_records_check(checks, variant, explanation, records)
        code = (mat["explanations"] or {}).get("code_version")
        check = "prompt_version_matches_code_version"
        if code is None:
            _check(checks, check, NA, "explanations has no materialization of this partition", variant)
        elif explanation["prompt_version"] and code.endswith(f"-{explanation['prompt_version']}"):
            _check(checks, check, OK, f"prompt {explanation['prompt_version']}, code version {code}", variant)
        else:
            _check(checks, check, MISMATCH,
                   f"prompt {explanation['prompt_version']}, explanations code version {code}", variant)

    # --- the files are what the materializations recorded
    for name in ("scores", "simulations", "explanations"):
        m = mat[name]
        _file_check(checks, name, _file_hash(storage, name, partition), m, m and m["data_version"])
    content = "".join(h or "" for h in (_file_hash(storage, "neuron_records", layer_key, "records"),
                                        _file_hash(storage, "neuron_records", layer_key, "stats")))
    m = mat["neuron_records"]
    _file_check(checks, "neuron_records", content or None, m, m and m["metadata"].get("content hash"))
    m = mat["corpus_tokens"]
    _file_check(checks, "corpus_tokens", _file_hash(storage, "corpus_tokens"), m, m and m["data_version"])

    # --- every step used the upstream version that is current now
    used = {}
    for down, up, part in (("scores", "simulations", partition), ("scores", "explanations", partition),
                           ("scores", "neuron_records", layer_key), ("simulations", "explanations", partition),
                           ("simulations", "neuron_records", layer_key), ("explanations", "neuron_records", layer_key),
                           ("neuron_records", "corpus_tokens", None)):
        used[(down, up)] = _provenance_check(checks, instance, down, rec[down], up, part)
    weights = None
    if rec[WEIGHTS] is not None:
        used_weights = _provenance_check(checks, instance, "neuron_records", rec["neuron_records"], WEIGHTS,
                                         layer_key, kind=weights_kind)
        weights = {**mat[WEIGHTS], "kind": weights_kind,
                   "version_used_by_neuron_records": used_weights and used_weights["data_version"]}

    counts = {kind: len(v) for kind, v in sorted(records.items())}
    return {
        "layer": int(layer),
        "layer_key": layer_key,
        "neuron": int(neuron),
        "shard": shard_key,
        "partition": partition,
        "scores": {"materialization": mat["scores"], "rows": score_out,
                   "column_lineage": _column_lineage(rec["scores"])},
        "simulations": {"materialization": mat["simulations"], "variants": sim_out},
        "explanations": {"materialization": mat["explanations"], "variants": expl_out},
        "neuron_records": {
            "materialization": mat["neuron_records"],
            "data_version": (mat["neuron_records"] or {}).get("data_version"),
            "content_hash": (mat["neuron_records"] or {}).get("metadata", {}).get("content hash"),
            "records": counts,
        },
        "corpus_tokens": {
            "materialization": mat["corpus_tokens"],
            "data_version": (mat["corpus_tokens"] or {}).get("data_version"),
            "version_used_by_neuron_records": (used[("neuron_records", "corpus_tokens")] or {}).get("data_version"),
        },
        WEIGHTS: weights,
        "checks": checks,
        "ok": all(c["status"] != MISMATCH for c in checks),
    }


def _records_checks(checks, variant, score, group, records) -> None:
    """Recompute the score's records_hash from neuron_records over the simulated rows (the rows
    scores._score_rows used, in the simulations table's order), and compare the simulated
    sequences with the valid split."""
    from neuron_assets.assets.simulations import valid_split

    truth = {kind: dict(pairs) for kind, pairs in records.items()}
    simulated = group.filter(pl.col("expected").is_not_null())
    if simulated.height == 0:
        _equal(checks, "score_records_hash", score["records_hash"], None, "records_hash", variant)
    else:
        used, missing = [], []
        for split, seq_id in simulated.select("split", "seq_id").iter_rows():
            if seq_id in truth.get(split, {}):
                used.append((seq_id, truth[split][seq_id]))
            else:
                missing.append(f"{split}:{seq_id}")
        if missing:
            _check(checks, "score_records_hash", MISMATCH,
                   f"simulated sequences {missing} are not in neuron_records", variant)
        else:
            _equal(checks, "score_records_hash", score["records_hash"], records_hash(used),
                   "records_hash (stored, recomputed)", variant)
    rows = group.filter(pl.col("seq_id").is_not_null())
    if rows.height == 0:
        _check(checks, "simulated_sequences_are_valid_split", NA, "no sequence was simulated", variant)
        return
    try:
        want = {(split, seq_id) for split, seq_id, _ in valid_split(records)}
    except ValueError as e:
        _check(checks, "simulated_sequences_are_valid_split", MISMATCH, f"neuron_records: {e}", variant)
        return
    have = set(rows.select("split", "seq_id").iter_rows())
    status = OK if have == want else MISMATCH
    _check(checks, "simulated_sequences_are_valid_split", status,
           f"{len(have)} sequences" if status == OK else
           f"simulated {sorted(have - want)} not in the valid split; valid {sorted(want - have)} not simulated",
           variant)


def _explanation_records_check(checks, variant, explanation, records) -> None:
    if explanation["records_hash"] is None:
        _check(checks, "explanation_records_hash", NA, "the explanation has no records_hash", variant)
        return
    try:
        train = split_top(records.get("top", []))["train"]
    except ValueError as e:
        _check(checks, "explanation_records_hash", MISMATCH, f"neuron_records: {e}", variant)
        return
    _equal(checks, "explanation_records_hash", explanation["records_hash"], records_hash(train),
           "records_hash of the train records (stored, recomputed)", variant)


def _column_lineage(record) -> dict[str, list[str]]:
    """{column: ["asset.column", ...]} from the materialization's dagster/column_lineage."""
    value = record and record.asset_materialization.metadata.get("dagster/column_lineage")
    lineage = getattr(value, "value", value)
    if lineage is None or not hasattr(lineage, "deps_by_column"):
        return {}
    return {column: [f"{dep.asset_key.to_user_string()}.{dep.column_name}" for dep in deps]
            for column, deps in lineage.deps_by_column.items()}


# ---------------------------------------------------------------------------------------------
# printing


def _num(x) -> str:
    return "NaN" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _head(name: str, m: dict | None, what: str = "materialization") -> str:
    if m is None:
        return f"{name}: no {what} recorded in this Dagster instance"
    return (f"{name}: run {m['run_id'] or '(none: reported without a run)'}  {m['time']}  data version {m['data_version']}"
            + (f"  code version {m['code_version']}" if m.get("code_version") else ""))


def format_audit(d: dict) -> str:
    """The audit as text: one block per asset, the newest first, then the checks."""
    p, lk = d["partition"], d["layer_key"]
    lines = [f"Lineage of the score of layer {lk} neuron {d['neuron']} (partition {p})", ""]
    lines.append(_head(f"scores[{p}]", d["scores"]["materialization"]))
    for s in d["scores"]["rows"]:
        lines.append(f"  {s['variant']:<15} score_all {_num(s['score_all'])}  score_top {_num(s['score_top'])}  "
                     f"score_random {_num(s['score_random'])}  method {s['method']}  "
                     f"explanation_id {s['explanation_id']}  records_hash {s['records_hash']}"
                     + (f"  error: {s['error']}" if s["error"] else ""))
    lineage = d["scores"].get("column_lineage") or {}
    for column in ("score_all", "explanation"):
        if column in lineage:
            lines.append(f"  column lineage: {column} <- {', '.join(lineage[column])}")
    lines.append(_head(f"simulations[{p}]", d["simulations"]["materialization"]))
    for s in d["simulations"]["variants"]:
        lines.append(f"  {s['variant']:<15} simulator {s['simulator_model']}  method {s['method']}  "
                     f"{s['simulated']}/{s['sequences']} sequences simulated  {s['failed_tokens']} failed tokens"
                     + (f"  errors: {'; '.join(s['errors'])}" if s["errors"] else ""))
    lines.append(_head(f"explanations[{p}]", d["explanations"]["materialization"]))
    for e in d["explanations"]["variants"]:
        text = "(none)" if e["text"] is None else repr(e["text"])
        lines.append(f"  {e['variant']:<15} {text}")
        lines.append(f"  {'':<15} explainer {e['explainer_model']}  prompt version {e['prompt_version']}  "
                     f"cache hit {'yes' if e['cache_hit'] else 'no'}  records_hash {e['records_hash']}  "
                     f"explanation_id {e['explanation_id']}" + (f"  error: {e['error']}" if e["error"] else ""))
    nr = d["neuron_records"]
    lines.append(_head(f"neuron_records[{lk}]", nr["materialization"]))
    lines.append(f"  content hash {nr['content_hash']}  records "
                 + ", ".join(f"{k} {v}" for k, v in nr["records"].items()))
    ct = d["corpus_tokens"]
    lines.append(_head("corpus_tokens", ct["materialization"]))
    if ct["version_used_by_neuron_records"] and ct["version_used_by_neuron_records"] != ct["data_version"]:
        lines.append(f"  neuron_records[{lk}] used version {ct['version_used_by_neuron_records']}")
    w = d[WEIGHTS]
    if w is None:
        lines.append(f"{WEIGHTS}[{lk}]: not observed")
    else:
        lines.append(_head(f"{WEIGHTS}[{lk}]", w, w["kind"]).replace(": run", f": {w['kind']} in run", 1))
        if w["version_used_by_neuron_records"] and w["version_used_by_neuron_records"] != w["data_version"]:
            lines.append(f"  neuron_records[{lk}] used version {w['version_used_by_neuron_records']}")
    lines += ["", "Checks:"]
    for c in d["checks"]:
        name = c["check"] + (f" [{c['variant']}]" if c["variant"] else "")
        lines.append(f"  {c['status']:<9}{name}: {c['detail']}")
    bad = sum(c["status"] == MISMATCH for c in d["checks"])
    lines.append("all checks ok" if not bad else f"{bad} MISMATCH(es)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def locate(defs, settings, layer, neuron) -> tuple[str, str]:
    """(layer key, shard key) of a neuron, from the scores asset's partitions; clear errors for a
    layer or neuron outside the model, outside NEURON_ASSETS_LAYERS, or not selected."""
    from neuron_assets.resources.models import model_shape
    from neuron_assets.resources.study import Study

    shape = model_shape(settings.model, settings.cache)
    try:
        layer, neuron = int(layer), int(neuron)
    except ValueError:
        raise AuditError(f"layer and neuron are numbers, got {layer!r} {neuron!r}") from None
    if not 0 <= layer < shape.n_layers:
        raise AuditError(f"layer {layer} is outside the model, which has layers 0-{shape.n_layers - 1}")
    if not 0 <= neuron < shape.n_neurons:
        raise AuditError(f"neuron {neuron} is outside the model, whose layers have neurons 0-{shape.n_neurons - 1}")
    partitions = defs.resolve_assets_def("scores").partitions_def
    layer_keys = partitions.get_partitions_def_for_dimension("layer").get_partition_keys()
    layer_key = next((k for k in layer_keys if int(k) == layer), None)
    if layer_key is None:
        raise AuditError(f"layer {layer} is not among the layers in force (NEURON_ASSETS_LAYERS={settings.layers})")
    shard_keys = partitions.get_partitions_def_for_dimension("shard").get_partition_keys()
    shard_key = next(k for k in shard_keys if int(k.split("-")[0]) <= neuron <= int(k.split("-")[1]))
    first, last = (int(x) for x in shard_key.split("-"))
    if neuron not in Study(neurons=settings.neurons).selected(range(first, last + 1)):
        raise AuditError(
            f"neuron {neuron} is not selected for explanation (NEURON_ASSETS_NEURONS={settings.neurons}): "
            f"set NEURON_ASSETS_NEURONS to include it and run `dagster asset materialize -m neuron_assets.definitions "
            f"--select explanations,simulations,scores --partition '{layer_key}|{shard_key}'` first"
        )
    return layer_key, shard_key


def _instance():
    from neuron_assets.instance import dagster_home, open_instance

    home = dagster_home(create=False)
    if not home.is_dir():
        raise AuditError(f"no Dagster instance at {home} (DAGSTER_HOME): run `make demo` or "
                         "`neuron-assets demo` first, or set DAGSTER_HOME to the instance that ran the graph")
    return open_instance(create=False)


def add_audit_parser(subparsers) -> None:
    """`neuron-assets audit LAYER NEURON` for cli.main: `add_audit_parser(sub)`; exits 1 on a MISMATCH."""
    p = subparsers.add_parser("audit", help="the lineage of one neuron's score, with consistency checks")
    p.add_argument("layer", type=int, help="layer index, e.g. 0")
    p.add_argument("neuron", type=int, help="neuron index within the layer, e.g. 3")
    p.set_defaults(run=run_audit)


def run_audit(args) -> None:
    """main_audit, then exit status 1 when a check reports MISMATCH."""
    if not main_audit(args)["ok"]:
        raise SystemExit(1)


def main_audit(args, settings=None, instance=None) -> dict:
    """`neuron-assets audit LAYER NEURON`: args.layer, args.neuron (ints or digit strings).
    Prints the audit and returns it; raises AuditError (a ValueError) with what to run first."""
    from neuron_assets.definitions import build_definitions
    from neuron_assets.settings import Settings

    settings = settings or Settings.from_env()
    defs = build_definitions(settings)
    layer_key, shard_key = locate(defs, settings, args.layer, args.neuron)
    instance = instance or _instance()
    result = audit(TableStorage(root=settings.storage), instance, int(args.layer), int(args.neuron), shard_key,
                   layer_key=layer_key)
    print(format_audit(result))
    return result
