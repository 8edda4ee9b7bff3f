"""Silence the third-party lines that say nothing about the user's run, one by one, by message and source.

A first run should print our lines, Lightning's progress and warnings that concern the run. Each filter here
matches one known message from one module (never a category or a whole library), so a new warning from the same
library still shows. The noise we can avoid at its source is avoided there instead (cli.py: an explicit seed,
`log_every_n_steps` fitted to short epochs, our one-line model summary; validation.py: the predictor told it runs
on the CPU).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

#: (message regex, module regex) of warnings that are about a library's internals, not the user's run.
WARNINGS: tuple[tuple[str, str], ...] = (
    # Lightning 2.6 calls torch's deprecated LeafSpec check internally (torch >= 2.10); nothing the user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # MONAI's own surface-distance helper passes the deprecated argument to itself (MONAI 1.5+).
    (r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy", r"monai\.utils\.deprecate_utils"),
    # Lightning's loader check on a mid-epoch resume: our epoch view of nnU-Net's augmenter yields exactly the
    # batches left (data.py, tested bit-identical in test_reliability.py), which Lightning cannot see.
    (r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
     r"lightning\.pytorch\.loops\.training_epoch_loop"),
)

#: Lightning's rank-zero loggers (lightning_utilities logs through whichever of the two was imported last).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLitloggerTip(logging.Filter):
    """Lightning's advertisement for its cloud logger, printed at every Trainer construction without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "logger_connector" and str(record.msg).startswith("💡 Tip:")
                    and "litlogger" in str(record.msg))


_TIP_FILTER = _DropLitloggerTip()


def resuming(checkpoint_dir: str | Path) -> None:
    """A resumed run writes into the checkpoint folder it resumes from; ModelCheckpoint's "exists and is not empty"
    says nothing then (a fresh run over checkpoints is refused before). Only for that folder."""
    warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(str(checkpoint_dir))} exists and is "
                                              f"not empty", module=r"lightning\.pytorch\.callbacks\.model_checkpoint")


def install() -> None:
    """Install the filters (idempotent); called by the CLI before anything imports or runs the noisy code."""
    for message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)
