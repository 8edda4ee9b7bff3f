"""Start from native nnU-Net checkpoints: `--init_from_nnunet` (pretrained weights, for fine-tuning).

Same rule as nnunetv2's `load_pretrained_weights` (every key but the `.seg_layers.` must exist with
the same shape; segmentation heads keep their fresh init, so a different label set works), except
that the file is always loaded on the CPU first: nnunetv2 loads it onto the device it was saved
from, which puts a GPU-sized checkpoint on the GPU before training starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

SKIP_IN_PRETRAINED = (".seg_layers.",)


class NnUNetImportError(ValueError):
    pass


def load_native_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NnUNetImportError(f"--init_from_nnunet {path} does not exist; pass an nnU-Net checkpoint_*.pth file.")
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
