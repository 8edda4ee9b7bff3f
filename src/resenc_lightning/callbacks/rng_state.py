"""Keep the RNG streams in the checkpoint so a resumed run continues them exactly.

Lightning does not store RNG state. nnU-Net's in-process data path (case choice, crops, spatial
parameters: numpy; augmentation decisions, mirroring: torch) draws from the global generators, so
restoring them makes an interrupted-and-resumed deterministic run end with the same weights as an
uninterrupted one. Worker processes are re-seeded from (seed, rank, epoch) instead (see data.py).

Under DDP, `seed_everything` gives every rank the same streams (so the initial weights agree); nnU-Net's
ranks must draw different cases, so each rank's streams are re-seeded from (seed, rank) when a fresh
fit starts, every rank's state is gathered into the checkpoint, and each rank restores its own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from resenc_lightning.rng import collect_rng_states, gather_per_rank, seed_rank_streams, set_rng_states, world_and_rank


class RNGStateCheckpoint(pl.Callback):
    """Saves python/numpy/torch(/CUDA) RNG states with every checkpoint (every rank's) and restores them on resume."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before the checkpoint is restored: a resumed run then overrides this with its saved streams.
        if stage == "fit" and trainer.world_size > 1:
            seed_rank_streams(trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        per_rank = gather_per_rank(collect_rng_states())
        if len(per_rank) == 1:
            return {"rng_states": per_rank[0]}
        return {"rng_states": per_rank[0], "rng_states_per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        world, rank = world_and_rank()
        per_rank = state_dict.get("rng_states_per_rank")
        if per_rank is not None and len(per_rank) == world:
            set_rng_states(per_rank[rank])
        elif world > 1:
            rank_zero_warn(f"The checkpoint holds RNG streams for {len(per_rank or [0])} process(es), this run has "
                           f"{world}: each rank's streams are re-seeded from (seed, rank); the data order will differ "
                           f"from an uninterrupted run.")
            seed_rank_streams(rank)
        elif "rng_states" in state_dict:
            set_rng_states(state_dict["rng_states"])
