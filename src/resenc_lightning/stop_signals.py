"""One rule for every stop signal: the handler only notes it; the ranks act on it together at a boundary.

SIGTERM, SIGINT (first press), SIGUSR1 and, under SLURM auto-requeue, the requeue signal all land in
`StopSignals._handle`, which records the signal and returns: no I/O, no collective, no re-signalling.
Lightning's own handlers are never installed (`FlagOnlySignalConnector` replaces its registration):
its SIGTERM handler broadcasts inside the handler and re-signals the child ranks, its requeue handler
saves a checkpoint inside the handler, and under DDP both issue collectives at a different point on
each rank. The flag is acted on by `callbacks/graceful_stop.py` (training and validation: the ranks
agree at every step / validation batch boundary) and `validation_stop.py` (the final validation).

A second Ctrl+C raises KeyboardInterrupt at once (Lightning's interrupt path: no checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

#: A requeue request outranks a plain stop when the ranks agree (SLURM signals every rank; one may also get SIGTERM).
REQUEUE_OFFSET = 1000


def slurm_auto_requeue_signal(trainer: pl.Trainer) -> int | None:
    """The requeue signal when Lightning's SLURM environment will requeue the job, else None."""
    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return int(env.requeue_signal or signal.SIGUSR1)
    return None


class StopSignals:
    """Flag-only handlers for this process, installed from the start of the fit until the end of the final validation."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal this process got
        self.requeue_signal: int | None = None
        self.requeue_requested = False
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def code(self) -> int:
        """What this rank asks for, as one number the ranks reduce with max: 0 nothing, a signal, or a requeue."""
        if self.requeue_requested and self.requeue_signal is not None:
            return REQUEUE_OFFSET + self.requeue_signal
        return int(self.received or 0)

    def install(self, requeue_signal: int | None = None) -> bool:
        """Replace the handlers (main thread only); False when already installed or not possible here."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.requeue_signal = requeue_signal
        for signum in {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, *([requeue_signal] if requeue_signal else [])}:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def restore(self) -> None:
        """Put back the handlers found at install (the very end: after the final validation, or on a stop)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # second Ctrl+C: stop now, without a checkpoint
        if signum == self.requeue_signal:
            self.requeue_requested = True
        if self.received is None:
            self.received = signum


class FlagOnlySignalConnector(_SignalConnector):
    """Lightning's signal connector minus its handlers: `received_sigterm` is set only once the ranks agreed, so
    Lightning's own per-batch broadcast of it and its SIGTERMException checks see the same value on every rank."""

    def __init__(self, trainer: pl.Trainer, signals: StopSignals) -> None:
        self.signals = signals
        self._agreed = False
        super().__init__(trainer)

    @property
    def received_sigterm(self) -> bool:  # type: ignore[override]
        """Agreed by the ranks. One process needs no agreement: Lightning's own checks act on its flag directly, except
        in validation or at an epoch's last batch, where GracefulStop stops after the validation (a checkpoint taken
        mid-validation resumes without that epoch's validation: Lightning skips it)."""
        if self._agreed:
            return True
        if self.trainer.world_size > 1 or self.signals.received is None:
            return False
        return not (self.trainer.validating or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:
        self._agreed = bool(value)

    def register_signal_handlers(self) -> None:  # Trainer._run: ours are in place already, keep the flag state
        self.signals.install(slurm_auto_requeue_signal(self.trainer))

    def teardown(self) -> None:  # fit's end: keep ours installed through the final validation
        pass


def install_on(trainer: pl.Trainer, signals: StopSignals) -> bool:
    """Put `signals` in charge of `trainer`'s stop signals; True when this call installed the handlers."""
    if not isinstance(trainer._signal_connector, FlagOnlySignalConnector):
        trainer._signal_connector = FlagOnlySignalConnector(trainer, signals)
    return signals.install(slurm_auto_requeue_signal(trainer))
