"""One plain line per epoch with nnU-Net's figures, like nnUNetTrainer prints them.

Progress bars vanish in logs (SLURM, CI); this line does not: train loss, val loss, pseudo-Dice
per class, EMA pseudo-Dice, LR and epoch time, from the metrics the module logged.
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


class EpochReport(pl.Callback):
    """Prints `Epoch k/N  train_loss ...  val_loss ...  dice [..]  ema ...  lr ...  time ...s` each epoch."""

    def __init__(self) -> None:
        self._start = 0.0
        self.last_line = ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if "train_loss" not in m:
            return
        dice = [f"{k.split('/', 1)[1]} {_fmt(v)}" for k, v in m.items() if k.startswith("dice/")]
        self.last_line = (
            f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}  train_loss {_fmt(m.get('train_loss'))}  "
            f"val_loss {_fmt(m.get('val_loss'))}  pseudo_dice [{', '.join(dice)}]  "
            f"ema_pseudo_dice {_fmt(m.get('ema_fg_dice'))}  lr {m.get('lr', float('nan')):.6f}  "
            f"epoch_time {time.perf_counter() - self._start:.1f}s"
        )
        rank_zero_info(self.last_line)
