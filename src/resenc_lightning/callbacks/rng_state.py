"""Keep the RNG streams in the checkpoint so a resumed run continues them exactly.

Lightning does not store RNG state. nnU-Net's in-process data path (case choice, crops, spatial
parameters: numpy; augmentation decisions, mirroring: torch) draws from the global generators, so
restoring them makes an interrupted-and-resumed deterministic run end with the same weights as an
uninterrupted one. Worker processes are re-seeded from (seed, rank, epoch) instead (see data.py).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


class RNGStateCheckpoint(pl.Callback):
    """Saves python/numpy/torch(/CUDA) RNG states with every checkpoint and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": _collect_rng_states(include_cuda=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict.get("rng_states", {}))
        import torch

        if not torch.cuda.is_available():
            states.pop("torch.cuda", None)
        if states:
            _set_rng_states(states)
