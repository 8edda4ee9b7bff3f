"""A fake of torch.cuda's memory counters for one device, for the peak-memory tests on CPU."""

from __future__ import annotations

from resenc_lightning.memory_target import GB


class FakeCudaMemory:
    """Allocated and reserved bytes as the caching allocator keeps them (freed blocks stay reserved until
    `empty_cache`), and their peaks since the last `reset_peak_memory_stats` (which resets both, as torch's does)."""

    def __init__(self, resident_gib: float = 1.0) -> None:
        self.allocated = self.reserved = int(resident_gib * GB)
        self.peak_allocated = self.peak_reserved = self.allocated

    def use(self, gib: float) -> None:
        """Allocate `gib` and free it again (activations, a cuDNN workspace): the blocks stay reserved."""
        self.allocated += int(gib * GB)
        self.reserved = max(self.reserved, self.allocated)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.allocated -= int(gib * GB)

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def max_memory_allocated(self, device=None) -> int:
        return self.peak_allocated

    def max_memory_reserved(self, device=None) -> int:
        return self.peak_reserved

    def synchronize(self, device=None) -> None:
        pass
