"""The final score of a run, defined once: what the README, the sweep ranking and the report all mean by it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def final_score(evals: Sequence[Mapping[str, float]], n: int) -> tuple[float, float]:
    """(normalized score, return): the means over the last ``n`` evaluations (``train.final_score_last_n``) of
    ``eval/normalized_score`` and ``eval/return_mean``; never the best evaluation. NaN without evaluations."""
    if n < 1:
        raise ValueError(f"final_score: n must be >= 1, got {n}")
    last = list(evals)[-n:]
    if not last:
        return math.nan, math.nan
    score = sum(float(e["eval/normalized_score"]) for e in last) / len(last)
    ret = sum(float(e["eval/return_mean"]) for e in last) / len(last)
    return score, ret
