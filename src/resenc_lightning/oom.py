"""Turn a CUDA out-of-memory in the first training step into the planner command that fits the card.

An OOM before the first optimizer step means the plans (batch x patch x network) are too big for
this GPU, not a leak: the fix is new plans, made with the memory-cap logic's target for this card.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from resenc_lightning.callbacks.memory_cap import decide_cap, planner_command, plans_target_gb
from resenc_lightning.plans import RunSpec


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
        d = decide_cap(total, target if target is not None else total / 1024**3, source)
        fit_gb, card = d.max_fit_gb, f"this {d.total_gb:.1f} GB card"
    else:
        fit_gb, card = (target or 8.0) / 2, "this device"
    planned = f"{target:g} GB ({source})" if target is not None else "an unknown target"
    return (f"CUDA out of memory in the first training step: plans {spec.plans_identifier} / {spec.configuration} "
            f"(batch {cm.batch_size}, patch {'x'.join(map(str, cm.patch_size))}) were made for {planned} and do not "
            f"fit {card}; make plans that fit with `{planner_command(spec.plans, spec.dataset_id, fit_gb)}` and "
            f"train with those --plans.")
