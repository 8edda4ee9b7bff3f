"""Cheap checks of the plans' network and the preprocessed cases, run before any model or GPU work.

nnU-Net finds these problems hours into a run (a worker dies on a missing file, the loss turns NaN,
CE crashes on label 7). Here each is one sentence naming the case and the fix. Every case's files
are checked for presence (and, for nnunetv2's blosc2 format, their shape from the header); the
voxel values (NaN/Inf, labels) only on an evenly spaced sample of cases, to keep it seconds.
"""

from __future__ import annotations

import json
import pydoc
from pathlib import Path
from typing import Any

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from resenc_lightning.plans import RunSpec, RunSpecError

#: Cases whose voxels are read (NaN/Inf and label check).
SAMPLED_CASES = 4


def check_network_class(spec: RunSpec) -> None:
    """The plans' network_class_name must import the way nnunetv2's get_network_from_plans imports it."""
    name = spec.configuration_manager.network_arch_class_name
    if pydoc.locate(name) is not None:
        return
    import dynamic_network_architectures
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(str(Path(dynamic_network_architectures.__path__[0]) / "architectures"),
                                        name.split(".")[-1], "dynamic_network_architectures.architectures")
    if found is None:
        raise RunSpecError(
            f"network class {name!r} in {spec.plans_file.name} ({spec.configuration}) cannot be imported; install the "
            f"package that provides it or fix architecture.network_class_name (e.g. "
            f"dynamic_network_architectures.architectures.unet.ResidualEncoderUNet)."
        )


def _case_files(folder: Path, case: str, blosc2: bool) -> list[list[Path]]:
    """For each file a case needs, the alternatives nnunetv2 accepts."""
    if blosc2:
        return [[folder / f"{case}.b2nd"], [folder / f"{case}_seg.b2nd"], [folder / f"{case}.pkl"]]
    return [[folder / f"{case}.npz", folder / f"{case}.npy"], [folder / f"{case}.pkl"]]


def _allowed_labels(dataset_json: dict) -> set[int]:
    allowed = {-1}  # nnU-Net writes -1 outside the nonzero mask
    for value in dataset_json["labels"].values():
        allowed.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return allowed


def _sample(cases: list[str], n: int) -> list[str]:
    if len(cases) <= n:
        return cases
    return [cases[int(i)] for i in np.linspace(0, len(cases) - 1, n).round()]


def check_preprocessed_data(spec: RunSpec, sampled_cases: int = SAMPLED_CASES) -> None:
    """Files present and readable, channels as in dataset.json, patch not beyond every case, finite voxels, known labels."""
    folder = spec.preprocessed_data_folder
    dataset_class = infer_dataset_class(str(folder))
    blosc2 = "Blosc2" in dataset_class.__name__
    cases = sorted({p.stem for p in folder.glob("*.pkl")} | set(dataset_class.get_identifiers(str(folder))))
    redo = (f"rerun `nnUNetv2_preprocess -d {spec.dataset_id} -plans_name {spec.plans_identifier} "
            f"-c {spec.configuration}`")
    for case in cases:
        for alternatives in _case_files(folder, case, blosc2):
            if not any(p.is_file() for p in alternatives):
                raise RunSpecError(f"preprocessed case {case!r} has no {alternatives[0].name} in {folder}; {redo}.")
    splits_file = spec.preprocessed_base / "splits_final.json"
    if splits_file.is_file() and spec.fold != "all":
        splits = json.loads(splits_file.read_text())
        if int(spec.fold) < len(splits):
            missing = sorted(set(splits[int(spec.fold)]["train"] + splits[int(spec.fold)]["val"]) - set(cases))
            if missing:
                raise RunSpecError(f"{splits_file} lists cases {missing[:5]} for fold {spec.fold} that are not in "
                                   f"{folder}; {redo} (or delete splits_final.json to let nnU-Net re-split).")
    dataset = dataset_class(str(folder), cases)
    channels = len(spec.dataset_json.get("channel_names") or spec.dataset_json.get("modality") or {})
    patch = [int(p) for p in spec.configuration_manager.patch_size]
    sampled = set(_sample(cases, sampled_cases))
    largest = [0] * len(patch)
    allowed = _allowed_labels(spec.dataset_json)
    for case in cases if blosc2 else sorted(sampled):
        data, seg = _load(dataset, case, folder, redo)
        if channels and data.shape[0] != channels:
            raise RunSpecError(
                f"preprocessed case {case!r} has {data.shape[0]} image channels but dataset.json's channel_names "
                f"lists {channels}; fix channel_names or the images and {redo}."
            )
        spatial = data.shape[-len(patch):]
        largest = [max(a, b) for a, b in zip(largest, spatial)]
        if case in sampled:
            _check_values(case, np.asarray(data[:]), np.asarray(seg[:]), allowed, redo)


def _load(dataset: Any, case: str, folder: Path, redo: str) -> tuple[Any, Any]:
    try:
        data, seg, _, _ = dataset.load_case(case)
        return data, seg
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunSpecError(f"preprocessed case {case!r} in {folder} cannot be read ({reason}); {redo}.") from None


def _check_values(case: str, data: np.ndarray, seg: np.ndarray, allowed: set[int], redo: str) -> None:
    if not np.isfinite(data).all():
        bad = "NaN" if np.isnan(data).any() else "Inf"
        raise RunSpecError(
            f"preprocessed case {case!r} contains {bad} voxels (found by the sampled data check); fix the raw image "
            f"(or its normalization) and {redo}."
        )
    unknown = sorted(set(np.unique(seg).astype(int).tolist()) - allowed)
    if unknown:
        raise RunSpecError(
            f"preprocessed case {case!r} has label values {unknown} that dataset.json's labels do not list "
            f"({sorted(allowed - {-1})}); add them to dataset.json's labels or fix the segmentation, then {redo}."
        )
