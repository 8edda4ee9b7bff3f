"""Test-only callback: what each DDP rank saw (batch split, cases, local tp/fp/fn, the loss's DDP flags).

Loaded by the DDP test through `--trainer.callbacks` in the `python train.py` subprocesses; each rank
writes `rank<N>.json` into `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch


class RankJson(pl.Callback):
    """Writes this rank's `record` to `out_dir/rank<N>.json` at each epoch end and at the fit's end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class DDPProbe(RankJson):
    def __init__(self, out_dir: str) -> None:
        super().__init__(out_dir)
        self.record = {"train_keys": [], "val_stats": {}, "logged": {}}

    def on_train_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        dice = pl_module.loss.loss.dc
        self.record.update(
            rank=trainer.global_rank, world_size=trainer.world_size, batch_size=dm.batch_size,
            oversample=dm.rank_oversample, loss_ddp=bool(dice.ddp),
            ds_weights=[float(w) for w in pl_module.loss.weight_factors],
            rng_digest=hashlib.sha1(np.random.get_state()[1].tobytes()
                                    + torch.get_rng_state().numpy().tobytes()).hexdigest(),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["train_keys"].append([str(k) for k in batch["keys"]])
        self.record.setdefault("train_batch_sizes", []).append(int(batch["data"].shape[0]))

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """This rank's hard tp/fp/fn of the batch, recomputed independently of the module's accumulation."""
        out = pl_module(batch["data"])[0]
        target = batch["target"][0][:, 0].long()
        pred = out.argmax(1)
        stats = []
        for c in range(1, out.shape[1]):
            p, t = pred == c, target == c
            stats.append([float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())])
        epoch = str(trainer.current_epoch)
        acc = self.record["val_stats"].setdefault(epoch, np.zeros((out.shape[1] - 1, 3)).tolist())
        self.record["val_stats"][epoch] = (np.array(acc) + np.array(stats)).tolist()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        log = pl_module.nnunet_log  # nnU-Net's per-epoch lists, filled in on_validation_epoch_end
        self.record["logged"][str(trainer.current_epoch)] = {
            "mean_fg_dice": log["mean_fg_dice"][-1], "ema_fg_dice": log["ema_fg_dice"][-1],
            "dice": log["dice_per_class_or_region"][-1],
        }
        self._write(trainer)
