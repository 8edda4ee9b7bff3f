"""Stop cleanly on SIGTERM / SIGUSR1 / first Ctrl+C / the SLURM requeue signal: every rank finishes the same step
(or validation), writes last.ckpt (or the hpc checkpoint and requeues), and stops the workers.

The signal handlers only set a flag (stop_signals.py): a handler runs at an arbitrary point of the main thread,
on each rank at a different one, so it must not save, print or issue a collective. This callback acts on the
flag at boundaries every rank reaches in the same order: the end of each training step and the end of each
validation (its last batch; an epoch's last step defers to it, so no checkpoint is taken mid-validation). There
the ranks agree (a max all-reduce of what each was asked: SLURM, Ctrl+C or `kill` may signal one
rank, some, or all, not necessarily within the same step); if any rank was signalled, every rank sets Lightning's
`received_sigterm` at the same boundary, so Lightning's SIGTERM path (its per-batch broadcast, SIGTERMException
after this batch) runs identically on all ranks, and `on_exception` saves with everyone present. A requeue request
runs Lightning's requeue routine (hpc_ckpt_N.ckpt, `scontrol requeue`) from there instead of its handler.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from resenc_lightning.background_io import background_io
from resenc_lightning.stop_signals import REQUEUE_OFFSET, StopSignals


@runtime_checkable
class RewindableBatches(Protocol):
    """What GracefulStop asks of the train dataloader (data.EpochBatches has it): put the in-process RNG streams
    back to before batch `trained` of the epoch when that batch was prefetched but not trained on, so the RNG
    state saved with the stop checkpoint is that of the first batch the resumed run will draw."""

    def rewind_to(self, trained: int) -> None: ...


# -- The Lightning internals this callback needs (lightning 2.6; tests/test_slurm_requeue.py, test_experiment_slurm.py
#    and test_faults.py exercise each). Lightning has no public API for them: its SIGTERM/requeue handling lives in
#    private connectors.
def request_stop_after_step(trainer: pl.Trainer) -> None:
    """What Lightning's SIGTERM handler sets: the loop finishes this step, then raises SIGTERMException."""
    trainer._signal_connector.received_sigterm = True


def requeue_now(trainer: pl.Trainer, signum: int) -> Path:
    """Lightning's own requeue routine (save hpc_ckpt_N.ckpt, `scontrol requeue`); returns the hpc path."""
    path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
    return path


class GracefulStop(pl.Callback):
    """Agree on a stop at each step end and validation end; write `checkpoint_path` at the stop.

    Args:
        checkpoint_path: where the stop checkpoint goes (the fold's last.ckpt, so --resume finds it).
        signals: this process's flag-only handlers (installed by the CLI before the fit starts).
    """

    def __init__(self, checkpoint_path: str | Path, signals: StopSignals | None = None) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signals = signals if signals is not None else StopSignals()
        self.received: int | None = None  # the agreed signal (the same on every rank)
        self.requeue = False  # the ranks agreed: save the hpc checkpoint and requeue
        self.saved_at_step: int | None = None
        self.saved_to: Path | None = None

    @property
    def stop_pending(self) -> bool:
        """This rank was signalled (not yet agreed): the test-only pause hook ends its pause on it."""
        return self.signals.received is not None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._agree(trainer)
        # On an epoch's last batch Lightning validates next: stop after that validation (see on_validation_batch_end)
        if self.received is not None and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            request_stop_after_step(trainer)  # Lightning raises SIGTERMException after this step -> on_exception

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # A signal during validation stops after its last batch: a checkpoint taken mid-validation would resume
        # without this epoch's validation (Lightning skips it), losing nnU-Net's pseudo-Dice/EMA entry for the epoch.
        if trainer.sanity_checking or not trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch:
            return
        self._agree(trainer)
        if self.received is not None:
            request_stop_after_step(trainer)  # SIGTERMException once the validation has ended

    def _agree(self, trainer: pl.Trainer) -> None:
        """The ranks agree whether any was signalled (one max all-reduce, at the same boundary on every rank)."""
        if self.received is not None:
            return
        code = self.signals.code()
        if trainer.world_size > 1:
            agreed = torch.tensor(code, dtype=torch.int64, device=trainer.strategy.root_device)
            code = int(trainer.strategy.reduce(agreed, reduce_op="max").item())
        if code == 0:
            return
        self.requeue = code > REQUEUE_OFFSET
        self.received = code - REQUEUE_OFFSET if self.requeue else code
        then = "save an hpc checkpoint and requeue the job" if self.requeue else f"save {self.checkpoint_path}"
        rank_zero_info(f"Received {signal.Signals(self.received).name} at step {trainer.global_step}: every rank stops "
                       f"at the next step or validation end to {then} (press Ctrl+C again to stop at once, without a "
                       f"checkpoint).")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if self.received is None and trainer.world_size == 1:  # one process: Lightning stopped on our flag at once
            self._agree(trainer)
        batches = trainer.train_dataloader
        if isinstance(batches, RewindableBatches):  # the RNGs saved must be the first untrained batch's (undo prefetch)
            batches.rewind_to(int(trainer.fit_loop.epoch_loop.batch_progress.current.completed))
        self.saved_at_step = trainer.global_step
        with self._writes_done_first(trainer):  # pending background writes finish; the stop checkpoint is written
            if self.requeue:  # Lightning's requeue routine, at a boundary on every rank, outside any handler
                self.saved_to = requeue_now(trainer, self.received)  # before `scontrol requeue` runs
                rank_zero_info(f"Saved {self.saved_to} at epoch {trainer.current_epoch}, step "
                               f"{trainer.global_step}; the requeued job resumes from it.")
                return
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # a full checkpoint, said explicitly
        self.saved_to = self.checkpoint_path
        rank_zero_info(f"Saved {self.checkpoint_path} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                       f"continue with --resume.")

    @staticmethod
    @contextmanager
    def _writes_done_first(trainer: pl.Trainer) -> Iterator[None]:
        """Background checkpoint writes still pending finish first, then the stop checkpoint is written on this
        thread: the process exits (or SLURM requeues it) only with every file complete."""
        io = background_io(trainer)
        if io is None:
            yield
            return
        with io.synchronous("Waiting for pending checkpoint writes before stopping."):
            yield

    def state_dict(self) -> dict[str, Any]:
        return {}
