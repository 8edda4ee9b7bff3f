"""The warm-up's steps are Lightning's steps: the same batch structure, call path, precision and grad mode.

A compiled network and Dice loss keep one graph per guard set (input dtypes and shapes, grad mode, inference
mode, DDP wrapping at first call). Whatever the warm-up does differently from the real steps costs a recompile
on the first real step, and a first compile outside ``DDP.forward`` is reused inside it without DDPOptimizer's
bucket split (no overlap of the gradient all-reduce with the backward). So the warm-up

* builds its batch with nnU-Net's own validation transforms (float32 data; int16 label targets or bool
  regions, one per deep-supervision scale), moves it like a batch and converts it with the precision plugin as
  Lightning's loops do (the device augmentation hook is not called: it would advance its random stream);
* calls ``strategy.training_step`` / ``strategy.validation_step``: the precision plugin's step contexts and,
  under DDP, the forward redirection through ``DDP.forward``; backward runs through DDP's reducer;
* runs validation under the grad mode Lightning's fit-time validation loop decides (its own
  ``_no_grad_context``: ``inference_mode`` or ``no_grad`` by backend and the loop's setting), on a batch copied
  under that mode as the loop's batch is (inference tensors under ``inference_mode``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loops.utilities import _no_grad_context
from lightning_utilities.core.apply_func import apply_to_collection

from resenc_lightning import recipe


def synthetic_batch(pl_module: pl.LightningModule, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
    """Random samples through nnU-Net's validation transforms, stacked as nnUNetDataLoader stacks them (CPU)."""
    view = pl_module.view
    lm = view.label_manager
    cascaded = bool(view.is_cascaded)
    patch = tuple(int(p) for p in pl_module.patch_size)
    image_channels = int(pl_module.num_input_channels) - (len(lm.foreground_labels) if cascaded else 0)
    labels = torch.tensor([int(v) for v in lm.all_labels], dtype=torch.int16)
    transforms = recipe.validation_transforms(view)
    data, targets = [], []
    for _ in range(batch_size):
        image = torch.randn((image_channels, *patch), generator=generator)
        seg = labels[torch.randint(len(labels), (1 + cascaded, *patch), generator=generator)]  # loader: int16
        sample = transforms(image=image, segmentation=seg)
        data.append(sample["image"].float())
        targets.append(sample["segmentation"])
    if isinstance(targets[0], list):
        target: Any = [torch.stack(scale) for scale in zip(*targets)]
    else:
        target = torch.stack(targets)
    return {"data": torch.stack(data), "target": target}


def on_device(trainer: pl.Trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as the loops hand it to a step: on the root device, converted by the precision plugin."""
    return trainer.precision_plugin.convert_input(move_data_to_device(batch, trainer.strategy.root_device))


def train_step(trainer: pl.Trainer, batch: dict[str, Any]) -> None:
    """Forward + loss through the strategy (DDP.forward under DDP), backward through DDP's reducer."""
    trainer.model.train()
    loss = trainer.strategy.training_step(batch, 0)
    loss.backward()


def validation_step(trainer: pl.Trainer, batch: dict[str, Any]) -> None:
    """The loop fetches and moves its batch under its grad mode: under inference_mode the step gets inference tensors,
    which dynamo guards on (their dispatch keys), so the warm-up's validation batch is copied under that mode too."""
    trainer.model.eval()

    def step() -> None:
        trainer.strategy.validation_step(apply_to_collection(batch, torch.Tensor, torch.clone), 0)

    as_validation_loop(trainer, step)


def as_validation_loop(trainer: pl.Trainer, fn: Callable[[], Any]) -> Any:
    """Run `fn` under the grad mode of the fit loop's validation (Lightning's own decision, not a copy of it)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    return _no_grad_context(lambda _loop: fn())(loop)
