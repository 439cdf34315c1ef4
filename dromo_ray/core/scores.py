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


def discounted_tail_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """G_t = sum_{k >= t} gamma^(k-t) r_k for one episode's rewards (T,) -> (T,): the Monte-Carlo return from every
    step to the episode's end (nothing bootstrapped after it). What a critic's Q(s_t, a_t) estimates, for the
    policy that produced the episode, when the episode ended by termination or runs long past 1 / (1 - gamma)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"discounted_tail_returns: gamma must be in [0, 1], got {gamma}")
    out = [0.0] * len(rewards)
    g = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = float(rewards[t]) + gamma * g
        out[t] = g
    return out
