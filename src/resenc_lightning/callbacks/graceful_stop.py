"""Stop cleanly on SIGTERM / SIGUSR1 / first Ctrl+C: finish the step, write last.ckpt, stop the workers.

Lightning already handles SIGTERM: its handler sets `trainer.received_sigterm`, the loop finishes
the current batch and raises `SIGTERMException`. What it does not do, and this callback adds: route
SIGINT (first press; a second press interrupts at once) and SIGUSR1 outside SLURM to that same
SIGTERM path, and save the fold's `last.ckpt` at the current step when the loop stops that way (the
DataModule's `on_exception` then stops the augmenter workers).

Under SLURM with auto-requeue, Lightning's requeue-signal handler saves the hpc checkpoint inside the
signal handler: mid-step, and on several ranks a collective (our RNG gather) issued from a handler at
a different point on each rank. Ours only sets a flag; at the end of each training step the ranks
agree (any rank signalled: SLURM signals every rank, not necessarily within the same step), stop after
that step on every rank, and run Lightning's own requeue routine (save `hpc_ckpt_N.ckpt`, `scontrol
requeue`) from there. `scontrol requeue` ends the job anyway; the requeued job resumes from the file.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


@runtime_checkable
class RewindableBatches(Protocol):
    """What GracefulStop asks of the train dataloader (data.EpochBatches has it): put the in-process RNG streams
    back to before batch `trained` of the epoch when that batch was prefetched but not trained on, so the RNG
    state saved with the stop checkpoint is that of the first batch the resumed run will draw."""

    def rewind_to(self, trained: int) -> None: ...


# -- The Lightning internals this callback needs (lightning 2.6; tests/test_slurm_requeue.py and test_faults.py
#    exercise each). Lightning has no public API for them: its SIGTERM/requeue handling lives in private connectors.
def slurm_auto_requeue_signal(trainer: pl.Trainer) -> int | None:
    """The requeue signal when Lightning's SLURM environment will requeue the job, else None."""
    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        return int(env.requeue_signal or signal.SIGUSR1)
    return None


def request_stop_after_step(trainer: pl.Trainer) -> None:
    """What Lightning's SIGTERM handler sets: the loop finishes this step, then raises SIGTERMException."""
    trainer._signal_connector.received_sigterm = True


def requeue_now(trainer: pl.Trainer, signum: int) -> Path:
    """Lightning's own requeue routine (save hpc_ckpt_N.ckpt, `scontrol requeue`); returns the hpc path."""
    path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
    return path


class GracefulStop(pl.Callback):
    """Write `checkpoint_path` at the current step when a stop signal ends the fit.

    Args:
        checkpoint_path: where the stop checkpoint goes (the fold's last.ckpt, so --resume finds it).
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: int | None = None
        self.saved_at_step: int | None = None
        self.saved_to: Path | None = None
        self.requeue_signal: int | None = None  # SLURM auto-requeue: the signal we defer to a step boundary
        self.stop_pending = False  # the requeue signal arrived on this rank and is not yet acted on
        self.requeue = False  # the ranks agreed: stop after this step, save the hpc checkpoint, requeue
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installed its SIGTERM (and SLURM requeue) handlers in Trainer._run; ours forward to / replace them.
        handlers = {signal.SIGINT: self._handle}
        self.requeue_signal = slurm_auto_requeue_signal(trainer)
        if self.requeue_signal is not None:
            handlers[self.requeue_signal] = self._handle_requeue
        else:
            handlers[signal.SIGUSR1] = self._handle
        for signum, handler in handlers.items():
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave signals (and Lightning's requeue handler) alone
                self.requeue_signal = None

    def _handle_requeue(self, signum: int, frame: FrameType | None) -> None:
        self.stop_pending = True  # only a flag: no I/O and no collective inside a signal handler

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.requeue_signal is None or self.requeue:
            return
        # A collective at the same point on every rank, every step (only under SLURM auto-requeue).
        agreed = trainer.strategy.reduce_boolean_decision(self.stop_pending, all=False)
        # On an epoch's last batch the loop would validate before stopping: act after the next step instead.
        if agreed and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.requeue = True
            self.received = self.requeue_signal
            rank_zero_info(f"Received the SLURM requeue signal: stopping after step {trainer.global_step} to save an "
                           f"hpc checkpoint and requeue the job.")
            request_stop_after_step(trainer)  # -> SIGTERMException after this step -> on_exception

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
        batches = trainer.train_dataloader
        if isinstance(batches, RewindableBatches):  # the RNGs saved must be the first untrained batch's (undo prefetch)
            batches.rewind_to(int(trainer.fit_loop.epoch_loop.batch_progress.current.completed))
        self.saved_at_step = trainer.global_step
        if self.requeue:  # Lightning's requeue routine, now at a step boundary on every rank
            self.saved_to = requeue_now(trainer, self.requeue_signal)
            rank_zero_info(f"Saved {self.saved_to} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                           f"the requeued job resumes from it.")
            return
        trainer.save_checkpoint(self.checkpoint_path)
        self.saved_to = self.checkpoint_path
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
