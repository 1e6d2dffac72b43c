"""The detect stage: per explanation of a shard, a judge LLM at temperature 0 reads batches of whole
excerpts and the explanation, and says which make the neuron fire (detection) and whether their
highlighted tokens are what it describes (fuzzing); rows of the detection_scores table
(method/detection.py). The judge (`LLM.judge`) decides each excerpt from its logits when it runs in
this process, and by the JSON list it writes when it is remote, with p("1") from the logprobs where
the endpoint gives them. An explanation that cannot be judged is a row with an error and NaN
accuracies; excerpts the judge left unanswered are counted, never guessed."""

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from neuron_assets.method.detection import (
    batch_messages,
    batches,
    detection_examples,
    fuzzing_examples,
    scores_from_answers,
    top_token_texts,
)
from neuron_assets.method.records import split_top
from neuron_assets.stages.concurrent import in_order
from neuron_assets.stages.records import max_activation
from neuron_assets.stages.results import Usage, Verdict, attempt, total
from neuron_assets.stages.seeds import unit_seed
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState

# balanced accuracy per scorer and negative kind: column -> (scorer, key of `scores_from_answers`)
ACCURACIES = {f"{scorer}{suffix}": (scorer, key) for scorer in ("detection", "fuzzing")
              for suffix, key in (("", "all"), ("_random", "random"), ("_hard_negative", "hard_negative"))}
AUROCS = {f"{scorer}_auroc": scorer for scorer in ("detection", "fuzzing")}  # of p("1"), all negatives
COUNTS = ("n_positive", "n_random", "n_hard_negative", "n_unanswered")
SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          **dict.fromkeys(ACCURACIES, pl.Float64), **dict.fromkeys(AUROCS, pl.Float64),
          **dict.fromkeys(COUNTS, pl.Int32), "judge_model": pl.String, "judge_method": pl.String,
          "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost_usd": pl.Float64, "code_version": pl.String,
          "error": pl.String}
NEGATIVES = 10  # random and hard negatives per neuron, each; positives: the 10 valid + test top records


@dataclass
class Judged:
    rows: list[dict]  # rows of SCHEMA
    seconds: float
    model_seconds: float
    unreadable: list[str]  # why each answer that could not be read was not (its excerpts: n_unanswered)


def unjudged_row(base: dict, error: str) -> dict:
    """The row of an explanation that could not be judged: NaN accuracies (never 0), zero counts."""
    return {**base, **dict.fromkeys(ACCURACIES, float("nan")), **dict.fromkeys(AUROCS, float("nan")),
            **dict.fromkeys(COUNTS, 0),
            "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "error": error}


def scored_records(kinds: dict) -> tuple[list, list, list, float]:
    """What the detection and embedding scorers read of one neuron's records ({kind: [(seq_id,
    activations)]}): the valid + test top records, up to NEGATIVES random and hard negatives, and
    the top records' max activation. ValueError when it has too few top records."""
    splits = split_top(kinds.get("top", []))
    return (splits["valid"] + splits["test"], kinds.get("random", [])[:NEGATIVES],
            kinds.get("hard_negative", [])[:NEGATIVES], max_activation(kinds["top"]))


def neuron_examples(kinds: dict, tokens: dict[int, list[str]], seed: int) -> dict[str, list[dict]]:
    """Per scorer, the examples of one neuron from its records (`scored_records`). ValueError when
    it has too few top records."""
    positives, random, hard, top_max = scored_records(kinds)
    return {"detection": detection_examples(positives, random, hard, top_max),
            "fuzzing": fuzzing_examples(positives, random, hard, top_max, tokens,
                                        top_token_texts(kinds["top"], tokens), seed=seed)}


def _scores(groups: list[list[dict]], verdicts: list[Verdict], unreadable: list[str]) -> tuple[dict, Usage, list[str]]:
    """`scores_from_answers` of one explanation's verdicts on the batches `groups`, their usage, and
    the error of each failed request; why an answer could not be read goes to `unreadable`."""
    decisions, p_one, errors = [], [], []
    for verdict in verdicts:
        # an answer that cannot be read leaves its excerpts unanswered (counted); only a failed
        # request is an error of the row
        if verdict.error:
            errors.append(verdict.error)
        elif verdict.unreadable:
            unreadable.append(verdict.unreadable)
        decisions += verdict.decisions
        p_one += verdict.p_one
    scores = scores_from_answers([example for group in groups for example in group], decisions, p_one)
    return scores, total(verdict.usage for verdict in verdicts), errors


def _verdicts(judge, texts: list[str], groups: list[list[dict]], tokens: dict[int, list[str]], seed: int,
              clock: ModelClock) -> list[list[Verdict]]:
    """Per explanation in `texts`, the judge's verdict on each batch of `groups`. Each batch is asked
    of every explanation in one call: their prompts share the instruction and the excerpts, which a
    local judge then computes once."""
    out: list[list[Verdict]] = [[] for _ in texts]
    for group in groups:
        conversations = [batch_messages(text, group, tokens) for text in texts]
        with clock.running():
            verdicts, error = attempt("judge failed", judge.judge, conversations, [len(group)] * len(texts), seed)
        if error:  # its excerpts are unanswered
            verdicts = [Verdict.failed(error, len(group))] * len(texts)
        for mine, verdict in zip(out, verdicts):
            mine.append(verdict)
    return out


def judge_neuron(bases: list[dict], texts: list[str], kinds: dict, tokens: dict[int, list[str]], judge, seed: int,
                 clock: ModelClock, unreadable: list[str]) -> list[dict]:
    """The rows of SCHEMA of the explanations `texts` of one neuron with records `kinds` (`bases`: the
    rows' identifying columns): accuracies and AUROCs of both scorers, counts of positives and
    negatives as detection saw them, unanswered excerpts of both. Every explanation sees the same
    batches (seeded by the neuron)."""
    try:
        examples = neuron_examples(kinds, tokens, seed)
    except ValueError as e:
        return [unjudged_row(base, f"not enough records: {e}") for base in bases]
    scores = [{} for _ in texts]
    usages, errors = [[] for _ in texts], [[] for _ in texts]
    for scorer, scorer_examples in examples.items():
        groups = batches(scorer_examples, seed=seed)
        for i, verdicts in enumerate(_verdicts(judge, texts, groups, tokens, seed, clock)):
            scores[i][scorer], usage, failed = _scores(groups, verdicts, unreadable)
            usages[i].append(usage)
            errors[i] += [f"{scorer}: {error}" for error in failed]
    rows = []
    for base, score, usage, error in zip(bases, scores, map(total, usages), errors):
        rows.append({**base, **{column: score[scorer][key] for column, (scorer, key) in ACCURACIES.items()},
                     **{column: score[scorer]["auroc"] for column, scorer in AUROCS.items()},
                     **{n: score["detection"][n] for n in ("n_positive", "n_random", "n_hard_negative")},
                     "n_unanswered": sum(s["n_unanswered"] for s in score.values()),
                     "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out, "cost_usd": usage.cost_usd,
                     "error": f"{len(error)} failed judge requests; first: {error[0]}" if error else None})
    return rows


def judge_units(explained: pl.DataFrame, records: dict, tokens: dict[int, list[str]], judge, seed: int,
                code_version: str, report: Callable[[ProgressState], None] = print,
                what: str = "judging") -> Judged:
    """Judge every row of `explained` (explanation_variants: layer, neuron, variant, explanation_id,
    text, error) on its neuron's `records` ({neuron: {kind: [(seq_id, activations)]}}) and the
    corpus `tokens`; `judge` is an LLM (resources/llm.py). The seed of a neuron's requests is
    `unit_seed(seed, layer, neuron)`, whatever else is judged with it. Rows come in the order of
    `explained`."""
    progress = Progress(report, explained.height, what, "explanations")
    clock = ModelClock()

    def unit_rows(group: pl.DataFrame) -> tuple[list[dict], list[str]]:
        """The rows of one unit's explanations, and why any of its judge answers could not be read."""
        neuron, rows, bases, texts, unreadable = group["unit"][0], [], [], [], []
        for e in group.iter_rows(named=True):
            base = {"layer": e["layer"], "unit": neuron, "variant": e["variant"],
                    "explanation_id": e["explanation_id"], "judge_model": judge.label,
                    "judge_method": judge.judge_method, "code_version": code_version}
            if e["error"] is not None:
                rows.append(unjudged_row(base, f"no explanation: {e['error']}"))
            else:
                bases.append(base)
                texts.append(e["text"])
        if texts:
            rows += judge_neuron(bases, texts, records.get(neuron, {}), tokens, judge,
                                 unit_seed(seed, group["layer"][0], neuron), clock, unreadable)
        progress.advance(group.height)
        return rows, unreadable

    # units at once up to the judge's concurrency (one for a local judge): an endpoint stays busy
    judged = in_order(unit_rows, explained.partition_by("unit", maintain_order=True), judge.concurrency)
    rows = {(row["variant"], row["unit"]): row for unit_judged, _ in judged for row in unit_judged}
    unreadable = [reason for _, reasons in judged for reason in reasons]
    ordered = [rows[variant, neuron] for neuron, variant in explained.select("unit", "variant").iter_rows()]
    return Judged(ordered, progress.seconds, clock.seconds, unreadable)
