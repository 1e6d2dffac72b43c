"""What a unit does to the output (docs/method.md, Explanation): the tokens its output direction
promotes most, written as an explanation without an LLM (`output_tokens`), or shown to the
explainer beside the top records (`llm_output`).

This module's source is part of the explanations' prompt version when these variants are on.
"""

import json

N_NAMED = 5  # promoted tokens named in an explanation or shown to the explainer


def distinct_tokens(tokens: list[str], n_tokens: int = N_NAMED) -> list[str]:
    """The first `n_tokens` distinct printable tokens, compared stripped (" the" repeats "the";
    whitespace-only tokens are skipped), in the given order (best first)."""
    return list(dict.fromkeys(t.strip() for t in tokens if t.strip()))[:n_tokens]


def _listed(tokens: list[str]) -> str:
    """'"a"', '"a" or "b"', '"a", "b" or "c"': quoted as JSON strings, so any quote or control
    character is escaped."""
    quoted = [json.dumps(t, ensure_ascii=False) for t in tokens]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def output_tokens_explanation(tokens: list[str], n_tokens: int = N_NAMED) -> str | None:
    """Phrase continuing "the main thing this neuron does is find", from the tokens the unit's output
    direction promotes most (best first): `text followed by "x", "y" or "z"`, naming
    `distinct_tokens`. None if no token is left."""
    named = distinct_tokens(tokens, n_tokens)
    return f"text followed by {_listed(named)}" if named else None


def promoted_tokens_note(tokens: list[str]) -> str:
    """The line the explainer reads after the target neuron's records in the `llm_output` variant:
    what the neuron's output pushes the model to predict (`distinct_tokens`); empty without any."""
    named = distinct_tokens(tokens)
    return f"When this neuron fires, it pushes the model towards predicting {_listed(named)} next." if named else ""
