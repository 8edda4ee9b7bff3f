"""Write nnU-Net's own fold folder next to the Lightning checkpoints, so nnU-Net's tools use our models.

`checkpoint_latest.pth` (every `latest_every` epochs while training, nnU-Net's `save_every`),
`checkpoint_best.pth` (new best EMA pseudo-Dice) and `checkpoint_final.pth` (end of training;
latest is then removed, as nnU-Net does) hold nnUNetTrainer's keys; `plans.json`, `dataset.json`
and `dataset_fingerprint.json` go one level up and `progress.png` (nnunetv2's own plot) into the
fold folder. `nnUNetv2_predict` and `nnUNetv2_predict_from_modelfolder` then work unchanged. The
checkpoints name `nnUNetTrainer` as their trainer class: the predictor only uses it to rebuild the
network, which is the same class and call (`build_network_architecture`) we train with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from resenc_lightning.atomic import atomic_copy, atomic_save
from resenc_lightning.background_io import background_io

NNUNET_TRAINER_CLASS = "nnUNetTrainer"


class NnUNetExport(pl.Callback):
    """nnU-Net-format checkpoints, plans/dataset JSONs and progress.png in the fold folder (rank 0 only).

    Args:
        enabled: switch the export off.
        trainer_class_name: nnU-Net trainer class named in the checkpoints (used by nnU-Net's predictor
            to rebuild the network); `nnUNetTrainer` builds exactly our network.
        write_latest: write checkpoint_latest.pth while training.
        latest_every: write it every N epochs, except the last, as nnU-Net does with save_every (the CLI links
            --save_every here). Our own resume point, checkpoints/last.ckpt, is written every epoch regardless.
        plot_progress: write nnU-Net's progress.png every epoch.
    """

    def __init__(self, enabled: bool = True, trainer_class_name: str = NNUNET_TRAINER_CLASS,
                 write_latest: bool = True, latest_every: int = 50, plot_progress: bool = True) -> None:
        self.enabled = enabled
        self.trainer_class_name = trainer_class_name
        self.write_latest = write_latest
        self.latest_every = latest_every
        self.plot_progress = plot_progress
        self._exported_best: float | None = None

    @staticmethod
    def _fold_folder(pl_module: pl.LightningModule) -> Path:
        return Path(pl_module.spec.output_folder)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        spec = pl_module.spec
        fold = self._fold_folder(pl_module)
        fold.mkdir(parents=True, exist_ok=True)
        base = fold.parent
        for name, source in (("plans.json", spec.plans_file), ("dataset.json", spec.preprocessed_base / "dataset.json"),
                             ("dataset_fingerprint.json", spec.preprocessed_base / "dataset_fingerprint.json")):
            if Path(source).is_file():
                atomic_copy(source, base / name)

    def checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """nnUNetTrainer.save_checkpoint's dictionary, from our module and Lightning's optimizer/scaler."""
        spec = pl_module.spec
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return {
            "network_weights": {k: v.detach() for k, v in pl_module.network.state_dict().items()},
            "optimizer_state": trainer.optimizers[0].state_dict() if trainer.optimizers else None,
            "grad_scaler_state": scaler.state_dict() if scaler is not None else None,
            "logging": {k: list(v) for k, v in pl_module.nnunet_log.items()},
            "_best_ema": pl_module.best_ema,
            "current_epoch": trainer.current_epoch + 1,
            "init_args": {"plans": spec.plans, "configuration": spec.configuration, "fold": spec.fold,
                          "dataset_json": spec.dataset_json, "device": pl_module.device},
            "trainer_name": self.trainer_class_name,
            "inference_allowed_mirroring_axes": tuple(pl_module.inference_allowed_mirroring_axes),
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        fold = self._fold_folder(pl_module)
        ckpt = None
        epoch = trainer.current_epoch
        if self.write_latest and (epoch + 1) % max(1, self.latest_every) == 0 and epoch != trainer.max_epochs - 1:
            ckpt = self.checkpoint(trainer, pl_module)
            self._save(trainer, ckpt, fold / "checkpoint_latest.pth")
        best = pl_module.best_ema
        if best is not None and (self._exported_best is None or best > self._exported_best):
            self._save(trainer, ckpt or self.checkpoint(trainer, pl_module), fold / "checkpoint_best.pth")
            self._exported_best = best
            rank_zero_info(f"nnU-Net export: new best EMA pseudo Dice {best:.4f} -> checkpoint_best.pth")
        if self.plot_progress:
            self._plot(pl_module, fold)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        fold = self._fold_folder(pl_module)
        ckpt = self.checkpoint(trainer, pl_module)
        ckpt["current_epoch"] = trainer.current_epoch  # the loop already advanced past the last epoch
        self._save(trainer, ckpt, fold / "checkpoint_final.pth")
        latest = fold / "checkpoint_latest.pth"
        io = background_io(trainer)
        if io is not None:  # only once checkpoint_final.pth is complete
            io.then(lambda: latest.unlink(missing_ok=True), self._boundary(trainer))
        else:
            latest.unlink(missing_ok=True)

    @staticmethod
    def _boundary(trainer: pl.Trainer) -> tuple[int, int]:
        """The key Lightning's own checkpoint of this moment has (its "epoch" and "global_step")."""
        return trainer.current_epoch, trainer.global_step

    def _save(self, trainer: pl.Trainer, ckpt: dict[str, Any], path: Path) -> None:
        """Off the training thread from the boundary's host snapshot when the background writer is in use."""
        io = background_io(trainer)
        if io is not None:
            io.save_derived(ckpt, path, self._boundary(trainer))
        else:
            ckpt["network_weights"] = {k: v.cpu() for k, v in ckpt["network_weights"].items()}
            atomic_save(ckpt, path)

    @staticmethod
    def _plot(pl_module: pl.LightningModule, fold: Path) -> None:
        from nnunetv2.training.logging.nnunet_logger import LocalLogger

        log = pl_module.nnunet_log
        n = min(len(v) for v in log.values())
        if n == 0:
            return
        logger = LocalLogger()
        logger.my_fantastic_logging = {k: list(v[:n]) for k, v in log.items()}
        try:
            logger.plot_progress_png(str(fold))
        except Exception as e:  # a plotting backend problem must never stop training
            rank_zero_info(f"nnU-Net export: progress.png not written ({e}).")

    def state_dict(self) -> dict[str, Any]:
        return {"exported_best": self._exported_best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._exported_best = state_dict.get("exported_best")

    @staticmethod
    def state_continuing_best(best_ema: float) -> dict[str, Any]:
        """The state of an export that already wrote checkpoint_best.pth at `best_ema` (a native run's `_best_ema`,
        imported by --resume_from_nnunet): it then writes a new best only when the EMA beats it, as nnU-Net does."""
        return {"exported_best": float(best_ema)}
