"""Final validation exactly as nnU-Net does it, plus surface metrics nnU-Net does not report.

`nnUNetTrainer.perform_actual_validation` is called unbound on a view of our run: nnunetv2's
predictor (sliding window, step 0.5, Gaussian, mirroring over the allowed axes) on the fold's
validation cases, nnunetv2's export, `compute_metrics_on_folder` -> `validation/summary.json`,
cases split over DDP ranks like nnU-Net. For a 3d_lowres with `next_stage` it also writes the
cascade's inputs to `<model folder>/predicted_next_stage/<next stage>/`; a cascade reads them
(cascade.py). Then MONAI's HD95 and normalised surface Dice per case and class go to
`validation/summary_surface.json`.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from resenc_lightning import recipe
from resenc_lightning.atomic import atomic_write_text
from resenc_lightning.plans import RunSpec


class _SummaryLog:
    def __init__(self) -> None:
        self.summary: dict[str, float] = {}

    def log_summary(self, key: str, value: Any) -> None:
        self.summary[key] = float(value)


def run_final_validation(network: torch.nn.Module, spec: RunSpec, device: torch.device,
                         mirror_axes: tuple[int, ...], batch_size: int, surface_tolerance_mm: float = 1.0,
                         save_probabilities: bool = False) -> dict:
    """Predict the fold's validation cases with nnunetv2 and write summary.json (+ summary_surface.json).

    `save_probabilities` is nnU-Net's --npz: the softmax goes to validation/<case>.npz (+ .pkl), which
    nnUNetv2_find_best_configuration needs to ensemble configurations.
    """
    # the predictor records the trainer's class name: present the view as nnUNetTrainer
    view = type("nnUNetTrainer", (SimpleNamespace,), {})(**vars(recipe.trainer_view(spec, device=device,
                                                                                       compile_network=False)))
    folder = Path(spec.output_folder)
    log = _SummaryLog()
    view.network = network
    view.output_folder = str(folder)
    view.output_folder_base = str(folder.parent)
    view.batch_size = batch_size
    view.local_rank = dist.get_rank() if view.is_ddp else 0
    view.inference_allowed_mirroring_axes = tuple(mirror_axes)
    view.dataset_class = infer_dataset_class(str(spec.preprocessed_data_folder))
    view.configuration_name = spec.configuration
    view.logger = log
    view.set_deep_supervision_enabled = lambda enabled: recipe.set_deep_supervision(network, enabled)
    view.do_split = lambda: recipe.split(view)
    view.print_to_log_file = lambda *args, **kwargs: print(*args, flush=True) \
        if kwargs.get("also_print_to_console") and view.local_rank == 0 else None
    was_training = network.training
    had_deep_supervision = bool(recipe.unwrap_network(network).decoder.deep_supervision)
    try:
        with predictor_on(device):
            nnUNetTrainer.perform_actual_validation(view, save_probabilities=save_probabilities)
    finally:
        network.train(was_training)
        # nnU-Net switches DS on here unconditionally; restoring keeps a DS-off network DS-off
        recipe.set_deep_supervision(network, had_deep_supervision)
    result = {"summary": str(folder / "validation" / "summary.json"), **log.summary}
    if view.local_rank == 0 and (surface := write_surface_summary(spec, folder / "validation", surface_tolerance_mm)):
        result["summary_surface"] = str(surface)
    return result


#: What nnunetv2's predictor prints whenever it is built for a non-CUDA device, whatever it was asked for.
CPU_PREDICTOR_LINE = "perform_everything_on_device=True is only supported for cuda devices! Setting this to False"


@contextmanager
def predictor_on(device: torch.device) -> Iterator[None]:
    """perform_actual_validation builds its predictor with `perform_everything_on_device=True`; on a CPU the predictor
    turns that off itself and prints a line the user cannot act on (it prints it even when asked for False). Build it
    with the setting it will use, and drop that one line of its constructor's output (anything else is printed)."""
    if device.type == "cuda":
        yield
        return
    predictor = trainer_module.nnUNetPredictor

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        with redirect_stdout(io.StringIO()) as said:
            built = predictor(*args, **{**kwargs, "perform_everything_on_device": False})
        other = [line for line in said.getvalue().splitlines() if line != CPU_PREDICTOR_LINE]
        if other:
            print("\n".join(other), flush=True)
        return built

    with mock.patch.object(trainer_module, "nnUNetPredictor", on_cpu):
        yield


def write_surface_summary(spec: RunSpec, validation_folder: Path, tolerance_mm: float = 1.0) -> Path | None:
    """Per-case, per-class HD95 (mm) and normalised surface Dice at `tolerance_mm`, with MONAI's metrics.

    These metrics are extra to nnU-Net's summary.json: without MONAI (an install that skipped it, e.g. a GPU box fed
    only a bundle of wheels) one line says so and None is returned, rather than failing a finished run's validation.
    """
    try:
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    except ImportError as err:
        print(f"validation/summary_surface.json skipped: MONAI cannot be imported ({err}); pip install monai",
              flush=True)
        return None

    reader = spec.plans_manager.image_reader_writer_class()
    lm = spec.plans_manager.get_label_manager(spec.dataset_json)
    ending = spec.dataset_json["file_ending"]
    gt_folder = spec.preprocessed_base / "gt_segmentations"
    classes = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    per_case = []
    empty: dict[str, list[str]] = {}  # class -> cases where the prediction or the reference has none of it
    for pred_file in sorted(validation_folder.glob(f"*{ending}")):
        gt, props = reader.read_seg(str(gt_folder / pred_file.name))
        pred, _ = reader.read_seg(str(pred_file))
        spacing = [float(s) for s in props["spacing"]]
        masks_p, masks_g = [], []
        for c in classes:
            values = c if isinstance(c, (list, tuple)) else [c]
            masks_p.append(np.isin(pred[0], values))
            masks_g.append(np.isin(gt[0], values))
        for c, mp, mg in zip(classes, masks_p, masks_g):
            if not (mp.any() and mg.any()):
                empty.setdefault(str(c), []).append(pred_file.name)
        p = torch.from_numpy(np.stack(masks_p)[None].astype(np.float32))
        g = torch.from_numpy(np.stack(masks_g)[None].astype(np.float32))
        with warnings.catch_warnings():  # MONAI warns per case and metric; one line of ours below says it once
            warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \S+ is all 0",
                                    module=r"monai\.metrics\.")
            hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)[0]
            nsd = compute_surface_dice(p, g, class_thresholds=[tolerance_mm] * len(classes), include_background=True,
                                       spacing=spacing)[0]
        per_case.append({"prediction_file": str(pred_file), "reference_file": str(gt_folder / pred_file.name),
                         "metrics": {str(c): {"HD95": _num(h), "NSD": _num(n)} for c, h, n in zip(classes, hd95, nsd)}})
    mean = {}
    for c in map(str, classes):
        mean[c] = {m: _nanmean([case["metrics"][c][m] for case in per_case]) for m in ("HD95", "NSD")}
    out = validation_folder / "summary_surface.json"
    for c, cases in empty.items():
        print(f"{out.name}: class {c} is absent from the prediction or the reference of {len(cases)} case(s) "
              f"({', '.join(cases[:3])}{', ...' if len(cases) > 3 else ''}); their HD95/NSD are null and left out of "
              f"the mean.", flush=True)
    atomic_write_text(out, json.dumps({"tolerance_mm": tolerance_mm, "metric_per_case": per_case, "mean": mean}, indent=2))
    return out


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if np.isnan(v) or np.isinf(v) else v


def _nanmean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None
