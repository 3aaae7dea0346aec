"""Deterministic token-share mixing of named sources.

Each next piece is taken from the source whose placed tokens lag furthest behind its target share of
all tokens placed so far: deficit_i = share_i * total - placed_i, the largest wins, ties go to the
first name in sorted order. No random draws, so the realized shares track the targets to within about
one piece's length at every step (sampling would drift by O(sqrt(n))) and resuming needs only the
counters. Pieces are at most one row long (slot.py), which is what bounds the deviation.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence


class Mixture:
    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("a mixture needs at least one source")
        for name, weight in weights.items():
            if not weight > 0:
                raise ValueError(f"source {name!r}: weight must be positive, got {weight}")
        total = sum(weights.values())
        self.names = sorted(weights)
        self.shares = {name: weights[name] / total for name in self.names}
        self.tokens = {name: 0 for name in self.names}  # placed so far, per source

    def pick(self, candidates: Optional[Sequence[str]] = None) -> str:
        """The source (of `candidates`, default all) the next piece should come from."""
        total = sum(self.tokens.values())
        # max() keeps the first of equal keys, and the names are sorted: ties go by name order.
        names = sorted(candidates) if candidates else self.names
        return max(names, key=lambda name: self.shares[name] * total - self.tokens[name])

    def add(self, name: str, num_tokens: int) -> None:
        """Count `num_tokens` placed from `name` (negative: taken back)."""
        self.tokens[name] += num_tokens

    def state_dict(self) -> dict:
        return {"tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["tokens"]) != self.names:
            raise ValueError(f"mixture state has sources {sorted(state['tokens'])}, configured: {self.names}")
        self.tokens = dict(state["tokens"])
