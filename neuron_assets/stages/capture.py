"""The capture stage: one forward pass over the corpus windows feeds every layer's record sampler
(top, random and quantile records, activation stats), then one bounded second pass over the
candidate windows of all the layers finds their hard negatives. Out come each layer's records and
stats tables (method/records.py says what each kind of record is)."""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl

from neuron_assets.method.records import (
    HARD_NEGATIVE,
    RecordSampler,
    add_records,
    hard_negative_collector,
)
from neuron_assets.stages.device_records import DeviceRecordSampler
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState

RECORDS_SCHEMA = {"unit": pl.Int32, "kind": pl.String, "rank": pl.Int32, "seq_id": pl.Int32,
                  "activations": pl.List(pl.Float32)}
STATS_SCHEMA = {"unit": pl.Int32, "mean": pl.Float64, "variance": pl.Float64, "skewness": pl.Float64,
                "kurtosis": pl.Float64, "max_activation": pl.Float64, "active_share": pl.Float64,
                "activation_frequency": pl.Float64, "n_tokens": pl.Int64,
                "quantile_boundaries": pl.List(pl.Float64)}
SPLIT_TOP, SPLIT_RANDOM = 20, 15  # 4 top splits and 3 random splits of 5 records (docs/method.md)


def layer_seed(seed: int, layer: int) -> int:
    """`seed * 1000 + layer`: the seed of a layer's record sampler and of its hard-negative search."""
    return seed * 1000 + layer


@dataclass
class LayerRecords:
    records: pl.DataFrame  # RECORDS_SCHEMA, sorted by neuron
    stats: pl.DataFrame  # STATS_SCHEMA, one row per neuron
    hard_per_neuron: np.ndarray  # hard negatives found per neuron

    def short_neurons(self) -> dict[str, int]:
        """{"top": n, "random": n}: how many neurons have fewer such records than the splits need."""
        counts = self.records.group_by("unit", "kind").len()
        return {kind: self.stats.height - counts.filter((pl.col("kind") == kind) & (pl.col("len") >= need)).height
                for kind, need in (("top", SPLIT_TOP), ("random", SPLIT_RANDOM))}


@dataclass
class Captured:
    layers: dict[int, LayerRecords]  # in the order of the layers asked for
    n_windows: int
    n_tokens: int
    second_pass_windows: int  # the union of every layer's hard-negative candidates
    first_pass_seconds: float
    second_pass_seconds: float
    model_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.first_pass_seconds, 1e-9)


def _layer_records(records: dict, stats: dict, hard: dict, n_neurons: int) -> LayerRecords:
    records = add_records(records, hard)
    # a 2D array becomes a fixed-width column in one copy; a list of row arrays is 10x slower
    records["activations"] = pl.Series(records["activations"]).cast(pl.List(pl.Float32))
    return LayerRecords(pl.DataFrame(records, schema=RECORDS_SCHEMA), pl.DataFrame(stats, schema=STATS_SCHEMA),
                        np.bincount(hard["unit"], minlength=n_neurons))


def _forward_pass(model, windows: np.ndarray, seq_ids: np.ndarray, layers: list[int], consumers: dict, pool,
                  clock: ModelClock, progress: Progress, on_device: bool = False) -> None:
    """Run `model` on `windows` (whose ids are `seq_ids`) and hand each layer's activations to its
    consumer (`update(acts, seq_ids)`), the layers side by side; `on_device`: as tensors on the
    model's device, not numpy arrays."""
    for start, acts in clock.timed(model.unit_activations(windows, layers, on_device=on_device)):
        batch = seq_ids[start : start + len(acts[layers[0]])]
        list(pool.map(lambda layer, a=acts, s=batch: consumers[layer].update(a[layer], s), layers))
        progress.advance(len(batch))


def capture_records(model, token_ids: np.ndarray, layers: list[int], n_top: int, n_random: int, seed: int,
                    report: Callable[[ProgressState], None] = print, what: str = "layers",
                    on_device: bool | None = None) -> Captured:
    """Each of `layers`' records and stats over the corpus windows `token_ids` int [W, T] (window i
    has seq_id i). `model` is a `SubjectModel` (resources/subject_model.py). Each layer keeps its
    `n_top` top and `n_random` random records; `what` names the layers in progress lines.

    `on_device`: sample the first pass where the model runs (`DeviceRecordSampler`), with the same
    records; default: on CUDA. The second pass is bounded and small: its activations come to the host.
    """
    n_neurons = model.unit_shape().n_units
    device = model.torch_device()
    on_device = device.type == "cuda" if on_device is None else on_device
    kind, where = (DeviceRecordSampler, {"device": device}) if on_device else (RecordSampler, {})
    samplers = {layer: kind(n_neurons, token_ids.shape[1], n_top=n_top, n_random=n_random,
                            quantile_pool=max(50, n_random), seed=layer_seed(seed, layer), **where)
                for layer in layers}
    clock = ModelClock()
    # numpy releases the GIL inside its loops, so the layers' samplers run side by side
    with ThreadPoolExecutor(max_workers=min(len(layers), os.cpu_count() or 1)) as pool:
        first = Progress(report, len(token_ids), f"forward pass, {what}", "windows")
        _forward_pass(model, token_ids, np.arange(len(token_ids)), layers, samplers, pool, clock, first, on_device)
        first_pass_seconds = first.seconds
        # each layer's sampler is freed once finalized
        final = dict(zip(layers, pool.map(lambda layer: samplers.pop(layer).finalize(), layers)))
        # hard negatives: one second pass over the union of every layer's candidate windows (all drawn
        # from one window sample of at most 20,000, so the pass is bounded whatever the corpus size)
        hard = dict(zip(layers, pool.map(
            lambda layer: hard_negative_collector(final[layer][0], n_neurons, token_ids,
                                                  seed=layer_seed(seed, layer), sample_seed=seed), layers)))
        union = np.unique(np.concatenate([hard[layer].windows() for layer in layers]))
        second = Progress(report, len(union), f"second pass ({HARD_NEGATIVE}), {what}", "windows")
        _forward_pass(model, token_ids[union], union, layers, hard, pool, clock, second)
        second_pass_seconds = second.seconds
        tables = dict(zip(layers, pool.map(
            lambda layer: _layer_records(*final.pop(layer), hard.pop(layer).finalize(), n_neurons), layers)))
    return Captured(tables, len(token_ids), token_ids.size, len(union), first_pass_seconds, second_pass_seconds,
                    clock.seconds)
