"""One seed per unit and purpose, so a unit's LLM request (and its cache key) does not depend on
which other units share its batch or shard."""

EXPLAIN, REVISE, EXPLAIN_OUTPUT = 0, 1, 2  # purposes that sample: the first explanation, its revision, llm_output


def unit_seed(seed: int, layer: int, unit: int, purpose: int = EXPLAIN) -> int:
    """`seed * 1_000_003 + layer * 10_007 + unit + purpose`: distinct for every unit of a model with
    fewer than 10,007 units per layer, for each study seed."""
    return seed * 1_000_003 + layer * 10_007 + unit + purpose
