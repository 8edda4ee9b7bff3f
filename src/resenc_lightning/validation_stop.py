"""A stop signal during the final validation: every rank abandons it promptly, none waits for a peer that left.

nnU-Net's `perform_actual_validation` gives each rank its own number of cases, so there is no boundary all
ranks pass together at which to agree with a collective (its `dist.barrier()` every 20 cases and at the end
is the only common point). Instead the ranks share the stop through the process group's key-value store,
which needs no matching call on the other ranks:

- a forward pre-hook on the network (every sliding-window patch) publishes this rank's flag to the store
  and raises `ValidationStopped` when any rank has published one;
- nnU-Net's barriers, for the duration, wait on the store instead (`_StopAwareDist`), so a rank that finished
  its cases does not block forever on a rank that stopped; they give way to a stop the same way.

Nothing is saved: training has finished and last.ckpt is complete, so the stop only abandons the
validation; `--resume` (training done: straight to the final validation) or `--validate_only` redoes it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module

STOP_KEY = "resenc_lightning/final_validation/stop"
_POLL_S = 0.01


class ValidationStopped(Exception):
    """The final validation was abandoned because of a stop signal (on this rank or another)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Stop:
    """This rank's view of the stop: its own flag, and (under DDP) every rank's via the store."""

    def __init__(self, local: Callable[[], int | None]) -> None:
        self.local = local
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.store = dist.distributed_c10d._get_default_store() if distributed else None
        self.world = dist.get_world_size() if distributed else 1

    def check(self) -> None:
        """Raise ValidationStopped when this rank or any other was signalled."""
        signum = self.local()
        if self.store is None:
            if signum is not None:
                raise ValidationStopped(signum)
            return
        try:
            if signum is not None:
                self.store.set(STOP_KEY, str(signum))
            elif self.store.check([STOP_KEY]):
                signum = int(self.store.get(STOP_KEY))
        except (RuntimeError, ValueError):  # the store's host (rank 0) has gone: it stopped, the job is ending
            signum = signum or int(signal.SIGTERM)
        if signum is not None:
            raise ValidationStopped(signum)


class _StopAwareDist:
    """torch.distributed for nnU-Net's validation, with `barrier` waiting on the store and giving way to a stop."""

    def __init__(self, stop: _Stop) -> None:
        self._stop = stop
        self._count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        store = self._stop.store
        if store is None:
            return
        self._count += 1
        key = f"resenc_lightning/final_validation/barrier{self._count}"
        store.add(key, 1)
        while True:
            self._stop.check()
            if int(store.add(key, 0)) >= self._stop.world:
                return
            time.sleep(_POLL_S)


@contextmanager
def _barriers_on_store(stop: _Stop) -> Iterator[None]:
    """nnU-Net's validation module sees `_StopAwareDist` as its `dist` for the duration."""
    original = nnunet_trainer_module.dist
    nnunet_trainer_module.dist = _StopAwareDist(stop)
    try:
        yield
    finally:
        nnunet_trainer_module.dist = original


@contextmanager
def stop_on_signal(network: torch.nn.Module, local: Callable[[], int | None]) -> Iterator[None]:
    """Around `run_final_validation`: abandon it (ValidationStopped on every rank) once any rank's `local()` is set.

    An error raised while this rank is signalled (e.g. nnU-Net's export workers, signalled too by a Ctrl+C to the
    process group, are found dead) is the stop as well."""
    stop = _Stop(local)
    handle = network.register_forward_pre_hook(lambda module, args: stop.check())
    try:
        with _barriers_on_store(stop):
            yield
        if local() is not None:  # this rank was signalled after its last forward: still a stop
            raise ValidationStopped(int(local()))
    except ValidationStopped:
        raise
    except Exception as error:
        signum = local()
        if signum is None:
            raise
        raise ValidationStopped(signum) from error
    finally:
        handle.remove()

