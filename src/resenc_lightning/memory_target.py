"""The VRAM target a run was planned for, the cap that fits this card, and the planner command that re-plans.

One owner for the memory arithmetic shared by the memory-cap callback, `--memcheck` and the
first-step out-of-memory message: ResEnc M/L/XL plans are sized for 8/24/40 GB; a card needs
headroom (the usual advice: plan a 24 GB card for 20-22 GB); an OOM before the first optimizer
step means the plans are too big for the card, and the fix is new plans made for a target that fits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resenc_lightning.plans import RunSpec

GB = 1024**3
#: VRAM targets of nnunetv2's ResEnc planners (their `gpu_memory_target_in_gb` defaults).
PLANNER_TARGETS_GB = {"nnUNetPlannerResEncM": 8.0, "nnUNetPlannerResEncL": 24.0, "nnUNetPlannerResEncXL": 40.0}
_NAME_TARGET = re.compile(r"_(\d+(?:\.\d+)?)\s*G(?:B)?(?:_|$)", re.IGNORECASE)


@dataclass
class CapDecision:
    total_gb: float
    target_gb: float
    cap_gb: float
    fraction: float
    fits: bool
    max_fit_gb: float
    target_source: str


def plans_target_gb(plans: dict) -> tuple[float | None, str]:
    """The VRAM target the plans were made for: explicit key, `_<N>GB` in the plans name, else planner default."""
    if "gpu_memory_target_in_gb" in plans:
        return float(plans["gpu_memory_target_in_gb"]), "plans key gpu_memory_target_in_gb"
    match = _NAME_TARGET.search(plans.get("plans_name", ""))
    if match:
        return float(match.group(1)), f"plans name {plans['plans_name']}"
    planner = plans.get("experiment_planner_used", "")
    if planner in PLANNER_TARGETS_GB:
        return PLANNER_TARGETS_GB[planner], f"{planner} default"
    return None, f"planner {planner or 'unknown'} has no known target"


def decide_cap(total_bytes: int, target_gb: float, target_source: str = "explicit",
               headroom_fraction: float = 0.1, min_headroom_gb: float = 2.0) -> CapDecision:
    """cap = min(target, total - headroom), headroom = max(headroom_fraction * total, min_headroom_gb)."""
    total_gb = total_bytes / GB
    headroom = max(total_gb * headroom_fraction, min_headroom_gb)
    max_fit = max(total_gb - headroom, 0.0)
    cap = min(target_gb, max_fit)
    return CapDecision(total_gb, target_gb, cap, cap / total_gb if total_gb else 0.0, target_gb <= max_fit,
                       max_fit, target_source)


def planner_command(plans: dict, dataset_id: int | str, target_gb: float) -> str:
    """The nnunetv2 command that re-plans for a target that fits this card."""
    planner = plans.get("experiment_planner_used", "nnUNetPlannerResEncL")
    if planner not in PLANNER_TARGETS_GB:
        planner = "nnUNetPlannerResEncL"
    n = int(math.floor(target_gb))
    # nnUNetResEncUNetLPlans / ..._20GB_Plans / nnU-Net docs' nnUNetResEncUNetPlans_80G -> nnUNetResEncUNet[L]_<n>GB_Plans
    base = re.sub(r"Plans(?=_|$)", "", plans.get("plans_name", "nnUNetResEncUNetLPlans"))
    base = re.sub(r"_+", "_", _NAME_TARGET.sub("_", base)).strip("_")
    return (f"nnUNetv2_plan_experiment -d {dataset_id} -pl {planner} -gpu_memory_target {n} "
            f"-overwrite_plans_name {base}_{n}GB_Plans")


def card_total_bytes(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).total_memory)


def first_step_oom_message(spec: RunSpec, device: torch.device,
                           total_bytes: Callable[[torch.device], int | None] = card_total_bytes) -> str:
    cm = spec.configuration_manager
    target, source = plans_target_gb(spec.plans)
    total = total_bytes(device)
    if total is not None:
        d = decide_cap(total, target if target is not None else total / GB, source)
        fit_gb, card = d.max_fit_gb, f"this {d.total_gb:.1f} GB card"
    else:
        fit_gb, card = (target or 8.0) / 2, "this device"
    planned = f"{target:g} GB ({source})" if target is not None else "an unknown target"
    return (f"CUDA out of memory in the first training step: plans {spec.plans_identifier} / {spec.configuration} "
            f"(batch {cm.batch_size}, patch {'x'.join(map(str, cm.patch_size))}) were made for {planned} and do not "
            f"fit {card}; make plans that fit with `{planner_command(spec.plans, spec.dataset_id, fit_gb)}` and "
            f"train with those --plans.")
