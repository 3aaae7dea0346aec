"""Deterministic token-share mixing of named sources.

Each next document is taken from the source whose served tokens lag furthest behind its target share
of all tokens served so far: deficit_i = share_i * total - served_i, the largest wins, ties go to the
first name in sorted order. No random draws, so the realized shares track the targets to within about
one document's length at every step (sampling would drift by O(sqrt(n))) and resuming needs only the
counters.
"""

from __future__ import annotations

from typing import Mapping


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
        self.tokens = {name: 0 for name in self.names}  # served so far, per source
        self.documents = {name: 0 for name in self.names}

    def pick(self) -> str:
        """The source the next document should come from."""
        total = sum(self.tokens.values())
        # max() keeps the first of equal keys, and self.names is sorted: ties go by name order.
        return max(self.names, key=lambda name: self.shares[name] * total - self.tokens[name])

    def add(self, name: str, num_tokens: int) -> None:
        """Count a document of `num_tokens` served from `name`."""
        self.tokens[name] += num_tokens
        self.documents[name] += 1

    def state_dict(self) -> dict:
        return {"tokens": dict(self.tokens), "documents": dict(self.documents)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["tokens"]) != self.names:
            raise ValueError(f"mixture state has sources {sorted(state['tokens'])}, configured: {self.names}")
        self.tokens, self.documents = dict(state["tokens"]), dict(state["documents"])
