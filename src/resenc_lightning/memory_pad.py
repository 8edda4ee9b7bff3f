"""Pad a device's free memory down to a reference, under either memory-cap mode, for the cuDNN warm-up.

cuDNN's benchmark takes its candidates from the free memory it is told (the caching allocator's largest free
block, else ``cudaMemGetInfo``) and then allocates the workspace *through the caching allocator*, halving on
OOM. Two limits decide the pick: F, the device's free memory, and, under a per-process fraction cap, the
allocator's headroom H = cap - reserved. A resumed run with more free memory than the fresh run had at its
warm-up (F1 > F0) occupies the difference P = F1 - F0, so F1 - P = F0.

The pad is an allocation of the caching allocator, so under a fraction cap it would also take P out of H: the
pad raises the cap by P for as long as it lives (H unchanged, up to a fraction of 1). When the raise is clamped
at 1, F0 < H0 held in the fresh run and F0 <= T - reserved - P afterwards, so F binds in both runs and the
effective limit min(F, H) is the fresh run's. With ``emulate`` or no cap the fraction is 1 and only F moves.
docs/DESIGN.md has the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: differences below this are noise (allocator rounding, a cuBLAS handle): no pad
MIN_PAD_BYTES = 2 * 1024**2


@dataclass
class FreeMemoryPad:
    """A live pad: release() frees it (and its cached segment) and gives the cap back."""

    device: torch.device
    nbytes: int
    fraction_before: float
    fraction_during: float
    block: Any = None
    cuda: Any = torch.cuda

    def release(self) -> None:
        self.block = None
        self.cuda.empty_cache()  # the pad's segment goes back to the device before the cap is lowered again
        if self.fraction_during != self.fraction_before:
            self.cuda.set_per_process_memory_fraction(self.fraction_before, self.device)


def pad_free_memory(device: torch.device, free: int, target_free: int, cuda: Any = torch.cuda
                    ) -> tuple[FreeMemoryPad | None, str | None]:
    """Occupy `free - target_free` bytes without shrinking a fraction cap's headroom. Returns (pad, why not)."""
    extra = int(free) - int(target_free)
    if extra <= MIN_PAD_BYTES:
        return None, None
    total = int(cuda.get_device_properties(device).total_memory)
    before = float(cuda.get_per_process_memory_fraction(device))
    during = before if before >= 1.0 else min(1.0, before + extra / total)
    if during != before:
        cuda.set_per_process_memory_fraction(during, device)
    pad = FreeMemoryPad(device, extra, before, during, cuda=cuda)
    try:
        pad.block = torch.empty(extra, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError as e:
        pad.release()
        return None, f"padding {extra / 2**30:.2f} GiB failed ({str(e).splitlines()[0]})"
    return pad, None
