"""Which NVML device is torch's CUDA device: found by UUID, or from CUDA_VISIBLE_DEVICES where that is unambiguous.

A wrong card is worse than none: its memory and processes would be reported as ours. So where the mapping cannot be
established (a MIG instance NVML cannot single out, CUDA's default FASTEST_FIRST order on a machine with several GPUs,
a shortened UUID, an NVML error) the answer is "unknown" with the reason, never a guess.

- torch gives the device's UUID without a prefix; NVML names a full GPU `GPU-<uuid>` and a MIG instance `MIG-<uuid>`,
  so both are tried. If the UUID names a GPU in MIG mode (CUDA cannot run on such a GPU as a whole, so the device is
  one of its instances), its only instance is taken, else unknown.
- CUDA_VISIBLE_DEVICES may hold `GPU-`/`MIG-` UUIDs or indices. Indices count in CUDA_DEVICE_ORDER, NVML's in PCI
  bus order: they agree only with CUDA_DEVICE_ORDER=PCI_BUS_ID (or on a machine with one GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Located:
    """`handle`: NVML's handle of exactly torch's device (a MIG handle for a MIG instance), None when unknown;
    `parent`: the physical GPU's handle (clocks, temperature); `how`: how it was found, or why it is unknown."""

    handle: Any | None
    parent: Any | None
    how: str


def nvml_reason(exc: BaseException) -> str:
    """NVML's own words for an error ("Insufficient Permissions"), else the exception's type and text."""
    text = str(exc)
    return text if type(exc).__name__.startswith("NVMLError") and text else f"{type(exc).__name__}: {text}"


def _not_supported(nv: Any, exc: BaseException) -> bool:
    return isinstance(exc, AttributeError) or getattr(exc, "value", None) == getattr(nv, "NVML_ERROR_NOT_SUPPORTED", 3)


def _torch_uuid(torch_index: int) -> str | None:
    try:
        uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
    except Exception:
        return None
    return uuid or None


def _is_mig_handle(nv: Any, handle: Any) -> bool:
    try:
        return bool(nv.nvmlDeviceIsMigDeviceHandle(handle))
    except Exception:
        return False


def _mig_enabled(nv: Any, handle: Any) -> bool | None:
    """MIG mode of a full GPU: True, False, or None when NVML cannot say (other than "not supported": no MIG)."""
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(handle)
    except Exception as exc:
        return False if _not_supported(nv, exc) else None
    return current == getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1)


def _mig_instances(nv: Any, gpu: Any) -> list[Any]:
    found = []
    try:
        count = int(nv.nvmlDeviceGetMaxMigDeviceCount(gpu))
    except Exception:
        return []
    for i in range(count):
        try:
            found.append(nv.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i))
        except Exception:  # an empty slot is NVML_ERROR_NOT_FOUND
            continue
    return found


def _resolve(nv: Any, handle: Any, how: str) -> Located:
    """`handle` as found; a MIG instance gets its parent, a GPU in MIG mode is narrowed to its only instance."""
    if _is_mig_handle(nv, handle):
        try:
            parent = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        except Exception:
            parent = None
        return Located(handle, parent, f"{how} (a MIG instance)")
    if _mig_enabled(nv, handle):
        instances = _mig_instances(nv, handle)
        if len(instances) == 1:
            return Located(instances[0], handle, f"{how}, its only MIG instance")
        return Located(None, handle, f"unknown: {how} is a GPU in MIG mode with {len(instances) or 'no readable'} "
                                     f"instance(s) and NVML cannot tell which one torch uses")
    return Located(handle, handle, how)


def _by_uuid(nv: Any, uuid: str) -> tuple[Any | None, str]:
    candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    reason = ""
    for candidate in candidates:
        try:
            return nv.nvmlDeviceGetHandleByUUID(candidate), candidate
        except Exception as exc:
            reason = nvml_reason(exc)
    return None, reason


def locate(nv: Any, torch_index: int) -> Located:
    """The NVML device of torch's `cuda:torch_index`, or Located(None, ..., why) when it cannot be established."""
    uuid = _torch_uuid(torch_index)
    if uuid is not None:
        handle, found = _by_uuid(nv, uuid)
        if handle is not None:
            return _resolve(nv, handle, f"UUID {found}")
    return _from_visible_devices(nv, torch_index)


def _from_visible_devices(nv: Any, torch_index: int) -> Located:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = torch_index
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if torch_index >= len(entries):
            return Located(None, None, f"unknown: CUDA_VISIBLE_DEVICES={visible!r} has no entry {torch_index}")
        entry = entries[torch_index]
        if entry.startswith(("GPU-", "MIG-")):
            if entry.startswith("MIG-GPU-") or "/" in entry:
                return Located(None, None, f"unknown: CUDA_VISIBLE_DEVICES names {entry} in the old MIG syntax")
            handle, reason = _by_uuid(nv, entry)
            if handle is None:
                return Located(None, None, f"unknown: NVML does not find CUDA_VISIBLE_DEVICES' {entry} ({reason}; "
                                           f"a shortened UUID?)")
            return _resolve(nv, handle, f"UUID {entry}")
        if not entry.isdigit():
            return Located(None, None, f"unknown: CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a UUID")
        physical = int(entry)
    try:
        count: int | None = int(nv.nvmlDeviceGetCount())
    except Exception:
        count = None
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").strip().upper() or "FASTEST_FIRST"
    if order != "PCI_BUS_ID" and count != 1:
        return Located(None, None, f"unknown: CUDA_DEVICE_ORDER={order} numbers devices in an order NVML does not "
                                   f"know; set CUDA_DEVICE_ORDER=PCI_BUS_ID")
    if count is not None and physical >= count:
        return Located(None, None, f"unknown: CUDA device {physical} but NVML sees {count} GPU(s)")
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(physical)
    except Exception as exc:
        return Located(None, None, f"unknown: NVML device {physical} ({nvml_reason(exc)})")
    return _resolve(nv, handle, f"NVML index {physical}")
