"""Length bias in preference data: if chosen answers are systematically longer (or shorter) than
rejected ones, DPO learns "be longer" instead of the rubric. Exports report the bias in their
`.meta.json`, and `--length-balance` removes it.

Length of a message: characters of its content plus, per tool call, its name and its arguments text.
The bias is the ratio of means, mean(chosen chars) / mean(rejected chars).

Balancing (`balance`): while the ratio is above `high` (1.1), drop the pair with the largest
chosen/rejected ratio; while it is below `low` (0.9), drop the pair with the smallest. Removing the
most extreme pair on the heavy side always moves the ratio of means toward 1 (that ratio is the
rejected-length-weighted average of the pair ratios), so this ends inside [low, high], having removed
only the tail that carries the bias. Ties break on a caller-given key (the row digest), so the result
is deterministic. Sorting once makes it O(n log n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOW, HIGH = 0.9, 1.1


def message_length(message: dict[str, Any]) -> int:
    total = len(message.get("content") or "")
    for tc in message.get("tool_calls") or ():
        fn = tc["function"]
        args = fn["arguments"]
        total += len(fn["name"]) + (len(args) if isinstance(args, str) else len(str(args)))
    return total


@dataclass(frozen=True)
class LengthStats:
    pairs: int
    chosen_mean_chars: float
    rejected_mean_chars: float
    ratio: float | None  # mean chosen / mean rejected; None without pairs

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "chosen_mean_chars": round(self.chosen_mean_chars, 2),
                "rejected_mean_chars": round(self.rejected_mean_chars, 2),
                "ratio": None if self.ratio is None else round(self.ratio, 4)}


def length_stats(lengths: Sequence[tuple[int, int]]) -> LengthStats:
    """Stats of (chosen chars, rejected chars) per pair."""
    n = len(lengths)
    if not n:
        return LengthStats(0, 0.0, 0.0, None)
    chosen = sum(c for c, _ in lengths)
    rejected = sum(r for _, r in lengths)
    ratio = chosen / rejected if rejected else (math.inf if chosen else 1.0)
    return LengthStats(n, chosen / n, rejected / n, ratio)


def _pair_ratio(c: int, r: int) -> float:
    return c / r if r else (math.inf if c else 1.0)


def balance(lengths: Sequence[tuple[int, int]], keys: Sequence[str], low: float = LOW,
            high: float = HIGH) -> set[int]:
    """Indexes of the pairs to drop so that the ratio of means lies in [low, high]."""
    chosen = sum(c for c, _ in lengths)
    rejected = sum(r for _, r in lengths)
    ratio = _pair_ratio(chosen, rejected)
    if low <= ratio <= high or not lengths:
        return set()
    longer_chosen = ratio > high
    order = sorted(range(len(lengths)), key=lambda i: (_pair_ratio(*lengths[i]), keys[i]),
                   reverse=longer_chosen)
    dropped: set[int] = set()
    for i in order:
        if low <= _pair_ratio(chosen, rejected) <= high or len(dropped) == len(lengths):
            break
        c, r = lengths[i]
        chosen -= c
        rejected -= r
        dropped.add(i)
    return dropped
