"""`neuron-assets audit`: the lineage of a neuron's scores, checked end to end.

`neuron-assets audit LAYER UNIT` walks every ancestor partition of the unit's scores partition
in the Definitions' asset graph (simulations, the explanation tables, neuron_records, the corpus,
the observable sources such as subject_model_weights[layer] and the settings sources, and any asset
added later) and names, for each, the latest materialization (or observation) with its run id,
time, data and code version, and the versions of the observable sources each step read. Then the
consistency checks, each ok / MISMATCH (n/a where a check does not apply):

- per variant of the neuron (llm, token_baseline, revised, imported, and each `<variant>_shuffled`
  control), whose explanation is found among the explanation variants exactly as simulations and
  scores read them (`explanation_variants`): the score row names that explanation (id, text, the
  control's donor neuron), and so does every simulation row; every variant has a score row; a
  revision revises an explanation its neuron has now;
- the score's records_hash is recomputed from neuron_records over the simulated rows, which are
  the valid split; the explanation's records_hash over the records its table hashes (the train
  split for explanations, the held-out split for revised_explanations; a control carries its
  donor's, checked against the donor neuron's records);
- the explanation's prompt_version is part of the code version of the materialization that wrote
  its row, and the row's code_version is that materialization's;
- every table file still hashes to the data version its materialization recorded;
- every step was computed from the upstream version that is current now (the latest upstream
  event of the mapped partition before the step's own materialization has today's data version).

`neuron-assets audit --all [LAYER]` audits every scored neuron of LAYER (or of every layer in force) and
prints one line per neuron with a MISMATCH, then a summary.

`audit()` and `audit_all()` return plain nested dicts; `format_audit()` and `format_audit_all()`
render them; `main_audit(args)` is the CLI.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import polars as pl
from dagster import AssetKey, AssetRecordsFilter

from neuron_assets.assets.common import CONTENT_HASH, PATH
from neuron_assets.graph import parent_partitions
from neuron_assets.method.controls import controlled, is_control
from neuron_assets.method.records import split_top
from neuron_assets.resources.storage import TableStorage
from neuron_assets.runs import layer_keys
from neuron_assets.settings import MLP_UNITS
from neuron_assets.stages.records import records_hash, records_of
from neuron_assets.stages.revise import held_out
from neuron_assets.stages.score import CALIBRATION_ROWS, with_split
from neuron_assets.stages.simulate import simulated_sequences
from neuron_assets.stages.variants import explanation_variants

# The definitions, models and instance are imported where used: the CLI imports this module at start.

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
OK, MISMATCH, NA = "ok", "MISMATCH", "n/a"
MATERIALIZATION, OBSERVATION = "materialization", "observation"
# The tables whose columns the checks read; everything else is found in the asset graph.
ROOT, SIMULATIONS, RECORDS = "scores", "simulations", "neuron_records"
HASH_LENGTH = 16  # hex digits of a TableStorage.write content hash


class AuditError(ValueError):
    """A neuron that cannot be audited, with what to run first (a ValueError: the CLI prints it)."""


# ---------------------------------------------------------------------------------------------
# events in the instance


def _event(instance, asset: str, partition: str | None = None, before: int | None = None,
           kind: str = MATERIALIZATION):
    """The latest materialization (or observation) record of an asset partition, optionally the
    latest one stored before the event with storage id `before`; None when there is none."""
    records_filter = AssetRecordsFilter(AssetKey(asset), asset_partitions=[partition] if partition else None,
                                        before_storage_id=before)
    fetch = instance.fetch_materializations if kind == MATERIALIZATION else instance.fetch_observations
    records = fetch(records_filter, limit=1).records
    return records[0] if records else None


def _latest(instance, node, asset: str, partition: str | None):
    """(record, kind): the latest observation of an observable source asset, the latest
    materialization of any other; the other kind where there is none (weights reported as
    materialized, an asset observed by hand)."""
    observed = node.is_observable and not node.is_materializable
    kinds = (OBSERVATION, MATERIALIZATION) if observed else (MATERIALIZATION, OBSERVATION)
    for kind in kinds:
        record = _event(instance, asset, partition, kind=kind)
        if record is not None:
            return record, kind
    return None, kinds[0]


def _metadata_value(value):
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _describe(record) -> dict | None:
    """An event as plain values: run, time, storage id, data and code version, and whether the
    asset gave its data version (True) or Dagster computed it from code and input versions."""
    if record is None:
        return None
    event = record.asset_materialization or record.asset_observation
    tags = dict(event.tags or {})
    return {
        "run_id": record.run_id,
        "timestamp": record.timestamp,
        "time": datetime.fromtimestamp(record.timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "storage_id": record.storage_id,
        "partition": record.partition_key,
        "data_version": tags.get(DATA_VERSION_TAG),
        "code_version": tags.get(CODE_VERSION_TAG),
        # a run tags the versions Dagster computed with a code version and no user-provided tag;
        # a version reported without a run was given by whoever reported it
        "given_version": tags.get(USER_PROVIDED_TAG) == "true" or CODE_VERSION_TAG not in tags,
        "metadata": {k: _metadata_value(v) for k, v in event.metadata.items()
                     if k in (CONTENT_HASH, PATH, "dagster/row_count")},
    }


def _run(m: dict) -> str:
    return m["run_id"] or "(none: reported without a run)"


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


# ---------------------------------------------------------------------------------------------
# the walk: every ancestor partition of a partition, from the asset graph


def label(asset: str, partition: str | None) -> str:
    """`asset[partition]`, or `asset` for an unpartitioned asset."""
    return f"{asset}[{partition}]" if partition else asset


def walk(graph, asset: str, partition: str | None):
    """(nodes, edges) of every ancestor partition of `asset[partition]` in an AssetGraph: nodes are
    (asset, partition) pairs, the start first, then by their longest distance from it (each after
    everything that reads it), ties by name; edges are (reader, read) pairs."""
    start = (asset, partition)
    found, edges, todo = {start}, [], [start]
    while todo:
        node = todo.pop(0)
        key = AssetKey(node[0])
        for parent in sorted(graph.get(key).parent_keys - {key}, key=lambda k: k.to_user_string()):
            for part in parent_partitions(graph, key, node[1], parent):
                up = (parent.to_user_string(), part)
                edges.append((node, up))
                if up not in found:
                    found.add(up)
                    todo.append(up)
    depth = {start: 0}
    for _ in found:  # longest paths in a DAG: at most len(found) rounds of relaxation
        changed = False
        for down, up in edges:
            if depth[down] + 1 > depth.get(up, -1):
                depth[up], changed = depth[down] + 1, True
        if not changed:
            break
    return sorted(found, key=lambda n: (depth[n], n[0], n[1] or "")), edges


def lineage(graph, storage: TableStorage, instance, asset: str, partition: str | None):
    """(steps, checks) of every ancestor partition of `asset[partition]`: per partition its latest
    event and, per input, the version it used and the current one; the file and provenance checks."""
    nodes, edges = walk(graph, asset, partition)
    records, steps = {}, {}
    for name, part in nodes:
        node = graph.get(AssetKey(name))
        record, kind = _latest(instance, node, name, part)
        records[(name, part)] = record
        steps[(name, part)] = {
            "asset": name, "partition": part, "label": label(name, part), "group": node.group_name, "kind": kind,
            "observable": node.is_observable and not node.is_materializable, "event": _describe(record), "inputs": [],
        }
    checks: list[dict] = []
    for node in nodes:
        _file_check(checks, storage, steps[node])
    for down, up in edges:
        steps[down]["inputs"].append(_provenance_check(checks, instance, steps[down], records[down], steps[up]))
    return [steps[node] for node in nodes], checks


def _provenance_check(checks, instance, down: dict, down_record, up: dict) -> dict:
    """Check "<down>_uses_current_<up>": was `down` computed from the upstream version that is
    current now? The version used is the one of the latest upstream event stored before the
    downstream materialization (Dagster's own provenance tags hash a partitioned input over its
    partitions, so they do not name one partition's version). Returns the input as plain values."""
    check = f"{down['asset']}_uses_current_{up['asset']}"
    now, where = up["event"], up["label"]
    used = down_record and _describe(_event(instance, up["asset"], up["partition"], before=down_record.storage_id,
                                            kind=up["kind"]))
    entry = {"asset": up["asset"], "partition": up["partition"], "label": where, "observable": up["observable"],
             "used": used["data_version"] if used else None, "current": now["data_version"] if now else None}
    if down_record is None:
        _check(checks, check, NA, f"{down['label']} has no {down['kind']} in this instance")
    elif used is None:
        detail = (f"{where} has no {up['kind']}" if now is None
                  else f"{where} was first recorded after {down['label']} was materialized")
        _check(checks, check, NA, detail)
    elif used["data_version"] == now["data_version"]:
        _check(checks, check, OK, f"{where} version {used['data_version']} (run {_run(used)})")
    else:
        _check(checks, check, MISMATCH,
               f"{down['label']} was computed from {where} version {used['data_version']} (run {_run(used)}); "
               f"it is now {now['data_version']} (run {_run(now)}): rematerialize {down['label']}")
    return entry


# ---------------------------------------------------------------------------------------------
# table files against the versions their materializations recorded


def _file_hash(path) -> str:
    """The content hash TableStorage.write returned for this file (sha256 of the Parquet bytes)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:HASH_LENGTH]


def _file_check(checks, storage: TableStorage, step: dict) -> None:
    """Check "<asset>_file_matches_materialization" of a materialized partition (observations
    record no file). The two rules this project's assets follow, and only here:

    - a materialization with `content hash` metadata (a partition of several tables, such as
      neuron_records' records and stats, activations._store_layer) recorded its tables' hashes
      concatenated: each table file of the partition must hash to one of them, and each of them
      must be a file's hash;
    - otherwise the partition's `data` table hashes to the data version the asset gave for it.
    """
    if step["kind"] != MATERIALIZATION:
        return
    check, m = f"{step['asset']}_file_matches_materialization", step["event"]
    data = storage.path(step["asset"], step["partition"])
    if m is None:
        _check(checks, check, NA, f"{step['label']} has no materialization in this instance")
    elif m["metadata"].get(CONTENT_HASH):
        _check(checks, check, *_content_hash_status(data.parent, step["label"], m["metadata"][CONTENT_HASH]))
    elif not storage.exists(step["asset"], step["partition"]):
        recorded = str(m["metadata"].get(PATH) or "")
        relative = "/".join([step["asset"], *(step["partition"].split("|") if step["partition"] else []), data.name])
        if recorded.endswith(relative):  # the materialization wrote this very table: it has gone since
            _check(checks, check, MISMATCH, f"{step['label']}: the table file {data} is missing")
        else:
            _check(checks, check, NA, f"{step['label']} has no `data` table in TableStorage")
    elif not m["given_version"]:
        _check(checks, check, NA, f"{step['label']}: its data version was computed by Dagster, not a file hash")
    elif (on_disk := _file_hash(data)) == m["data_version"]:
        _check(checks, check, OK, f"{step['label']}: the file hashes to the recorded version {on_disk}")
    else:
        _check(checks, check, MISMATCH, f"{step['label']}: the file hashes to {on_disk}, the materialization "
                                        f"recorded {m['data_version']} (the file was changed outside Dagster)")


def _content_hash_status(folder, where: str, recorded: str) -> tuple[str, str]:
    """(status, detail) of the `content hash` rule for the table files of a partition folder."""
    recorded_hashes = sorted(recorded[i:i + HASH_LENGTH] for i in range(0, len(recorded), HASH_LENGTH))
    tables = {path.stem: _file_hash(path) for path in sorted(folder.glob("*.parquet"))}
    if sorted(tables.values()) == recorded_hashes:
        return OK, f"{where}: the tables {', '.join(tables)} hash to the recorded content hash {recorded}"
    changed = [f"{table} hashes to {h}" for table, h in tables.items() if h not in recorded_hashes]
    why = "; ".join(changed) or f"{len(tables)} table file(s) for {len(recorded_hashes)} recorded table hashes"
    return MISMATCH, (f"{where}: {why}, the materialization recorded the content hash {recorded} "
                      "(a table was changed or removed outside Dagster)")


# ---------------------------------------------------------------------------------------------
# the tables of a scores partition


def _read(storage: TableStorage, asset: str, partition: str, table: str = "data") -> pl.DataFrame:
    if not storage.exists(asset, partition, table):
        raise AuditError(
            f"{asset} has no {table} table for partition {partition} under {storage.root}: run "
            f"`dagster asset materialize -m neuron_assets.definitions --select {asset} "
            f"--partition '{partition}'` (or `neuron-assets demo`) first"
        )
    return storage.read(asset, partition, table)


def explanation_sources(graph, partition: str, read) -> list[str]:
    """The explanation assets simulations read, as the graph has them: its parents that share its
    layer x shard partitions and whose table has an explanation_id column (explanations,
    revised_explanations, imported_explanations, as the settings turn them on). `read(asset,
    partition)` reads a table (e.g. `storage.read`)."""
    simulations = graph.get(AssetKey(SIMULATIONS))
    out = []
    for parent in sorted(simulations.parent_keys, key=lambda k: k.to_user_string()):
        name = parent.to_user_string()
        if graph.get(parent).partitions_def == simulations.partitions_def and \
                "explanation_id" in read(name, partition).columns:
            out.append(name)
    return out


class _Session:
    """What the audits of one instance share: the asset graph, the tables read, and each scores
    partition's lineage, walked and checked once however many of its neurons are audited."""

    def __init__(self, storage: TableStorage, instance, defs, settings):
        self.storage, self.instance, self.settings = storage, instance, settings
        self.graph = defs.resolve_asset_graph()
        self._cache: dict = {}

    def _cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def table(self, asset: str, partition: str, table: str = "data") -> pl.DataFrame:
        return self._cached(("table", asset, partition, table), lambda: _read(self.storage, asset, partition, table))

    def lineage(self, partition: str):
        return self._cached(("lineage", partition),
                            lambda: lineage(self.graph, self.storage, self.instance, ROOT, partition))

    def sources(self, partition: str) -> list[str]:
        return self._cached(("sources", partition), lambda: explanation_sources(self.graph, partition, self.table))

    def variants(self, partition: str) -> pl.DataFrame:
        """The explanations of the partition exactly as simulations and scores read them, with the
        table each row's explanation lives in (`source`; a control's is its donor's row's)."""
        return self._cached(("variants", partition), lambda: self._variants(partition))

    def _variants(self, partition: str) -> pl.DataFrame:
        sources = self.sources(partition)  # each table read already: a missing one is a clear AuditError
        rows = explanation_variants([self.table(source, partition) for source in sources], partition,
                                    self.settings.seed, self.settings.control == "shuffled")
        held = {(n, v): source for source in sources
                for n, v in self.table(source, partition).select("unit", "variant").iter_rows()}
        source = [held.get((neuron if donor is None else donor, controlled(v) if is_control(v) else v))
                  for neuron, donor, v in rows.select("unit", "donor_unit", "variant").iter_rows()]
        return rows.with_columns(source=pl.Series(source, dtype=pl.String))

    def records(self, layer_key: str, partition: str) -> dict:
        """{neuron: {kind: [(seq_id, activations)]}} of the scored neurons of a partition (donors
        are scored neurons of the same shard)."""
        def compute():
            table = self.table(RECORDS, layer_key, "records")
            return records_of(table, sorted(set(self.table(ROOT, partition)["unit"].to_list())))
        return self._cached(("records", partition), compute)

    def column_lineage(self, partition: str) -> dict[str, list[str]]:
        return self._cached(("column_lineage", partition),
                            lambda: _column_lineage(_event(self.instance, ROOT, partition)))


def _column_lineage(record) -> dict[str, list[str]]:
    """{column: ["asset.column", ...]} from the materialization's dagster/column_lineage."""
    value = record and record.asset_materialization.metadata.get("dagster/column_lineage")
    lineage = getattr(value, "value", value)
    if lineage is None or not hasattr(lineage, "deps_by_column"):
        return {}
    return {column: [f"{dep.asset_key.to_user_string()}.{dep.column_name}" for dep in deps]
            for column, deps in lineage.deps_by_column.items()}


# ---------------------------------------------------------------------------------------------
# one neuron's checks


def _train_records(kinds: dict) -> list:
    return split_top(kinds.get("top", []))["train"]


# The records an explanation table's records_hash covers (as the asset that writes the table
# computes it); a table without a rule here (imported_explanations: written elsewhere) is n/a.
HASHED_RECORDS = {"explanations": ("train records", _train_records),
                  "revised_explanations": ("held-out records", held_out)}
# The tables whose prompt_version is a part of their asset's code version ("2-<prompt>",
# "1-<revision prompt>-<simulator prompt>"); imported rows carry the imported file's digest there.
PROMPT_IN_CODE_VERSION = ("explanations", "revised_explanations")


def _none_if_nan(x):
    return None if isinstance(x, float) and not np.isfinite(x) else x


def _score_checks(checks, score_rows: pl.DataFrame, sims: pl.DataFrame, explained: pl.DataFrame, records: dict,
                  neuron: int) -> None:
    """Per score row: it names the explanation its variant has among the explanation variants
    (id, text, donor), so does every simulation row, and its records hash is the simulated rows'."""
    by_variant = {row["variant"]: row for row in explained.iter_rows(named=True)}
    for score in score_rows.iter_rows(named=True):
        variant = score["variant"]
        e = by_variant.get(variant)
        _equal(checks, "score_explanation_id", score["explanation_id"],
               e["explanation_id"] if e else "(no explanation row)", "explanation_id", variant)
        if e is not None:
            _text_check(checks, variant, score.get("explanation"), e["text"])
        if is_control(variant):
            _donor_check(checks, variant, score.get("donor_unit"), e and e["donor_unit"], neuron)
        group = sims.filter(pl.col("variant") == variant)
        _simulation_id_check(checks, variant, group, e["explanation_id"] if e else None)
        _records_checks(checks, variant, score, group, records.get(neuron, {}))
    for variant in sorted(set(by_variant) - set(score_rows["variant"].to_list())):
        _check(checks, "variant_is_scored", MISMATCH, f"the explanation variants hold a {variant} explanation "
               f"({by_variant[variant]['explanation_id']}) that scores have no row for: rematerialize simulations "
               "and scores", variant)


def _text_check(checks, variant: str, stored: str | None, text: str | None) -> None:
    if stored == text:
        status = OK if text is not None else NA
        _check(checks, "score_explanation_text", status, "the explanation's text" if text is not None
               else "no text on either side (the explanation has an error)", variant)
    else:
        _check(checks, "score_explanation_text", MISMATCH,
               f"the score row's explanation {stored!r} != the explanation's {text!r}", variant)


def _donor_check(checks, variant: str, stored, donor, neuron: int) -> None:
    if donor is not None and donor == neuron:
        _check(checks, "score_donor_unit", MISMATCH, "the control gives the neuron its own explanation", variant)
    else:
        _equal(checks, "score_donor_unit", stored, donor, "donor neuron (score row, explanation variants)", variant)


def _simulation_id_check(checks, variant: str, group: pl.DataFrame, expected_id: str | None) -> None:
    ids = sorted(set(group["explanation_id"].to_list()), key=str)
    if not ids:
        _check(checks, "simulation_explanation_id", MISMATCH, "no simulation rows", variant)
    elif ids == [expected_id]:
        _check(checks, "simulation_explanation_id", OK, f"{group.height} rows, explanation_id {expected_id}", variant)
    else:
        _check(checks, "simulation_explanation_id", MISMATCH,
               f"simulation rows name {ids}, the explanation row {expected_id}", variant)


def _records_checks(checks, variant, score, group, records) -> None:
    """Recompute the score's records_hash from neuron_records over the simulated rows of the valid
    split (the rows the score stage used, in the simulations table's order), and compare the
    simulated sequences with the splits the simulate stage simulates."""
    truth = {kind: dict(pairs) for kind, pairs in records.items()}
    valid = group.filter(pl.col("split") == "valid") if "split" in group.columns else group
    simulated = valid.filter(pl.col("expected").is_not_null())
    if simulated.height == 0:
        _equal(checks, "score_records_hash", score["records_hash"], None, "records_hash", variant)
    else:
        used, missing = [], []
        for kind, seq_id in simulated.select("kind", "seq_id").iter_rows():
            if seq_id in truth.get(kind, {}):
                used.append((seq_id, truth[kind][seq_id]))
            else:
                missing.append(f"{kind}:{seq_id}")
        if missing:
            _check(checks, "score_records_hash", MISMATCH,
                   f"simulated sequences {missing} are not in neuron_records", variant)
        else:
            _equal(checks, "score_records_hash", score["records_hash"], records_hash(used),
                   "records_hash (stored, recomputed)", variant)
    rows = group.filter(pl.col("seq_id").is_not_null())
    if rows.height == 0:
        _check(checks, "simulated_sequences_are_splits", NA, "no sequence was simulated", variant)
        return
    try:
        want = set(simulated_sequences(records, calibrate=not is_control(variant)))
    except ValueError as e:
        _check(checks, "simulated_sequences_are_splits", MISMATCH, f"neuron_records: {e}", variant)
        return
    have = set(rows.select("split", "kind", "seq_id").iter_rows()) if "split" in rows.columns else set()
    status = OK if have == want else MISMATCH
    _check(checks, "simulated_sequences_are_splits", status,
           f"{len(have)} sequences" if status == OK else
           f"simulated {sorted(have - want)} not in the splits; {sorted(want - have)} not simulated",
           variant)


def _explanation_checks(checks, e: dict, records: dict, step: dict | None, table: pl.DataFrame | None,
                        own_ids: set) -> None:
    """The explanation row against the records it hashes and the materialization that wrote its
    table (`step`; for a control, its donor's row and table)."""
    _explanation_records_check(checks, e, records.get(e["owner"], {}))
    _prompt_check(checks, e, step)
    code = step and step["event"] and step["event"]["code_version"]
    if code is None or e["code_version"] is None:
        _check(checks, "explanation_code_version_matches_materialization", NA,
               f"{e['source'] or 'its table'} has no materialization, or the row no code_version", e["variant"])
    else:
        _equal(checks, "explanation_code_version_matches_materialization", e["code_version"], code,
               f"code version (row, {step['label']})", e["variant"])
    if table is not None and "revised_from" in table.columns:
        _revision_check(checks, e, table, own_ids)


def _explanation_records_check(checks, e: dict, kinds: dict) -> None:
    variant, rule = e["variant"], HASHED_RECORDS.get(e["source"])
    whose = f"the donor neuron {e['owner']}'s" if e["donor_unit"] is not None else "the neuron's"
    if e["records_hash"] is None:
        _check(checks, "explanation_records_hash", NA, "the explanation has no records_hash", variant)
    elif rule is None:
        _check(checks, "explanation_records_hash", NA, f"{e['source']} rows hash no records of neuron_records", variant)
    else:
        what, pick = rule
        try:
            hashed = records_hash(pick(kinds))
        except ValueError as error:
            _check(checks, "explanation_records_hash", MISMATCH, f"neuron_records: {error}", variant)
            return
        _equal(checks, "explanation_records_hash", e["records_hash"], hashed,
               f"records_hash of {whose} {what} (stored, recomputed)", variant)


def _prompt_check(checks, e: dict, step: dict | None) -> None:
    check, variant = "prompt_version_matches_code_version", e["variant"]
    code = step and step["event"] and step["event"]["code_version"]
    if e["source"] not in PROMPT_IN_CODE_VERSION:
        _check(checks, check, NA, f"{e['source'] or 'its table'} rows carry no prompt version of ours", variant)
    elif code is None:
        _check(checks, check, NA, f"{e['source']} has no materialization of this partition", variant)
    elif e["prompt_version"] and e["prompt_version"] in code.split("-")[1:]:
        _check(checks, check, OK, f"prompt {e['prompt_version']}, {step['label']} code version {code}", variant)
    else:
        _check(checks, check, MISMATCH, f"prompt {e['prompt_version']}, {step['label']} code version {code}",
               variant)


def _revision_check(checks, e: dict, table: pl.DataFrame, own_ids: set) -> None:
    """A revision (a row with revised_from) revises an explanation its neuron has now."""
    row = table.filter((pl.col("unit") == e["owner"]) & (pl.col("variant") == e["base"]))
    revised_from = row["revised_from"][0] if row.height else None
    if revised_from is None:
        _check(checks, "revised_from_current_explanation", NA, "the row names no revised explanation", e["variant"])
    elif revised_from in own_ids:
        _check(checks, "revised_from_current_explanation", OK, f"revises explanation {revised_from}", e["variant"])
    else:
        _check(checks, "revised_from_current_explanation", MISMATCH,
               f"revises explanation {revised_from}, which neuron {e['owner']} no longer has: rematerialize "
               f"{e['source']}", e["variant"])


# ---------------------------------------------------------------------------------------------
# one neuron's audit


EXPLANATION_FIELDS = ("variant", "text", "explainer_model", "prompt_version", "cache_hit", "records_hash",
                      "explanation_id", "code_version", "donor_unit", "source", "error")
SCORE_FIELDS = ("variant", "score_all", "score_top", "score_random", "rsquared", "abs_dev_explained", "method",
                "simulator_model", "n_failed_tokens", "explanation_id", "records_hash", "donor_unit", "error")


def _explanation_entry(row: dict, partition: str) -> dict:
    """An explanation variant as plain values, with where it came from (`origin`)."""
    e = {k: row.get(k) for k in EXPLANATION_FIELDS}
    control = is_control(e["variant"])
    e["base"] = controlled(e["variant"]) if control else e["variant"]
    e["owner"] = row["unit"] if e["donor_unit"] is None else e["donor_unit"]
    table = label(e["source"], partition) if e["source"] else "(no table holds it)"
    if not control:
        e["origin"] = table
    elif e["donor_unit"] is None:
        e["origin"] = f"control of {e['base']}, no donor ({e['error']})"
    else:
        e["origin"] = f"control of {e['base']}, donor neuron {e['donor_unit']} ({table})"
    return e


def _simulation_summary(sims: pl.DataFrame) -> list[dict]:
    out = []
    for (variant,), group in with_split(sims).group_by("variant", maintain_order=True):
        valid = group.filter(~CALIBRATION_ROWS)
        simulated = valid.filter(pl.col("expected").is_not_null())
        out.append({
            "variant": variant,
            "simulator_model": group["simulator_model"][0],
            "method": ", ".join(sorted(set(group["method"].drop_nulls().to_list()))),
            "sequences": valid.height,
            "simulated": simulated.height,
            "calibration_sequences": group.height - valid.height,
            "failed_tokens": int(group["n_failed_tokens"].sum()),
            "explanation_ids": sorted(set(group["explanation_id"].drop_nulls().to_list())),
            "errors": sorted(set(group["error"].drop_nulls().to_list())),
        })
    return sorted(out, key=lambda s: s["variant"])


def _audit_neuron(session: _Session, layer_key: str, shard_key: str, neuron: int) -> dict:
    """The audit of one neuron of a scores partition (see `audit`)."""
    partition = f"{layer_key}|{shard_key}"
    scores = session.table(ROOT, partition)
    score_rows = scores.filter(pl.col("unit") == neuron).sort("variant")
    if score_rows.height == 0:
        raise AuditError(
            f"layer {layer_key} neuron {neuron} has no score in scores[{partition}] (scored there: "
            f"{sorted(set(scores['unit'].to_list())) or 'none'}): select it with NEURON_ASSETS_NEURONS and run "
            f"`dagster asset materialize -m neuron_assets.definitions --select explanations,simulations,scores "
            f"--partition '{partition}'` first"
        )
    sims = session.table(SIMULATIONS, partition).filter(pl.col("unit") == neuron)
    variants = session.variants(partition)
    explained = variants.filter(pl.col("unit") == neuron).sort("variant")
    records = session.records(layer_key, partition)
    steps, lineage_checks = session.lineage(partition)
    step_of = {(s["asset"], s["partition"]): s for s in steps}

    checks: list[dict] = []
    _score_checks(checks, score_rows, sims, explained, records, neuron)
    entries = [_explanation_entry(row, partition) for row in explained.iter_rows(named=True)]
    for e in entries:
        own = variants.filter((pl.col("unit") == e["owner"]) & pl.col("donor_unit").is_null())
        _explanation_checks(checks, e, records, step_of.get((e["source"], partition)),
                            session.table(e["source"], partition) if e["source"] else None,
                            set(own["explanation_id"].to_list()))
    return {
        "layer": int(layer_key),
        "layer_key": layer_key,
        "unit": int(neuron),
        "shard": shard_key,
        "partition": partition,
        "scores": {"rows": [{k: _none_if_nan(row.get(k)) for k in SCORE_FIELDS}
                            for row in score_rows.iter_rows(named=True)],
                   "column_lineage": session.column_lineage(partition)},
        "simulations": {"variants": _simulation_summary(sims)},
        "explanations": {"sources": session.sources(partition), "variants": entries},
        "neuron_records": {"partition": layer_key,
                           "records": {kind: len(v) for kind, v in sorted(records.get(neuron, {}).items())}},
        "lineage": steps,
        "checks": checks + lineage_checks,
        "ok": all(c["status"] != MISMATCH for c in checks + lineage_checks),
    }


def audit(storage: TableStorage, instance, layer: int, neuron: int, shard_key: str, *, settings,
          defs=None, layer_key: str | None = None) -> dict:
    """The lineage of neuron `neuron` of layer `layer`, whose scores live in partition
    `layer_key|shard_key` (`layer_key` defaults to the layer zero-padded to 2 digits), as plain
    dicts: scores, simulations and explanations of each variant, the lineage steps (every ancestor
    partition, newest first) and the checks. `settings` give the seed and the controls the
    explanation variants were built with; `defs` (default: `build_definitions(settings)`) the graph."""
    if defs is None:
        from neuron_assets.definitions import build_definitions

        defs = build_definitions(settings)
    from neuron_assets.definitions import subject_model_of

    session = _Session(storage, instance, defs, settings)
    result = _audit_neuron(session, layer_key or f"{int(layer):02d}", shard_key, int(neuron))
    # what the layer's units read, under the settings in force: 'mlp' or the coder's hookpoint
    result["hookpoint"] = subject_model_of(settings).unit_shape().hookpoints.get(int(layer), MLP_UNITS)
    return result


def find_step(result: dict, asset: str, partition: str | None = None) -> dict | None:
    """The lineage step of `asset[partition]` in an audit, None when the walk did not reach it."""
    return next((s for s in result["lineage"] if s["asset"] == asset and s["partition"] == partition), None)


# ---------------------------------------------------------------------------------------------
# every scored neuron


def _scored_partitions(defs, storage: TableStorage, keys: list[str]) -> list[tuple[str, str]]:
    """(layer key, shard key) of every scores partition of `keys` with a table."""
    shards = defs.resolve_assets_def(ROOT).partitions_def.get_partitions_def_for_dimension("shard")
    return [(lk, sk) for lk in keys for sk in shards.get_partition_keys()
            if storage.exists(ROOT, f"{lk}|{sk}")]


def audit_all(storage: TableStorage, instance, settings, *, defs=None, layer: int | None = None) -> dict:
    """Every scored unit (a score row in any scores partition) of `layer`, or of every layer in
    force: {"units": [{layer_key, shard, unit, ok, checks, mismatches}], "layers", "shards",
    "n_ok", "n_mismatch", "checks" (checks run, over all units), "ok"}. A unit that cannot be
    audited (a table gone) counts as a mismatch."""
    if defs is None:
        from neuron_assets.definitions import build_definitions

        defs = build_definitions(settings)
    keys = [layer_key_of(defs, settings, layer)] if layer is not None else layer_keys(defs)
    session = _Session(storage, instance, defs, settings)
    neurons = []
    for layer_key, shard_key in _scored_partitions(defs, storage, keys):
        for neuron in sorted(set(session.table(ROOT, f"{layer_key}|{shard_key}")["unit"].to_list())):
            neurons.append(_summary(session, layer_key, shard_key, neuron))
    if not neurons:
        where = f"layer {keys[0]}" if layer is not None else "any layer"
        raise AuditError(f"no scored unit in {where} under {storage.root}: run `neuron-assets demo` or "
                         "`neuron-assets refresh --missing` first")
    bad = sum(not n["ok"] for n in neurons)
    return {"units": neurons, "layers": sorted({n["layer_key"] for n in neurons}),
            "shards": sorted({n["shard"] for n in neurons}), "n_ok": len(neurons) - bad, "n_mismatch": bad,
            "checks": sum(n["checks"] for n in neurons), "ok": bad == 0}


def _summary(session: _Session, layer_key: str, shard_key: str, neuron: int) -> dict:
    """One neuron's audit reduced to its verdict and its MISMATCH checks."""
    out = {"layer_key": layer_key, "shard": shard_key, "unit": neuron}
    try:
        result = _audit_neuron(session, layer_key, shard_key, neuron)
    except AuditError as e:
        return {**out, "ok": False, "checks": 0,
                "mismatches": [{"check": "auditable", "variant": None, "status": MISMATCH, "detail": str(e)}]}
    return {**out, "ok": result["ok"], "checks": len(result["checks"]),
            "mismatches": [c for c in result["checks"] if c["status"] == MISMATCH]}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_audit_all(d: dict) -> str:
    """One line per neuron with a MISMATCH (its checks), then the summary line."""
    lines = []
    for n in d["units"]:
        if not n["ok"]:
            names = ", ".join(c["check"] + (f" [{c['variant']}]" if c["variant"] else "") for c in n["mismatches"])
            where = label(ROOT, f"{n['layer_key']}|{n['shard']}")
            lines.append(f"MISMATCH layer {n['layer_key']} unit {n['unit']} ({where}): {names}")
    if lines:
        lines.append("(`neuron-assets audit LAYER UNIT` shows a unit's checks in full)")
    lines.append(f"audited {_plural(len(d['units']), 'unit')} in {_plural(len(d['layers']), 'layer')} x "
                 f"{_plural(len(d['shards']), 'shard')}: {d['n_ok']} ok, {d['n_mismatch']} with a mismatch "
                 f"({d['checks']} checks)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# printing


def _num(x) -> str:
    return "NaN" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _head(step: dict) -> str:
    m = step["event"]
    if m is None:
        return f"{step['label']}: no {step['kind']} recorded in this Dagster instance"
    kind = "observation in " if step["kind"] == OBSERVATION else ""
    return (f"{step['label']}: {kind}run {_run(m)}  {m['time']}  data version {m['data_version']}"
            + (f"  code version {m['code_version']}" if m.get("code_version") else ""))


def _format_step(step: dict, steps: list[dict]) -> list[str]:
    """A lineage step: its event, the source versions it read, and the readers that used an
    older version of it than the current one."""
    lines = ["  " + _head(step)]
    sources = [i for i in step["inputs"] if i["observable"]]
    if sources:
        lines.append("      sources used: " + ", ".join(f"{i['label']} version {i['used'] or '(none recorded before)'}"
                                                  for i in sources))
    if step["event"] and step["event"]["metadata"].get(CONTENT_HASH):
        lines.append(f"      content hash {step['event']['metadata'][CONTENT_HASH]}")
    for reader in steps:
        for i in reader["inputs"]:
            if i["label"] == step["label"] and i["used"] and i["used"] != i["current"]:
                lines.append(f"      {reader['label']} used version {i['used']}")
    return lines


def _format_scores(d: dict) -> list[str]:
    lines = [f"Scores (scores[{d['partition']}]):"]
    for s in d["scores"]["rows"]:
        lines.append(f"  {s['variant']:<24} score_all {_num(s['score_all'])}  score_top {_num(s['score_top'])}  "
                     f"score_random {_num(s['score_random'])}  method {s['method']}  "
                     f"explanation_id {s['explanation_id']}  records_hash {s['records_hash']}"
                     + (f"  error: {s['error']}" if s["error"] else ""))
    lineage = d["scores"].get("column_lineage") or {}
    for column in ("score_all", "explanation"):
        if column in lineage:
            lines.append(f"  column lineage: {column} <- {', '.join(lineage[column])}")
    lines.append(f"Simulations (simulations[{d['partition']}]):")
    for s in d["simulations"]["variants"]:
        lines.append(f"  {s['variant']:<24} simulator {s['simulator_model']}  method {s['method']}  "
                     f"{s['simulated']}/{s['sequences']} scored sequences simulated (+{s['calibration_sequences']} calibration)  "
                     f"{s['failed_tokens']} failed tokens"
                     + (f"  errors: {'; '.join(s['errors'])}" if s["errors"] else ""))
    return lines


def _format_explanations(d: dict) -> list[str]:
    lines = [f"Explanations, as simulations and scores read them (from {', '.join(d['explanations']['sources'])}):"]
    for e in d["explanations"]["variants"]:
        text = "(none)" if e["text"] is None else repr(e["text"])
        lines.append(f"  {e['variant']:<24} from {e['origin']}")
        lines.append(f"  {'':<24} {text}")
        lines.append(f"  {'':<24} explainer {e['explainer_model']}  prompt version {e['prompt_version']}  "
                     f"cache hit {'yes' if e['cache_hit'] else 'no'}  records_hash {e['records_hash']}  "
                     f"explanation_id {e['explanation_id']}" + (f"  error: {e['error']}" if e["error"] else ""))
    nr = d["neuron_records"]
    lines.append(f"Records (neuron_records[{nr['partition']}]): "
                 + (", ".join(f"{k} {v}" for k, v in nr["records"].items()) or "none"))
    return lines


def format_audit(d: dict) -> str:
    """The audit as text: the neuron's scores, simulations and explanations per variant, the
    lineage (every ancestor partition, newest first), then the checks."""
    lines = [f"Lineage of the scores of layer {d['layer_key']} ({d['hookpoint']}) unit {d['unit']} "
             f"(partition {d['partition']})", ""]
    lines += _format_scores(d) + _format_explanations(d)
    lines += ["", f"Lineage of scores[{d['partition']}]: every partition it was computed from, newest first"]
    for step in d["lineage"]:
        lines += _format_step(step, d["lineage"])
    lines += ["", "Checks:"]
    for c in d["checks"]:
        name = c["check"] + (f" [{c['variant']}]" if c["variant"] else "")
        lines.append(f"  {c['status']:<9}{name}: {c['detail']}")
    bad = sum(c["status"] == MISMATCH for c in d["checks"])
    lines.append("all checks ok" if not bad else f"{bad} MISMATCH(es)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def layer_key_of(defs, settings, layer) -> str:
    """The layer key of a layer number; a clear error for a layer outside the model or outside
    NEURON_ASSETS_LAYERS."""
    from neuron_assets.definitions import subject_model_of

    shape = subject_model_of(settings).unit_shape()
    try:
        layer = int(layer)
    except ValueError:
        raise AuditError(f"a layer is a number, got {layer!r}") from None
    if not 0 <= layer < shape.n_layers:
        raise AuditError(f"layer {layer} is outside the model, which has layers 0-{shape.n_layers - 1}")
    layer_key = next((k for k in layer_keys(defs) if int(k) == layer), None)
    if layer_key is None:
        raise AuditError(f"layer {layer} is not among the layers in force (NEURON_ASSETS_LAYERS={settings.layers}, "
                         f"NEURON_ASSETS_UNITS={settings.units})")
    return layer_key


def locate(defs, settings, layer, neuron) -> tuple[str, str]:
    """(layer key, shard key) of a neuron, from the scores asset's partitions; clear errors for a
    layer or neuron outside the model, outside NEURON_ASSETS_LAYERS, or not selected."""
    from neuron_assets.resources.study import Study
    from neuron_assets.settings import NeuronSelection

    try:
        layer, neuron = int(layer), int(neuron)
    except ValueError:
        raise AuditError(f"layer and neuron are numbers, got {layer!r} {neuron!r}") from None
    layer_key = layer_key_of(defs, settings, layer)
    partitions = defs.resolve_assets_def(ROOT).partitions_def
    shard_keys = partitions.get_partitions_def_for_dimension("shard").get_partition_keys()
    n_units = int(shard_keys[-1].split("-")[1]) + 1
    if not 0 <= neuron < n_units:
        raise AuditError(f"unit {neuron} is outside layer {layer_key}, whose units are 0-{n_units - 1}")
    shard_key = next(k for k in shard_keys if int(k.split("-")[0]) <= neuron <= int(k.split("-")[1]))
    first, last = (int(x) for x in shard_key.split("-"))
    # 'top:N:<statistic>' ranks by the layer's stats; the other selections need none
    stats = (_read(TableStorage(root=settings.storage), "neuron_records", layer_key, "stats")
             if NeuronSelection.parse(settings.neurons).mode == "top" else None)
    if neuron not in Study(neurons=settings.neurons).selected(range(first, last + 1), stats):
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


USAGE = "`neuron-assets audit LAYER UNIT` (one unit) or `neuron-assets audit --all [LAYER]` (every scored unit)"


def add_audit_parser(subparsers) -> None:
    """`neuron-assets audit LAYER UNIT` and `neuron-assets audit --all [LAYER]` for cli.main:
    `add_audit_parser(sub)`; both exit 1 on a MISMATCH."""
    p = subparsers.add_parser("audit", help="the lineage of a neuron's scores, with consistency checks",
                              description=f"{USAGE}; exits 1 on a MISMATCH")
    p.add_argument("layer", type=int, nargs="?", help="layer index, e.g. 0 (with --all: only this layer)")
    p.add_argument("unit", type=int, nargs="?", help="unit index within the layer (an MLP neuron or a coder's latent), e.g. 3 (not with --all)")
    p.add_argument("--all", action="store_true", dest="all",
                   help="audit every scored neuron (of LAYER, or of every layer): one line per neuron with a "
                        "MISMATCH, then a summary")
    p.set_defaults(run=run_audit)


def run_audit(args, settings=None, instance=None) -> None:
    """main_audit, then exit status 1 when a check reports MISMATCH (cli.main calls it with the
    parsed arguments; settings and instance default to the environment's)."""
    if not main_audit(args, settings=settings, instance=instance)["ok"]:
        raise SystemExit(1)


def main_audit(args, settings=None, instance=None) -> dict:
    """`neuron-assets audit`: args.layer, args.unit (ints or digit strings, or None) and
    args.all (absent: False). Prints the audit (or, with --all, the summary) and returns it;
    raises AuditError (a ValueError) for a wrong call or with what to run first."""
    from neuron_assets.settings import Settings

    settings = settings or Settings.from_env()  # bad settings fail before the definitions load
    from neuron_assets.definitions import build_definitions

    every = getattr(args, "all", False)
    if every and args.unit is not None:
        raise AuditError(f"--all takes at most a LAYER, not a unit: {USAGE}")
    if not every and (args.layer is None or args.unit is None):
        raise AuditError(f"audit takes a LAYER and a UNIT: {USAGE}")
    defs = build_definitions(settings)
    storage = TableStorage(root=settings.storage)
    if every:
        if args.layer is not None:
            layer_key_of(defs, settings, args.layer)  # a wrong layer fails before the instance is opened
        result = audit_all(storage, instance or _instance(), settings, defs=defs, layer=args.layer)
        print(format_audit_all(result))
        return result
    layer_key, shard_key = locate(defs, settings, args.layer, args.unit)
    result = audit(storage, instance or _instance(), int(args.layer), int(args.unit), shard_key,
                   settings=settings, defs=defs, layer_key=layer_key)
    print(format_audit(result))
    return result
