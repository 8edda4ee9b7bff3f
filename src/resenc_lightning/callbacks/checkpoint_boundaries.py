"""When background checkpoint writes start and when the training thread waits for them (background_io.py).

A boundary's saves are batched (one serialisation for last/best/epoch_NNNN) and submitted at the next hook after the
ModelCheckpoints ran: the next epoch's start, or the end of training. The end of training waits for every write
(checkpoint_final.pth is complete when the process exits 0) and, under DDP, every rank waits at a barrier until
rank 0's writes are done, so no rank reads or overwrites a file rank 0 is still writing.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from resenc_lightning.background_io import background_io


class CheckpointBoundaries(pl.Callback):
    """Submit each boundary's checkpoint writes; wait for them (all ranks) at the end of training."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (io := background_io(trainer)) is not None:
            io.flush()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wait_for_checkpoints(trainer, "Waiting for the checkpoint writes to finish before training ends.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        io = background_io(trainer)
        if io is not None and io.pending:
            try:
                io.wait()  # what was saved before the failure is still written completely
            except Exception as e:  # the failure in hand is the one to report; this one is said in a line
                rank_zero_warn(f"{e}")


def wait_for_checkpoints(trainer: pl.Trainer, note: str | None = None) -> None:
    """Rank 0 finishes every pending write; the other ranks wait for it (a barrier, the same call on every rank)."""
    io = background_io(trainer)
    if io is not None:
        io.wait(note)
    if trainer.world_size > 1:
        trainer.strategy.barrier("checkpoint_writes_done")
