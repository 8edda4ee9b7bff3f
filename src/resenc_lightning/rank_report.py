"""Messages of the stable-epoch callbacks, from every rank.

Under DDP each rank has its own GPU, memory picture and cuDNN choice, so a slow or crowded GPU on
rank 3 must be reported by rank 3 (Lightning's `rank_zero_*` would hide it). With more than one
process each message carries Lightning's `[rank: N]` prefix; single-process output is unchanged.
"""

from __future__ import annotations

import logging
import warnings

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_prefixed_message

#: a child of Lightning's console logger, so messages look like Lightning's own info lines
log = logging.getLogger("lightning.pytorch.resenc_lightning")


def _prefixed(message: str) -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return rank_prefixed_message(message, dist.get_rank())
    return message


def info(message: str) -> None:
    log.info(_prefixed(message))


def warn(message: str) -> None:
    warnings.warn(_prefixed(message), UserWarning, stacklevel=2)
