"""detection_scores[layer|shard]: can a judge LLM tell, from the explanation alone, which whole
excerpts make the neuron fire (detection) and which highlighted tokens it fires on (fuzzing)?"""

from collections import Counter

import numpy as np
import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from neuron_assets.assets.common import (
    OWNERS,
    layer_and_shard,
    markdown_table,
    percentiles,
)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.assets.explanations import explanation_variants
from neuron_assets.automation import ON_CHANGE
from neuron_assets.method.detection import (
    batch_messages,
    batches,
    detection_examples,
    fuzzing_examples,
    read_answer,
    scores_from_answers,
)
from neuron_assets.method.records import split_top
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.seeds import unit_seed
from neuron_assets.stages.timing import ModelClock, Progress

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "detection": pl.Float64, "detection_random": pl.Float64, "detection_hard": pl.Float64,
          "fuzzing": pl.Float64, "fuzzing_random": pl.Float64, "fuzzing_hard": pl.Float64,
          "n_positive": pl.Int32, "n_random": pl.Int32, "n_hard": pl.Int32, "n_unanswered": pl.Int32,
          "judge_model": pl.String, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost": pl.Float64,
          "code_version": pl.String, "error": pl.String}
NEGATIVES = 10  # random and hard negatives per neuron, each; positives: the 10 valid + test top records
ANSWER_TOKENS = 48  # a JSON list of 10 values 0/1 with some slack


def top_token_texts(top: list[tuple[int, np.ndarray]], tokens: dict, n: int = 3) -> set[str]:
    """The (stripped) texts of the most frequent tokens at the peak of the neuron's top records."""
    counts = Counter(tokens[s][int(np.argmax(a))].strip() for s, a in top)
    return {text for text, _ in counts.most_common(n)}


def build_detection_scores(layout: Layout, prompt_version: str, sources: list[str]):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[*sources,
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "simulator", "sampling"],
        code_version=f"1-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="scores",
        pool="llm",
        description="Balanced accuracy of the simulator LLM, as a judge at temperature 0, on whole "
        "excerpts: detection (does the neuron fire on this excerpt?) and fuzzing (are the highlighted "
        "tokens what the explanation describes?). Positives: the 10 valid + test top records; "
        f"negatives: up to {NEGATIVES} random windows that do not activate, and up to {NEGATIVES} hard "
        "negatives (windows with the neuron's top tokens that do not activate). NaN where a kind has "
        "no example; unanswered excerpts are counted, never guessed.",
    )
    def detection_scores(
        context: AssetExecutionContext, storage: TableStorage, simulator: LLM, study: Study
    ) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = explanation_variants(storage, sources, context.partition_key, study.seed, control=False)
        records = records_of(storage.read("neuron_records", layer_key, "records"), explained["neuron"].unique().to_list())
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        progress = Progress(context.log.info, explained.height, f"judging {context.partition_key}, explanations")
        clock = ModelClock()
        rows = []
        for e in explained.iter_rows(named=True):
            progress.advance()
            base = {"layer": e["layer"], "neuron": e["neuron"], "variant": e["variant"],
                    "explanation_id": e["explanation_id"], "judge_model": simulator.label,
                    "code_version": code_version}
            if e["error"] is not None:
                rows.append({**base, "error": f"no explanation: {e['error']}"})
                continue
            kinds = records[e["neuron"]]
            splits = split_top(kinds["top"])
            positives = splits["valid"] + splits["test"]
            peak = max(float(a.max()) for _, a in kinds["top"])
            negatives = (kinds.get("random", [])[:NEGATIVES], kinds.get("hard_negative", [])[:NEGATIVES])
            seed = unit_seed(study.seed, e["layer"], e["neuron"])
            scored, usage, errors = {}, Counter(), []
            for scorer, examples in (
                ("detection", detection_examples(positives, *negatives, peak)),
                ("fuzzing", fuzzing_examples(positives, *negatives, peak, tokens,
                                             top_token_texts(kinds["top"], tokens), seed=seed)),
            ):
                groups = batches(examples, seed=seed)
                with clock.running():
                    answers = simulator.complete([batch_messages(e["text"], b, tokens) for b in groups],
                                                 [seed] * len(groups), temperature=0.0, max_tokens=ANSWER_TOKENS)
                predictions = []
                for group, answer in zip(groups, answers):
                    usage.update({k: answer[k] for k in ("tokens_in", "tokens_out", "cost")})
                    values, error = (None, answer["error"]) if answer["error"] else read_answer(answer["text"], len(group))
                    if error:
                        errors.append(f"{scorer}: {error}")
                    predictions += values or [None] * len(group)
                scored[scorer] = scores_from_answers([x for g in groups for x in g], predictions)
            d, f = scored["detection"], scored["fuzzing"]
            rows.append({**base, "detection": d["all"], "detection_random": d["random"], "detection_hard": d["hard"],
                         "fuzzing": f["all"], "fuzzing_random": f["random"], "fuzzing_hard": f["hard"],
                         "n_positive": d["n_positive"], "n_random": d["n_random"], "n_hard": d["n_hard"],
                         "n_unanswered": d["n_unanswered"] + f["n_unanswered"], **usage,
                         "error": f"{len(errors)} unanswered batches; first: {errors[0]}" if errors else None})

        # an explanation that could not be judged: NaN accuracies (never 0) and zero counts
        df = pl.DataFrame(rows, schema=SCHEMA).with_columns(
            pl.col(pl.Float64).fill_null(float("nan")), pl.col(pl.Int32, pl.Int64).fill_null(0)).with_columns(
            cost=pl.col("cost").fill_nan(0.0))
        version = storage.write(df, "detection_scores", context.partition_key)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                **percentiles(df["detection_random"].to_list(), "detection (random negatives)"),
                **percentiles(df["detection_hard"].to_list(), "detection (hard negatives)"),
                "neurons without hard negatives": int((df["n_hard"] == 0).sum()),
                "unanswered excerpts": int(df["n_unanswered"].sum()),
                "judge": simulator.label,
                "tokens in": int(df["tokens_in"].sum()),
                "tokens out": int(df["tokens_out"].sum()),
                "cost (USD)": float(df["cost"].sum()),
                "seconds": round(progress.seconds, 1),
                "model seconds": round(clock.seconds, 1),
                "preview": markdown_table(df.select("neuron", "variant", "detection_random", "detection_hard",
                                                    "fuzzing_random", "fuzzing_hard").head(10)),
                "path": MetadataValue.path(str(storage.path("detection_scores", context.partition_key))),
            },
        )

    return detection_scores
