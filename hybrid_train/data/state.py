"""Loader states: one rank's, the merged global one, and re-splitting it over a new set of slots.

A rank's state (`PackedDataLoader.state_dict()`) holds its slots' states; `merge_rank_states` puts
every rank's together in slot order, which is all the information there is about the job's data
position. From a global state, `slot_states` gives the slots of any (dp_rank, dp_size, workers):
unchanged when the number of slots is the same (an exact resume), else re-split by `resplit`:

  sources   the unserved positions are re-dealt (positions.redistribute): none served twice, none skipped
  pending   the rests of documents cut at a row end are dealt round-robin, so they are finished, not dropped
  counters  per-source tokens, documents and skipped records are summed and spread, so their totals
            over the job (and the mixture's deficits, on average) carry on
"""

from __future__ import annotations

from .positions import redistribute, split_count

STATE_VERSION = 2


def merge_rank_states(states: list[dict]) -> dict:
    """The global data state from every rank's `state_dict()` (any order, each rank once)."""
    if not states:
        raise ValueError("merge_rank_states needs the state of every rank, got none")
    for state in states:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')}, this loader reads {STATE_VERSION}")
        if state.get("kind") != "rank":
            raise ValueError(f"merge_rank_states takes per-rank states, got a {state.get('kind')!r} state")
    first = states[0]
    for key in ("fingerprint", "dp_size", "slots_per_rank"):
        values = {s[key] for s in states}
        if len(values) > 1:
            raise ValueError(f"rank states disagree on {key}: {sorted(map(str, values))}")
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(first["dp_size"])):
        raise ValueError(f"need one state per rank 0..{first['dp_size'] - 1}, got ranks {ranks}")
    by_rank = sorted(states, key=lambda s: s["dp_rank"])
    return {
        "version": STATE_VERSION,
        "kind": "global",
        "fingerprint": first["fingerprint"],
        "dp_size": first["dp_size"],
        "slots_per_rank": first["slots_per_rank"],
        "next_slot": [s["next_slot"] for s in by_rank],
        "slots": [slot for s in by_rank for slot in s["slots"]],
    }


def slot_states(state: dict, dp_rank: int, dp_size: int, slots_per_rank: int) -> tuple[list[dict], int]:
    """This rank's slot states and next slot from a global state."""
    if (state["dp_size"], state["slots_per_rank"]) == (dp_size, slots_per_rank):
        first = dp_rank * slots_per_rank
        return state["slots"][first : first + slots_per_rank], state["next_slot"][dp_rank]
    num_slots = dp_size * slots_per_rank
    # Every rank computes the same re-split from the same state and keeps its own part.
    slots = state["slots"] if len(state["slots"]) == num_slots else resplit(state["slots"], num_slots)
    first = dp_rank * slots_per_rank
    return slots[first : first + slots_per_rank], 0


def resplit(slots: list[dict], num_slots: int) -> list[dict]:
    """States of `num_slots` new slots that continue the old slots' data exactly once."""
    names = sorted(slots[0]["sources"])
    new = [{"sources": {}, "mixture": {"tokens": {}}, "packer": {"tokens": {}, "documents": {}},
            "pending": {}} for _ in range(num_slots)]
    for name in names:
        olds = [s["sources"][name] for s in slots]
        cursors = redistribute([o["cursor"] for o in olds], num_slots)
        records = {o["records"] for o in olds} - {None}
        if len(records) > 1:
            raise ValueError(f"source {name!r}: slot states disagree on records per epoch: {sorted(records)}")
        file_records = [max(counts) for counts in zip(*(o["file_records"] for o in olds))]
        skipped = sum(o["skipped"] for o in olds)
        pending = [p for s in slots for p in s["pending"][name]]
        for i, slot in enumerate(new):
            slot["sources"][name] = {"cursor": cursors[i], "records": next(iter(records), None),
                                     "file_records": list(file_records),
                                     "skipped": split_count(skipped, num_slots, i)}
            slot["pending"][name] = pending[i::num_slots]
    for part, counter in (("mixture", "tokens"), ("packer", "tokens"), ("packer", "documents")):
        for name in names:
            total = sum(s[part][counter].get(name, 0) for s in slots)
            for i, slot in enumerate(new):
                slot[part][counter][name] = split_count(total, num_slots, i)
    return new
