"""The process's RNG streams (python, numpy, torch, CUDA) as checkpointable values, and the run's seed.

Shared by the RNG checkpoint callback, the DataModule (worker seeds, the in-process loader) and the
cuDNN warm-up (which must leave every stream where it found it).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) under torch.distributed, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_per_rank(state: Any) -> list[Any]:
    """Every rank's `state`, in rank order ([state] in a single process). Checkpoint state hooks run on every rank
    (only rank 0 writes the file), so every rank reaches this collective."""
    world, _ = world_and_rank()
    if world == 1:
        return [state]
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, state)
    return per_rank
