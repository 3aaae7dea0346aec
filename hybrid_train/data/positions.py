"""Which positions of a source's document sequence each slot serves, and how that is re-split.

Every source has one global sequence of positions 0, 1, 2, ... that runs through its epochs (epoch e
is the range [e * P, (e + 1) * P), P = records per epoch rounded up to the shuffle window; the next
file says which record a position holds). The positions are dealt to the job's slots, one slot per
(data-parallel rank, worker): slot v of V starts with the stripe v, v + V, v + 2V, ... and serves
its positions in ascending order. So within an epoch every position belongs to exactly one slot.

A slot's state is a `Cursor`: positions it still owes from an earlier split (`holes`, ascending),
then its stripe from `next` in steps of `step`. Everything below a cursor that the slot was dealt is
consumed; everything from it on is not. That makes a re-split exact without any communication
beyond collecting the old states: the unconsumed positions are the union of every cursor's
remainder, everything from F = max(next) on is unconsumed, and the finite rest below F (the
"holes": positions that slower slots had not reached) is dealt first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cursor:
    """Positions still to serve, ascending: holes[index:], then next, next + step, ..."""

    holes: list[int] = field(default_factory=list)
    next: int = 0
    step: int = 1
    index: int = 0  # holes before this one are served

    @classmethod
    def stripe(cls, slot: int, num_slots: int) -> "Cursor":
        return cls([], slot, num_slots)

    def peek(self) -> int:
        return self.holes[self.index] if self.index < len(self.holes) else self.next

    def advance(self) -> int:
        """The next position; the cursor moves past it."""
        if self.index < len(self.holes):
            self.index += 1
            return self.holes[self.index - 1]
        position, self.next = self.next, self.next + self.step
        return position

    def copy(self) -> "Cursor":
        return Cursor(self.holes, self.next, self.step, self.index)  # holes are never mutated

    def state_dict(self) -> dict:
        return {"holes": self.holes[self.index:], "next": self.next, "step": self.step}

    @classmethod
    def from_state(cls, state: dict) -> "Cursor":
        holes = [int(h) for h in state["holes"]]
        if holes != sorted(set(holes)) or (holes and holes[-1] >= state["next"]):
            raise ValueError(f"corrupt data state: holes {holes[:8]}... must ascend below next={state['next']}")
        return cls(holes, int(state["next"]), int(state["step"]))


def redistribute(cursors: list[dict], num_slots: int) -> list[dict]:
    """Cursor states of `num_slots` new slots that together serve exactly the positions the old
    cursors had not served: the holes first (dealt round-robin in ascending order), then the
    positions from the old frontier on, striped."""
    if not cursors:
        raise ValueError("no cursor states to redistribute")
    old = [Cursor.from_state(c) for c in cursors]
    steps = {c.step for c in old}
    if steps != {len(old)}:
        # A stripe step equal to the number of slots is what makes the stripes partition the positions.
        raise ValueError(f"{len(old)} cursor states with steps {sorted(steps)}; pass every slot's state, once")
    frontier = max(c.next for c in old)
    unserved = set()
    for c in old:
        unserved.update(c.holes)
        unserved.update(range(c.next, frontier, c.step))
    holes = sorted(unserved)
    new = []
    for slot in range(num_slots):
        # Sequence index k >= len(holes) holds position frontier + (k - len(holes)); slot takes k = slot mod num_slots.
        first = frontier + (slot - len(holes)) % num_slots
        new.append({"holes": holes[slot::num_slots], "next": first, "step": num_slots})
    return new


def split_count(total: int, parts: int, part: int) -> int:
    """`part`'s share when a counter summed over old slots is spread over `parts` new ones (sums match)."""
    return total // parts + (1 if part < total % parts else 0)
