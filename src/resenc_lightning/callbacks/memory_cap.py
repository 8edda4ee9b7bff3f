"""Cap this process's CUDA memory to the VRAM target the plans were made for.

ResEnc M/L/XL plans are sized for 8/24/40 GB. On a bigger card the run would otherwise grow into
whatever is free; on a card of exactly that size it needs headroom (the usual advice: plan a 24 GB
card for 20-22 GB). Two modes:

* ``fraction``: ``torch.cuda.set_per_process_memory_fraction(cap / total)``. Bounds what the caching
  allocator may hold. cuDNN's candidate filter still sees the card's free memory, so this alone
  does not make cuDNN's algorithm choice reproducible (docs/DESIGN.md).
* ``emulate``: allocate a ballast block of ``total - cap`` so the device *looks* like a card of
  ``cap`` GB to everything, cuDNN's free-memory query included: what a run on the target card
  would see.

Runs in ``setup`` (before Lightning moves the model to the GPU), i.e. before any CUDA tensor.
``expandable_segments`` is requested when the callback is built, before CUDA initialises
(allocator_settings.py says why ``setup`` is too late).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch

from resenc_lightning import allocator_settings, rank_report
from resenc_lightning.memory_target import GB, CapDecision, decide_cap, planner_command, plans_target_gb


class MemoryTargetError(ValueError):
    """An explicit memory target the card cannot hold (a user error, reported in one line)."""


class CudaMemoryCap(pl.Callback):
    """Cap CUDA memory to the plans' VRAM target (or an explicit one), never above total - headroom.

    Args:
        enabled: switch the cap off entirely.
        target_gb: explicit target in GB; None derives it from the plans (ResEnc M/L/XL: 8/24/40 GB,
            or `_<N>GB` in the plans name as `-overwrite_plans_name` conventionally carries it).
        headroom_fraction: part of the card always left free (default 10%).
        min_headroom_gb: at least this much left free (default 2 GB).
        mode: "fraction" (allocator cap) or "emulate" (ballast: the device looks like a target-sized card).
        expandable_segments: the caching allocator's expandable_segments:True, requested here, at construction
            (the CLI builds callbacks before the Trainer, so before CUDA initialises); user settings are kept.
    """

    def __init__(self, enabled: bool = True, target_gb: float | None = None, headroom_fraction: float = 0.1,
                 min_headroom_gb: float = 2.0, mode: Literal["fraction", "emulate"] = "fraction",
                 expandable_segments: bool = False) -> None:
        if mode not in ("fraction", "emulate"):
            raise ValueError(f"memory cap mode {mode!r} is not one of 'fraction', 'emulate'.")
        self.enabled = enabled
        self.target_gb = target_gb
        self.headroom_fraction = headroom_fraction
        self.min_headroom_gb = min_headroom_gb
        self.mode = mode
        self.expandable_segments = expandable_segments
        self.decision: CapDecision | None = None
        self.restored_decision: CapDecision | None = None
        self.warning: str | None = None
        self._ballast: torch.Tensor | None = None
        self.ballast_bytes = 0
        self._cuda: Any = torch.cuda  # replaced by a fake in tests
        if enabled and expandable_segments:
            self.request_expandable_segments()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self.decision is not None:
            return
        device = trainer.strategy.root_device
        if device.type != "cuda":
            rank_report.info(f"CudaMemoryCap: device is {device.type}, no CUDA memory to cap.")
            return
        spec = getattr(pl_module, "spec", None)
        plans = spec.plans if spec is not None else {}
        target, source = (self.target_gb, "explicit target_gb") if self.target_gb is not None else plans_target_gb(plans)
        if target is None:
            rank_report.warn(f"CudaMemoryCap: {source}; pass --memory_cap.target_gb N to cap memory. No cap set.")
            return
        self.apply(device, target, source, plans, spec.dataset_id if spec is not None else "ID")

    def apply(self, device: torch.device, target_gb: float, source: str, plans: dict,
              dataset_id: int | str) -> CapDecision:
        index = device.index if device.index is not None else self._cuda.current_device()
        total = self._cuda.get_device_properties(index).total_memory
        d = decide_cap(total, target_gb, source, self.headroom_fraction, self.min_headroom_gb)
        if source == "explicit target_gb" and target_gb > d.total_gb:
            raise MemoryTargetError(
                f"--memory_cap.target_gb {target_gb:g} is larger than this {d.total_gb:.1f} GB card ({device}); use at "
                f"most {d.max_fit_gb:.1f} (the card less headroom) or drop it to use the plans' target."
            )
        self.decision = d
        if not d.fits:
            self.warning = (
                f"The plans' VRAM target ({d.target_gb:g} GB, {source}) does not fit this {d.total_gb:.1f} GB card "
                f"with headroom; capping at {d.cap_gb:.1f} GB. Expect slower cuDNN algorithms or OOM; re-plan "
                f"with: {planner_command(plans, dataset_id, d.max_fit_gb)}"
            )
            rank_report.warn(self.warning)
        if self.mode == "fraction":
            self._cuda.set_per_process_memory_fraction(d.fraction, index)
            rank_report.info(f"CudaMemoryCap: capped CUDA memory at {d.cap_gb:.1f} of {d.total_gb:.1f} GB "
                           f"(fraction {d.fraction:.3f}, target {d.target_gb:g} GB from {source}).")
        else:
            free, _ = self._cuda.mem_get_info(index)
            ballast = int(max(free - d.cap_gb * GB, 0))
            self.ballast_bytes = ballast
            self._ballast = torch.empty(ballast, dtype=torch.uint8, device=torch.device("cuda", index))
            rank_report.info(f"CudaMemoryCap: emulating a {d.cap_gb:.1f} GB card (ballast {ballast / GB:.1f} GB "
                           f"on a {d.total_gb:.1f} GB device).")
        return d

    @staticmethod
    def request_expandable_segments() -> None:
        """expandable_segments:True for the caching allocator: through the environment before CUDA initialises (at
        the accelerator's set_device, before any Callback.setup), else through torch's runtime setter."""
        how, own = allocator_settings.request_expandable_segments()
        if how == "kept":
            rank_report.warn(f"CudaMemoryCap: --memory_cap.expandable_segments true is overridden by your {own}; "
                             f"unset it (or set expandable_segments:True) to use expandable segments.")
        elif how == "runtime":
            rank_report.info("CudaMemoryCap: CUDA was already initialised; expandable_segments:True set through "
                             "torch's allocator settings applies to memory allocated from now on.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._ballast = None

    def state_dict(self) -> dict[str, Any]:
        return {"decision": vars(self.decision) if self.decision else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The saved decision is a record of the run that wrote the checkpoint (its card may differ from this
        one): kept as `restored_decision` for comparison; this run decides afresh for its own card in setup."""
        saved = state_dict.get("decision")
        self.restored_decision = CapDecision(**saved) if saved else None
