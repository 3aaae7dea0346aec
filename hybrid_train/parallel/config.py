"""Configuration of the parallel layout."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Replicas of the sharded model (HSDP: replicate across nodes); -1 = what remains of the world."""
    dp_shard: int = -1
    """FSDP shard group size; -1 = what remains of the world."""

    def resolve(self, world_size: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) for this world size; raises ValueError naming the sizes."""
        rep, shard = self.dp_replicate, self.dp_shard
        if rep == 0 or shard == 0 or rep < -1 or shard < -1:
            raise ValueError(f"parallel.dp_replicate={rep} and parallel.dp_shard={shard} must be positive or -1")
        if rep == -1 and shard == -1:
            raise ValueError("only one of parallel.dp_replicate and parallel.dp_shard may be -1")
        known = (rep if rep > 0 else 1) * (shard if shard > 0 else 1)
        if world_size % known:
            raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate x parallel.dp_shard "
                             f"= {known}")
        rep = rep if rep > 0 else world_size // known
        shard = shard if shard > 0 else world_size // known
        if rep * shard != world_size:
            raise ValueError(f"parallel.dp_replicate={rep} x parallel.dp_shard={shard} != world size {world_size}")
        return rep, shard
