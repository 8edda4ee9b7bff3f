"""`expandable_segments:True` for PyTorch's caching allocator, in effect for the run's memory.

torch parses its allocator settings once, at first use: CUDA initialisation, which in a Lightning fit is the
accelerator's `setup_device` (`torch.cuda.set_device`, in `strategy.setup_environment`, before any
`Callback.setup`). A `PYTORCH_CUDA_ALLOC_CONF` written after that is ignored. So the request is made early
(the CLI builds the memory-cap callback before the Trainer): into the environment variable torch reads, which
DDP ranks started by Lightning inherit too; if the settings were already parsed (CUDA up), through torch's
runtime setter, which applies to every segment allocated from then on. The user's own settings are kept.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Literal

import torch

#: torch 2.14 reads PYTORCH_CUDA_ALLOC_CONF when set, else PYTORCH_ALLOC_CONF (checked: both set, the first wins).
ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
KEY = "expandable_segments"


def value_of(conf: str, key: str) -> str | None:
    """The value of `key` in an allocator config string `k1:v1,k2:v2`, or None."""
    for item in conf.split(","):
        name, _, value = item.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def with_value(conf: str, key: str, value: str) -> str:
    """`conf` with `key:value` (replacing the key's value, or appended): the other settings are kept."""
    items = [item for item in conf.split(",") if item.strip() and item.partition(":")[0].strip() != key]
    return ",".join([*items, f"{key}:{value}"])


def current_settings() -> str | None:
    """torch's allocator settings; the first call parses the environment (CUDA initialisation does the same).
    None on torch builds without the accelerator getter (older than the 2.14 we test; pyproject admits 2.5)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return get() if get is not None else None


def set_settings(conf: str) -> None:
    """torch's runtime setter (`torch.cuda.memory._set_allocator_settings` is its deprecated alias, and the only
    one on older torch); it replaces the parsed settings, so pass the complete string."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(conf)


def request_expandable_segments(environ: MutableMapping[str, str] = os.environ
                                ) -> tuple[Literal["environment", "runtime", "kept"], str]:
    """Make the allocator use expandable segments. Returns how, and the user's conflicting value ("kept": their
    explicit `expandable_segments:<not True>` in the environment stands)."""
    name = next((n for n in ENV_NAMES if n in environ), ENV_NAMES[0])
    conf = environ.get(name, "")
    own = value_of(conf, KEY)
    if own is not None and own.lower() != "true":
        return "kept", f"{name}={conf}"
    environ[name] = with_value(conf, KEY, "True") if own is None else conf
    settings = current_settings()  # parses the environment just written, unless torch already has (CUDA up)
    if settings is None:  # no getter: the variable is read at CUDA initialisation, so it is in time until then
        if not torch.cuda.is_initialized():
            return "environment", ""
        settings = conf  # what torch read at CUDA initialisation
    if (value_of(settings, KEY) or "").lower() == "true":
        return "environment", ""
    set_settings(with_value(settings, KEY, "True"))
    return "runtime", ""
