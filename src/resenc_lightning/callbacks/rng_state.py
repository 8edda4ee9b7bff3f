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

import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def collect_rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so checkpoints stay loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch.cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch.cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def run_seed() -> int:
    """The run's seed: what `seed_everything` (`--seed`) set, else 12345."""
    return int(os.environ.get("PL_GLOBAL_SEED", 12345))


def seed_rank_streams(rank: int) -> None:
    """Distinct, reproducible python/numpy/torch streams for one DDP rank, derived from the run seed."""
    seed = int(np.random.SeedSequence([run_seed(), rank, 0x5EED]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


class RNGStateCheckpoint(pl.Callback):
    """Saves python/numpy/torch(/CUDA) RNG states with every checkpoint (every rank's) and restores them on resume."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before the checkpoint is restored: a resumed run then overrides this with its saved streams.
        if stage == "fit" and trainer.world_size > 1:
            seed_rank_streams(trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        state = collect_rng_states()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"rng_states": state}
        # Every rank dumps the checkpoint (only rank 0 writes it), so this collective is reached by all ranks.
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, state)
        return {"rng_states": per_rank[0], "rng_states_per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
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
