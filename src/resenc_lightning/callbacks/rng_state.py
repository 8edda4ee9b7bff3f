"""Keep the RNG streams in the checkpoint so a resumed run continues them exactly.

Lightning does not store RNG state. nnU-Net's in-process data path (case choice, crops, spatial
parameters: numpy; augmentation decisions, mirroring: torch) draws from the global generators, so
restoring them makes an interrupted-and-resumed deterministic run end with the same weights as an
uninterrupted one. Worker processes are re-seeded from (seed, rank, epoch) instead (see data.py).
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


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


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


class RNGStateCheckpoint(pl.Callback):
    """Saves python/numpy/torch(/CUDA) RNG states with every checkpoint and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng_states" in state_dict:
            set_rng_states(state_dict["rng_states"])
