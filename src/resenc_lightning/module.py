"""nnUNetTrainer's model-side recipe as a LightningModule.

Network, loss, optimizer, PolyLR, pseudo-Dice and its EMA, exactly as nnU-Net does them; Lightning
owns the loop, precision (fp16 autocast + GradScaler = `16-mixed`), gradient clipping (norm 12),
DDP and checkpointing. This module knows nothing about files: it gets a resolved `RunSpec`.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from resenc_lightning import recipe
from resenc_lightning.plans import RunSpec

#: nnU-Net's per-epoch logging lists (nnunetv2 LocalLogger), kept for export and progress.png.
NNUNET_LOG_KEYS = (
    "mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
    "epoch_start_timestamps", "epoch_end_timestamps",
)


class ResEncUNetModule(pl.LightningModule):
    """ResidualEncoderUNet trained with nnU-Net's loss, optimizer, schedule and online pseudo-Dice.

    Args:
        spec: the resolved run (linked from the DataModule by the CLI).
        initial_lr: SGD learning rate at epoch 0 (nnU-Net: 1e-2).
        weight_decay: SGD weight decay (nnU-Net: 3e-5).
        momentum: SGD momentum, Nesterov (nnU-Net: 0.99).
        num_epochs: length of the PolyLR schedule; None = trainer.max_epochs (nnU-Net: 1000).
        poly_exponent: PolyLR exponent (nnU-Net: 0.9).
        enable_deep_supervision: deep supervision with nnU-Net's weights.
        compile: torch.compile the network and the Dice loss; None follows nnU-Net (on for CUDA unless
            nnUNet_compile=f).
        channels_last: channels-last (NDHWC) memory format for network and inputs.
        ema_momentum: weight of the previous EMA pseudo-Dice (nnU-Net: 0.9; the new value gets 1 - it, in decimal).
        print_epoch_summary: print nnU-Net's per-epoch line (train/val loss, pseudo-Dice, EMA, LR, epoch time).
    """

    def __init__(
        self,
        spec: Any = None,
        initial_lr: float = 1e-2,
        weight_decay: float = 3e-5,
        momentum: float = 0.99,
        num_epochs: int | None = None,
        poly_exponent: float = 0.9,
        enable_deep_supervision: bool = True,
        compile: bool | None = None,
        channels_last: bool = False,
        ema_momentum: float = 0.9,
        print_epoch_summary: bool = True,
    ) -> None:
        super().__init__()
        if spec is None:
            raise ValueError("ResEncUNetModule needs a RunSpec (the CLI links it from the DataModule).")
        self.save_hyperparameters(ignore=["spec"])
        self.spec: RunSpec = spec
        # compile and DDP are only known on the device: configure_model rebuilds view and loss there
        self.view = recipe.trainer_view(spec, enable_deep_supervision=enable_deep_supervision,
                                        compile_network=False)
        self.network = recipe.build_network(self.view)
        self.loss = recipe.build_loss(self.view)
        self.label_manager = self.view.label_manager
        self.aug = recipe.augmentation_params(self.view)
        self.ema_fg_dice: float | None = None
        self.best_ema: float | None = None
        self.nnunet_log: dict[str, list] = {k: [] for k in NNUNET_LOG_KEYS}
        self._train_losses: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []  # per step [loss, tp..., fp..., fn...], on the device until epoch end
        self._epoch_metrics: dict[str, float] | None = None
        self._epoch_start = time.time()

    # -- properties the callbacks and the CLI use ---------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.view.configuration_manager.patch_size)

    @property
    def num_input_channels(self) -> int:
        return recipe.num_input_channels(self.view)

    @property
    def inference_allowed_mirroring_axes(self) -> tuple[int, ...]:
        return self.aug.mirror_axes

    def schedule_length(self) -> int:
        if self.hparams.num_epochs is not None:
            return int(self.hparams.num_epochs)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        return int(max_epochs) if max_epochs and max_epochs > 0 else 1000

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Decide compile against the device training runs on, then build the loss and compile as nnU-Net does.

        Lightning calls this after the process group is up and before the module is moved, so the device is the
        strategy's root device, not `self.device` (still the CPU here). nnUNetTrainer._build_loss compiles the
        Dice part of the loss with the network and picks the last deep-supervision weight from is_ddp and compile
        (1e-6 under DDP without compile, else 0); building the loss from the same view keeps both decisions its.
        The network is compiled in place (`nn.Module.compile`), so state_dict keys stay nnU-Net's `network.*`.
        """
        if self.hparams.channels_last:
            self.network = self.network.to(memory_format=_channels_last(len(self.patch_size)))
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        self.view = recipe.trainer_view(self.spec, device=device,
                                        enable_deep_supervision=self.hparams.enable_deep_supervision,
                                        compile_network=self.hparams.compile)
        self.loss = recipe.build_loss(self.view)
        if self.view._do_i_compile():
            self.network.compile()

    def forward(self, x: torch.Tensor):
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=_channels_last(x.ndim - 2))
        return self.network(x)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), lr=self.hparams.initial_lr,
                                    weight_decay=self.hparams.weight_decay, momentum=self.hparams.momentum,
                                    nesterov=True)
        scheduler = PolyLRScheduler(optimizer, self.hparams.initial_lr, self.schedule_length(),
                                    self.hparams.poly_exponent)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """No-op: nnU-Net sets the LR at the *start* of each epoch from the epoch index (see below)."""

    # -- training ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """One deep-supervision flag for network, loss and targets (the CLI links the DataModule's to ours)."""
        data_ds = getattr(self.trainer.datamodule, "enable_deep_supervision", self.hparams.enable_deep_supervision)
        if bool(data_ds) != bool(self.hparams.enable_deep_supervision):
            raise ValueError(f"the DataModule's enable_deep_supervision={data_ds} differs from the model's "
                             f"{self.hparams.enable_deep_supervision}; set --model.enable_deep_supervision only.")

    def on_train_epoch_start(self) -> None:
        scheduler = self.lr_schedulers()
        # nnU-Net rebuilds PolyLR from the current num_epochs and never restores its state; Lightning restores
        # the scheduler's saved state (incl. the old length) on resume, so re-apply ours before stepping.
        scheduler.initial_lr = self.hparams.initial_lr
        scheduler.max_steps = self.schedule_length()
        scheduler.exponent = self.hparams.poly_exponent
        scheduler.step(self.current_epoch)
        self._train_losses = []
        self._epoch_start = time.time()
        self._record("lrs", float(self.optimizers().param_groups[0]["lr"]))
        self._record("epoch_start_timestamps", self._epoch_start)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self(batch["data"])
        loss = self.loss(output, batch["target"])
        self._train_losses.append(loss.detach())
        return loss

    # -- validation (nnUNetTrainer.validation_step) ----------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        data, target = batch["data"], batch["target"]
        output = self(data)
        loss = self.loss(output, target)
        if self.hparams.enable_deep_supervision:
            output, target = output[0], target[0]
        tp, fp, fn = _tp_fp_fn(output, target, self.label_manager)
        # No .cpu() here (nnU-Net syncs every step): one float32 row per step, copied to the host at epoch end.
        self._val.append(torch.cat([loss.detach().float().reshape(1), tp, fp, fn]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val:
            return
        rows = torch.stack(self._val)  # (steps, 1 + 3 classes): loss, tp, fp, fn, float32
        train = torch.stack(self._train_losses).float() if self._train_losses else rows.new_zeros(0)
        if self.trainer.world_size > 1:  # every rank runs the same number of steps
            rows, train = self.all_gather(rows), self.all_gather(train)
        else:
            rows, train = rows[None], train[None]
        # the epoch's only host-device sync for validation; then nnU-Net's float32 numpy arithmetic, bit for bit
        dice, mean_fg_dice, val_loss = nnunet_validation_figures(list(rows.cpu().numpy()))
        train_loss = float(nnunet_loss_mean(list(train.cpu().numpy()))) if train.numel() else 0.0
        self.ema_fg_dice = float(ema_update(self.ema_fg_dice, mean_fg_dice, self.hparams.ema_momentum))
        mean_fg_dice, val_loss = float(mean_fg_dice), float(val_loss)
        lr = float(self.optimizers().param_groups[0]["lr"])
        metrics = {"train_loss": train_loss, "val_loss": val_loss, "mean_fg_dice": mean_fg_dice,
                   "ema_fg_dice": self.ema_fg_dice, "lr": lr}
        metrics.update({f"dice/{name}": float(d) for name, d in zip(self.class_names(), dice)})
        self._epoch_metrics = metrics
        if self.best_ema is None or self.ema_fg_dice > self.best_ema:
            self.best_ema = self.ema_fg_dice
        self._record("mean_fg_dice", mean_fg_dice)
        self._record("ema_fg_dice", self.ema_fg_dice)
        self._record("dice_per_class_or_region", [float(d) for d in dice])
        self._record("train_losses", train_loss)
        self._record("val_losses", val_loss)
        self._record("epoch_end_timestamps", time.time())

    def _record(self, key: str, value: Any) -> None:
        """nnU-Net's one entry per epoch; an epoch restarted from a mid-epoch checkpoint (SLURM requeue, signal)
        replaces its entry instead of adding a second one."""
        entries = self.nnunet_log[key]
        del entries[self.current_epoch:]
        entries.append(value)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's figures once (one logger row per epoch, with the callbacks' timing/GPU figures)."""
        metrics = self._epoch_metrics or {}
        self._epoch_metrics = None
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if self.hparams.print_epoch_summary and metrics:
            dice = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in metrics.items() if k.startswith("dice/"))
            rank_zero_info(
                f"Epoch {self.current_epoch}/{self.trainer.max_epochs - 1}  train_loss {metrics['train_loss']:.4f}  "
                f"val_loss {metrics['val_loss']:.4f}  pseudo_dice [{dice}]  ema_pseudo_dice {metrics['ema_fg_dice']:.4f}  "
                f"lr {metrics['lr']:.6f}  epoch_time {time.time() - self._epoch_start:.1f}s"
            )

    def class_names(self) -> list[str]:
        """Foreground label (or region) names in the order of the pseudo-Dice vector."""
        return dice_names(self.spec.dataset_json["labels"], self.label_manager)

    # -- checkpoint state ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nnunet"] = self.spec.checkpoint_section(self.ema_fg_dice, self.best_ema, self.nnunet_log)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("nnunet", {})
        mismatch = self.spec.checkpoint_mismatch(state)
        if mismatch:
            raise ValueError(f"checkpoint was {mismatch}; resume with the same --dataset/--plans/--configuration/--fold "
                             f"or start a new run.")
        drop_compiled_duplicates(checkpoint.get("state_dict", {}))
        self.ema_fg_dice = state.get("ema_fg_dice")
        self.best_ema = state.get("best_ema")
        self.nnunet_log = state.get("logging", {k: [] for k in NNUNET_LOG_KEYS})


def nnunet_loss_mean(per_rank: list[np.ndarray]) -> np.floating:
    """nnU-Net's epoch loss: `np.vstack(per-rank per-step float32 losses).mean()` (one rank: `np.mean`)."""
    return np.vstack([np.ascontiguousarray(r.reshape(-1, 1)) for r in per_rank]).mean()


def nnunet_validation_figures(per_rank: list[np.ndarray]) -> tuple[np.ndarray, np.floating, np.floating]:
    """nnUNetTrainer.on_validation_epoch_end on per-rank (steps, 1 + 3 n) float32 rows [loss, tp, fp, fn]:
    per rank `np.sum(per-step, 0)`, then `np.vstack(ranks).sum(0)`, Dice per class and its nanmean, mean loss,
    all in float32 with nnU-Net's operations and shapes, so the values equal nnU-Net's bit for bit."""
    n = (per_rank[0].shape[1] - 1) // 3
    tp, fp, fn = (np.vstack([np.ascontiguousarray(r[:, 1 + i * n:1 + (i + 1) * n]).sum(axis=0)[None] for r in per_rank])
                  .sum(0) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * tp / (2 * tp + fp + fn)
    mean_fg_dice = np.nanmean(dice) if np.any(~np.isnan(dice)) else dice.dtype.type(np.nan)
    return dice, mean_fg_dice, nnunet_loss_mean([r[:, 0] for r in per_rank])


def ema_update(old: float | None, new: np.floating, momentum: float = 0.9) -> np.floating:
    """MetaLogger.log's EMA pseudo-Dice, `old * 0.9 + 0.1 * new`, literally at the default momentum: the new value's
    weight is the decimal complement of `momentum` (0.1, where 1 - 0.9 is 0.09999999999999998 in floats). Computed in
    the Dice's dtype as nnU-Net (float32); the previous EMA, kept as a Python float in checkpoints (which hold no
    numpy objects), is converted back to that dtype first, which is exact."""
    if old is None:
        return new
    if type(old) is float and isinstance(new, np.floating):
        old = type(new)(old)
    return old * momentum + float(1 - Decimal(repr(float(momentum)))) * new


def dice_names(labels: dict, label_manager) -> list[str]:
    """dataset.json names of the pseudo-Dice entries: `foreground_labels`, or for region-based datasets
    `foreground_regions` (LabelManager keeps the labels dict's order; a region may be a single int or a list)."""
    if not label_manager.has_regions:
        by_value = {int(v): k for k, v in labels.items() if not isinstance(v, (list, tuple)) and k != "ignore"}
        return [by_value.get(int(i), str(i)) for i in label_manager.foreground_labels]
    regions = list(label_manager.foreground_regions)
    names: list[str] = []
    for name, value in labels.items():  # walk in LabelManager's order, matching its regions one by one
        value = tuple(value) if isinstance(value, list) else value
        if name != "ignore" and len(names) < len(regions) and value == regions[len(names)]:
            names.append(name)
    return names + [str(r) for r in regions[len(names):]]


def drop_compiled_duplicates(state_dict: dict) -> dict:
    """Checkpoints of compiled runs written before the network was compiled in place also held every weight as
    `_forward_impl._orig_mod.*`: drop that copy so they still load strictly."""
    for key in [k for k in state_dict if k.startswith("_forward_impl.")]:
        del state_dict[key]
    return state_dict


def _channels_last(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _tp_fp_fn(output: torch.Tensor, target: torch.Tensor, label_manager) -> tuple[torch.Tensor, ...]:
    """nnUNetTrainer.validation_step's hard tp/fp/fn (background dropped for labels, ignore label masked), on the device."""
    axes = [0] + list(range(2, output.ndim))
    if label_manager.has_regions:
        predicted = (torch.sigmoid(output) > 0.5).long()
    else:
        seg = output.argmax(1)[:, None]
        predicted = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
        predicted.scatter_(1, seg, 1)
        del seg
    if label_manager.has_ignore_label:
        if not label_manager.has_regions:
            mask = (target != label_manager.ignore_label).float()
            target = target.clone()
            target[target == label_manager.ignore_label] = 0
        else:
            if target.dtype == torch.bool:
                mask = ~target[:, -1:]
            else:
                mask = 1 - target[:, -1:]
            target = target[:, :-1]
    else:
        mask = None
    tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=axes, mask=mask)
    tp, fp, fn = (t.detach().float() for t in (tp, fp, fn))
    if not label_manager.has_regions:
        tp, fp, fn = tp[1:], fp[1:], fn[1:]
    return tp, fp, fn
