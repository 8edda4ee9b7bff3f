"""Stop cleanly on SIGTERM / SIGUSR1 / first Ctrl+C: finish the step, write last.ckpt, stop the workers.

Lightning already handles SIGTERM: its handler sets `trainer.received_sigterm`, the loop finishes
the current batch and raises `SIGTERMException`; under SLURM with auto-requeue its SIGUSR1
handler saves an hpc checkpoint and requeues the job. What it does not do, and this callback
adds: route SIGINT (first press; a second press interrupts at once) and SIGUSR1 outside SLURM to
that same SIGTERM path, and save the fold's `last.ckpt` at the current step when the loop stops
that way (the DataModule's `on_exception` then stops the augmenter workers).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class GracefulStop(pl.Callback):
    """Write `checkpoint_path` at the current step when a stop signal ends the fit.

    Args:
        checkpoint_path: where the stop checkpoint goes (the fold's last.ckpt, so --resume finds it).
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: int | None = None
        self.saved_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installed its SIGTERM handler in Trainer._run; ours forward to it.
        signals = [signal.SIGINT]
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            signals.append(signal.SIGUSR1)  # under SLURM, Lightning's requeue handler owns SIGUSR1
        for signum in signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: stop now
        self.received = signum
        rank_zero_info(f"Received {signal.Signals(signum).name}: finishing the current step, then saving "
                       f"{self.checkpoint_path} and stopping (press Ctrl+C again to stop immediately).")
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if callable(lightning_handler):
            lightning_handler(signal.SIGTERM, frame)  # sets trainer.received_sigterm (and tells DDP peers)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        rewind = getattr(trainer.train_dataloader, "rewind_to", None)
        if callable(rewind):  # the RNGs saved must be those of the first batch not trained on (undo any prefetch)
            rewind(int(trainer.fit_loop.epoch_loop.batch_progress.current.completed))
        trainer.save_checkpoint(self.checkpoint_path)
        self.saved_at_step = trainer.global_step
        rank_zero_info(f"Saved {self.checkpoint_path} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                       f"continue with --resume.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    def state_dict(self) -> dict[str, Any]:
        return {}
