"""nnU-Net's recipe, taken from `nnUNetTrainer` itself rather than re-derived.

Several parts of the recipe exist only as methods of `nnUNetTrainer` (DS scales, loss, rotation /
mirroring / initial patch size, batch+oversample split under DDP, the split). Instantiating the
trainer would create folders, a log file and a W&B logger, so instead we call those methods
unbound on a small view object that carries exactly the attributes they read. Parity with nnU-Net
is therefore by construction; the tests check it against a real `nnUNetTrainer` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager, determine_num_input_channels

from resenc_lightning.cascade import previous_stage_folder
from resenc_lightning.plans import RunSpec


def trainer_view(
    spec: RunSpec,
    device: torch.device | str = "cpu",
    oversample_foreground_percent: float = 0.33,
    enable_deep_supervision: bool = True,
    compile_network: bool | None = None,
) -> SimpleNamespace:
    """An object with the attributes `nnUNetTrainer`'s recipe methods read; their methods bound to it."""
    plans_manager = spec.plans_manager
    configuration_manager = plans_manager.get_configuration(spec.configuration)
    previous_stage = previous_stage_folder(spec)  # the cascade's extra input, as nnUNetTrainer.__init__ finds it
    view = SimpleNamespace(
        plans_manager=plans_manager,
        configuration_manager=configuration_manager,
        label_manager=plans_manager.get_label_manager(spec.dataset_json),
        dataset_json=spec.dataset_json,
        device=torch.device(device),
        is_ddp=is_distributed(),
        enable_deep_supervision=enable_deep_supervision,
        oversample_foreground_percent=oversample_foreground_percent,
        fold=spec.fold,
        preprocessed_dataset_folder_base=str(spec.preprocessed_base),
        preprocessed_dataset_folder=str(spec.preprocessed_data_folder),
        is_cascaded=previous_stage is not None,
        folder_with_segs_from_previous_stage=str(previous_stage) if previous_stage is not None else None,
        dataset_class=None,
        inference_allowed_mirroring_axes=None,
        print_to_log_file=lambda *args, **kwargs: None,
    )
    if compile_network is None:
        view._do_i_compile = lambda: nnUNetTrainer._do_i_compile(view)
    else:
        view._do_i_compile = lambda: compile_network
    view._get_deep_supervision_scales = lambda: nnUNetTrainer._get_deep_supervision_scales(view)
    return view


def is_distributed() -> bool:
    """nnU-Net's `is_ddp`: a torch.distributed process group is up (Lightning's DDP has set it up)."""
    return dist.is_available() and dist.is_initialized()


@dataclass
class AugmentationParams:
    """What nnU-Net's `configure_rotation_dummyDA_mirroring_and_inital_patch_size` decides."""

    rotation_for_da: Any
    do_dummy_2d_data_aug: bool
    initial_patch_size: tuple[int, ...]
    mirror_axes: tuple[int, ...]


def augmentation_params(view: SimpleNamespace) -> AugmentationParams:
    rot, dummy2d, initial, mirror = nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(view)
    return AugmentationParams(rot, bool(dummy2d), tuple(int(i) for i in initial), tuple(mirror))


def deep_supervision_scales(view: SimpleNamespace) -> list | None:
    return nnUNetTrainer._get_deep_supervision_scales(view)


def build_loss(view: SimpleNamespace) -> torch.nn.Module:
    """DC+CE (or DC+BCE for regions) in `DeepSupervisionWrapper` with nnU-Net's weights and DDP rule."""
    return nnUNetTrainer._build_loss(view)


def batch_size_and_oversample(view: SimpleNamespace) -> tuple[int, float]:
    """This rank's share of the plans' global batch, and its oversampling fraction (nnU-Net's rule)."""
    nnUNetTrainer._set_batch_size_and_oversample(view)
    return int(view.batch_size), float(view.oversample_foreground_percent)


def split(view: SimpleNamespace) -> tuple[list[str], list[str]]:
    """nnU-Net's fold split; creates `splits_final.json` with its seed when missing."""
    tr, val = nnUNetTrainer.do_split(view)
    return list(tr), list(val)


def build_network(view: SimpleNamespace) -> torch.nn.Module:
    """The plans' network (ResidualEncoderUNet for ResEnc plans), via nnunetv2, with nnU-Net's init."""
    return nnUNetTrainer.build_network_architecture(
        view.plans_manager,
        view.configuration_manager,
        num_input_channels(view),
        view.label_manager.num_segmentation_heads,
        view.enable_deep_supervision,
    )


def num_input_channels(view: SimpleNamespace) -> int:
    return determine_num_input_channels(view.plans_manager, view.configuration_manager, view.dataset_json)


def training_transforms(view: SimpleNamespace, aug: AugmentationParams):
    lm: LabelManager = view.label_manager
    cm = view.configuration_manager
    return nnUNetTrainer.get_training_transforms(
        cm.patch_size, aug.rotation_for_da, deep_supervision_scales(view), aug.mirror_axes,
        aug.do_dummy_2d_data_aug, use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=view.is_cascaded,
        foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
        ignore_label=lm.ignore_label,
    )


def validation_transforms(view: SimpleNamespace):
    lm: LabelManager = view.label_manager
    return nnUNetTrainer.get_validation_transforms(
        deep_supervision_scales(view), is_cascaded=view.is_cascaded, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label,
    )


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside a DDP (`module`) and/or torch.compile (`_orig_mod`) wrapper."""
    mod = getattr(network, "module", network)
    return getattr(mod, "_orig_mod", mod)


def set_deep_supervision(network: torch.nn.Module, enabled: bool) -> None:
    """Toggle DS on the (possibly compiled / DDP-wrapped) network, as nnU-Net does."""
    unwrap_network(network).decoder.deep_supervision = enabled


def n_proc_da() -> int:
    """Augmentation workers, honouring `nnUNet_n_proc_DA` (0 = in-process), like nnU-Net."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return int(get_allowed_n_proc_DA())


def random_label_loss(pl_module: torch.nn.Module, output: Any, generator: torch.Generator) -> torch.Tensor:
    """The module's own loss on random labels shaped like the outputs: the kernels and memory of a real step
    without real data (used by --memcheck). The labels are int16, as nnUNetDataLoader's targets are."""
    outputs = output if isinstance(output, (list, tuple)) else [output]
    lm = getattr(pl_module, "label_manager", None)
    loss_fn = getattr(pl_module, "loss", None)
    if lm is None or loss_fn is None or lm.has_regions or lm.has_ignore_label:
        return sum(o.float().mean() for o in outputs)
    n = outputs[0].shape[1]
    targets = [torch.randint(0, n, (o.shape[0], 1, *o.shape[2:]), generator=generator, device=o.device,
                             dtype=torch.int16) for o in outputs]
    return loss_fn(output, targets if isinstance(output, (list, tuple)) else targets[0])
