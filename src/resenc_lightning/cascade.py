"""nnU-Net's cascade (3d_lowres -> 3d_cascade_fullres) on our model folders.

A configuration with `previous_stage` in the plans trains on the previous stage's segmentations as extra
one-hot input channels. `nnUNetTrainer.__init__` reads them from
`<results>/<dataset>/<trainer>__<plans>__<previous stage>/predicted_next_stage/<configuration>/`, which the previous
stage's final validation (`perform_actual_validation`, for a configuration with `next_stage`) fills with one
segmentation per validation case. We derive the same folder for our trainer name and refuse a run early, in one
line, when cases are missing there; loading, one-hot conversion and augmentation stay nnunetv2's.
"""

from __future__ import annotations

from pathlib import Path

from resenc_lightning.plans import RunSpec, RunSpecError

#: Files nnunetv2's dataset classes read a previous-stage segmentation from (blosc2, numpy).
SEGMENTATION_ENDINGS = (".b2nd", ".npy", ".npz")


def previous_stage_folder(spec: RunSpec) -> Path | None:
    """Where this configuration's previous-stage segmentations live (nnUNetTrainer's rule), or None if not cascaded."""
    previous = spec.configuration_manager.previous_stage_name
    if previous is None or spec.output_folder is None:
        return None
    dataset_results = Path(spec.output_folder).parent.parent
    return (dataset_results / f"{spec.trainer_name}__{spec.plans_identifier}__{previous}" / "predicted_next_stage"
            / spec.configuration)


def check_previous_stage(spec: RunSpec, case_ids: list[str]) -> None:
    """Every case the fold reads needs its previous-stage segmentation; name the command that makes them if not."""
    folder = previous_stage_folder(spec)
    if folder is None:
        return
    present = {p.name[:-len(e)] for p in folder.iterdir() for e in SEGMENTATION_ENDINGS
               if p.name.endswith(e)} if folder.is_dir() else set()
    missing = sorted(set(case_ids) - present)
    if missing:
        previous = spec.configuration_manager.previous_stage_name
        raise RunSpecError(
            f"{spec.configuration} needs the {previous} prediction of every case it trains and validates on, but "
            f"{len(missing)} of {len(set(case_ids))} are missing in {folder} (e.g. {missing[0]}); make them with the "
            f"{previous} final validation of all 5 folds: `python train.py --plans {spec.plans_identifier} --dataset "
            f"{spec.dataset_id} --configuration {previous} --fold F` for F in 0 1 2 3 4 (add --validate_only for "
            f"folds already trained)."
        )
