"""Start from native nnU-Net checkpoints: `--init_from_nnunet` (pretrained weights, for fine-tuning).

Same rule as nnunetv2's `load_pretrained_weights` (every key but the `.seg_layers.` must exist with
the same shape; segmentation heads keep their fresh init, so a different label set works), except
that the file is always loaded on the CPU first: nnunetv2 loads it onto the device it was saved
from, which puts a GPU-sized checkpoint on the GPU before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from resenc_lightning.atomic import atomic_save

SKIP_IN_PRETRAINED = (".seg_layers.",)


class NnUNetImportError(ValueError):
    pass


def load_native_checkpoint(path: str | Path, flag: str = "--init_from_nnunet") -> dict:
    path = Path(path)
    if not path.is_file():
        raise NnUNetImportError(f"{flag} {path} does not exist; pass an nnU-Net checkpoint_*.pth file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise NnUNetImportError(f"{path} has no 'network_weights'; it is not an nnU-Net checkpoint_*.pth file.")
    return checkpoint


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def init_from_nnunet(network: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy matching weights from a native checkpoint into `network`; returns the keys copied."""
    pretrained = {_strip(k): v for k, v in load_native_checkpoint(path)["network_weights"].items()}
    own = network.state_dict()
    for key, value in own.items():
        if any(s in key for s in SKIP_IN_PRETRAINED):
            continue
        if key not in pretrained:
            raise NnUNetImportError(f"{path} lacks weight {key!r}: it was trained with another architecture; use "
                                    f"the plans/configuration it was trained with.")
        if tuple(pretrained[key].shape) != tuple(value.shape):
            raise NnUNetImportError(f"{path}: weight {key!r} has shape {tuple(pretrained[key].shape)}, this network "
                                    f"{tuple(value.shape)}; use the plans/configuration it was trained with.")
    copied = [k for k in own if k in pretrained and not any(s in k for s in SKIP_IN_PRETRAINED)]
    own.update({k: pretrained[k].to(own[k].dtype) for k in copied})
    network.load_state_dict(own)
    return copied


def lightning_checkpoint_from_native(native: dict, trainer, model, num_iterations: int,
                                     num_val_iterations: int) -> dict:
    """A Lightning checkpoint that continues a native nnU-Net run where it stopped.

    nnU-Net's `current_epoch` is the next epoch to run; the loop counters are set as Lightning
    leaves them when it checkpoints at the end of epoch `current_epoch - 1`. Weights, optimizer
    (momentum), grad scaler, EMA/best EMA and nnU-Net's logging lists carry over; the LR follows
    from the epoch, as in nnU-Net.
    """
    spec = model.spec
    args = native.get("init_args", {})
    theirs = (args.get("plans", {}).get("plans_name"), args.get("configuration"))
    ours = (spec.plans_identifier, spec.configuration)
    if None not in theirs and theirs != ours:
        raise NnUNetImportError(f"the nnU-Net checkpoint was trained with {theirs[0]}/{theirs[1]}, this run is "
                                f"{ours[0]}/{ours[1]}; pass the same --plans and --configuration.")
    done = int(native["current_epoch"])
    if done < 1:
        raise NnUNetImportError("the nnU-Net checkpoint has current_epoch 0: nothing to resume; use --init_from_nnunet.")
    weights = {_strip(k): v for k, v in native["network_weights"].items()}
    model.network.load_state_dict(weights, strict=True)
    steps = done * num_iterations
    loops = {"fit_loop": trainer.fit_loop.state_dict(), "validate_loop": trainer.validate_loop.state_dict(),
             "test_loop": trainer.test_loop.state_dict(), "predict_loop": trainer.predict_loop.state_dict()}
    fit = loops["fit_loop"]
    fit["epoch_loop.state_dict"]["_batches_that_stepped"] = steps
    _set_progress(fit["epoch_loop.batch_progress"], steps, num_iterations)
    fit["epoch_loop.batch_progress"]["is_last_batch"] = True
    _set_progress(fit["epoch_loop.scheduler_progress"], done, 1)
    optim = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    _set_progress(optim["step"], steps, num_iterations)
    _set_progress(optim["zero_grad"], steps, num_iterations)
    _set_progress(fit["epoch_loop.val_loop.batch_progress"], done * num_val_iterations, num_val_iterations)
    _set_progress(fit["epoch_progress"], done, done)
    for progress in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
        progress["completed"] = done - 1  # saved inside on_train_epoch_end, like our own last.ckpt
    logging = {k: _plain(list(v)) for k, v in native.get("logging", {}).items()}
    ema = logging.get("ema_fg_dice") or [None]
    best_ema = _plain(native.get("_best_ema"))
    optimizer = model.configure_optimizers()
    checkpoint = {
        "epoch": done - 1, "global_step": steps, "pytorch-lightning_version": _lightning_version(),
        "state_dict": model.state_dict(), "loops": loops,
        "callbacks": best_tracking_states(trainer, best_ema),
        "optimizer_states": [native["optimizer_state"]],
        "lr_schedulers": [optimizer["lr_scheduler"]["scheduler"].state_dict()],
        "nnunet": spec.checkpoint_section(ema[-1], best_ema, logging),
    }
    scaler_state = native.get("grad_scaler_state")
    if scaler_state is not None:
        checkpoint[type(trainer.precision_plugin).__qualname__] = scaler_state
    return checkpoint


@runtime_checkable
class ContinuesBest(Protocol):
    """A callback that tracks the best EMA pseudo-Dice and can start from a native run's best (NnUNetExport)."""

    state_key: str

    def state_continuing_best(self, best_ema: float) -> dict[str, Any]: ...


def best_tracking_states(trainer, best_ema: float | None) -> dict:
    """Callback states that continue the native run's best EMA pseudo-Dice (`_best_ema`): the `ema_fg_dice`
    ModelCheckpoint (best.ckpt) and the nnU-Net export (checkpoint_best.pth) then only write when the EMA beats it,
    as nnU-Net does after --c. The native best has no .ckpt here; its score stands for it under best.ckpt's name."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if best_ema is None:
        return {}
    states = {}
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor == "ema_fg_dice" and callback.mode == "max" \
                and callback.dirpath:
            score = torch.tensor(float(best_ema))
            path = callback.format_checkpoint_name({})
            state = callback.state_dict()
            state.update(best_model_score=score, best_model_path=path, current_score=score, best_k_models={path: score},
                         kth_best_model_path=path, kth_value=score)
            states[callback.state_key] = state
        elif isinstance(callback, ContinuesBest):  # NnUNetExport (checkpoint_best.pth)
            states[callback.state_key] = callback.state_continuing_best(best_ema)
    return states


def _plain(value: Any) -> Any:
    """nnU-Net logs numpy float32 scalars; our checkpoints hold plain Python values (loadable with weights_only=True).
    float32 -> float is exact, and the EMA arithmetic converts back to float32 (module.ema_update)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_progress(progress: dict, total: int, current: int) -> None:
    for key, value in (("total", total), ("current", current)):
        for field in progress[key]:
            progress[key][field] = value


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def import_native_run(path: str | Path, trainer, model, num_iterations: int, num_val_iterations: int,
                      checkpoint_dir: Path) -> Path:
    """--resume_from_nnunet: the native run as `checkpoint_dir/imported_from_nnunet.ckpt`, which the fit resumes from."""
    native = load_native_checkpoint(path, "--resume_from_nnunet")
    checkpoint = lightning_checkpoint_from_native(native, trainer, model, num_iterations, num_val_iterations)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoint_dir / "imported_from_nnunet.ckpt"
    atomic_save(checkpoint, target)
    print(f"Resuming the native nnU-Net run {path} at epoch {native['current_epoch']}", flush=True)
    return target
