"""Which neurons of a shard are worth explaining: the N that rank highest by an activation statistic.

A ranking names a column of neuron_records' stats table and its direction:
- max: the highest max_activation first;
- kurtosis: the highest excess kurtosis first (a heavy-tailed activation = a selective neuron);
- sparsity: the lowest active_share first (the fewest tokens shown as 1 or more on the
  explainer's 0-10 scale = the most selective).
A neuron that never activates (max_activation <= 0, or NaN) ranks after every other, whatever
its statistic (a dead neuron is not sparse), and so does a NaN statistic; ties go to the lower
neuron index.
"""

import math

# the name in 'top:N:<ranking>' -> (stats column, True when the highest value ranks first)
RANKINGS = {"max": ("max_activation", True), "kurtosis": ("kurtosis", True), "sparsity": ("active_share", False)}


def top_neurons(neurons: list[int], values: list[float], max_activations: list[float], n: int,
                highest_first: bool) -> list[int]:
    """The n neurons ranked first, in rank order (all of them when there are fewer): sorted by
    (ranks last, -value if highest_first else value, neuron), where a neuron ranks last when its
    max activation is not > 0 or its value is NaN."""
    def key(row):
        neuron, value, max_activation = row  # None (a null in the table) counts as NaN
        last = max_activation is None or not max_activation > 0 or value is None or math.isnan(value)
        return (last, 0.0 if last else (-value if highest_first else value), neuron)

    rows = sorted(zip(neurons, values, max_activations, strict=True), key=key)
    return [neuron for neuron, _, _ in rows[:n]]


def dead_and_rare(neurons: list[int], frequencies: list[float], min_frequency: float) -> tuple[list[int], list[int]]:
    """(dead, rare), ascending: dead units are never above 0 (activation frequency 0), rare ones are
    above 0 on fewer than `min_frequency` of the tokens (0 < frequency < min_frequency). A unit
    whose frequency is unknown (NaN or None: no tokens) is neither."""
    dead, rare = [], []
    for neuron, frequency in sorted(zip(neurons, frequencies, strict=True)):
        if frequency is None or math.isnan(frequency):
            continue
        if frequency == 0:
            dead.append(neuron)
        elif frequency < min_frequency:
            rare.append(neuron)
    return dead, rare
