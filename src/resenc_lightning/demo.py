"""The embedded demo dataset: synthetic volumes, planned and preprocessed by nnunetv2 itself.

`python train.py --plans nnUNetResEncUNetLPlans` with no dataset trains on this. The raw data is
written in nnU-Net's raw format; fingerprinting, ResEnc planning and preprocessing are nnunetv2's
own Python API, so the demo exercises exactly the path a real dataset takes. The data and the
schedule are small; the network is the one the ResEnc planner chose.

Where it lives: $nnUNet_raw / $nnUNet_preprocessed / $nnUNet_results when set, otherwise
`$RESENC_LIGHTNING_HOME/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results}` (default
`~/.cache/resenc_lightning`). Built once; a build that was interrupted has no completion marker and
is removed and rebuilt; concurrent builders (e.g. DDP ranks) serialise on a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_DATASET_ID = 987
DEMO_DATASET_NAME = f"Dataset{DEMO_DATASET_ID}_ResEncLightningDemo"
#: nnU-Net custom configuration (`inherits_from` 3d_fullres): same network and patch, batch 2, so that
#: a step of the unmodified ResEnc L network takes seconds on a CPU. Same preprocessed data.
DEMO_CONFIGURATION = "3d_fullres_demo"
DEMO_BATCH_SIZE = 2
DEMO_TRAIN_ITERATIONS = 12
DEMO_VAL_ITERATIONS = 3
DEMO_EPOCHS = 3
_FORMAT_VERSION = "2"

PLANNERS = {
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
}


@dataclass
class DemoInfo:
    dataset_name: str
    configuration: str
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    max_epochs: int


def default_home() -> Path:
    return Path(os.environ.get("RESENC_LIGHTNING_HOME", Path.home() / ".cache" / "resenc_lightning"))


def set_default_nnunet_paths(home: Path | None = None) -> dict[str, Path]:
    """Point unset nnU-Net path variables at the demo cache (nnunetv2 reads them lazily)."""
    home = home or default_home()
    paths = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            os.environ[var] = str(home / var)
        paths[var] = Path(os.environ[var])
        paths[var].mkdir(parents=True, exist_ok=True)
    return paths


# -- synthetic raw data -------------------------------------------------------------------------------
def _ellipsoid(shape: tuple[int, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def synthetic_case(rs: np.random.RandomState, shape_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One volume with a bright sphere (label 1) and a dark ellipsoid (label 2), noise and a bias field."""
    shape = tuple(int(s) for s in rs.randint(shape_range[0], shape_range[1] + 1, size=3))
    seg = np.zeros(shape, dtype=np.uint8)
    lo = min(shape) / 8
    r1 = rs.uniform(lo, lo * 1.6)
    c1 = np.array([rs.uniform(r1 + 1, s - r1 - 1) for s in shape])
    seg[_ellipsoid(shape, c1, np.array([r1] * 3))] = 1
    radii = rs.uniform(lo * 0.7, lo * 2.0, size=3)
    for _ in range(50):  # place the ellipsoid where it does not overlap the sphere
        c2 = np.array([rs.uniform(r + 1, s - r - 1) for s, r in zip(shape, radii)])
        if np.linalg.norm(c2 - c1) > r1 + radii.max() + 1:
            break
    seg[_ellipsoid(shape, c2, radii) & (seg == 0)] = 2
    img = rs.normal(100, 20, size=shape).astype(np.float32)
    img[seg == 1] += rs.uniform(40, 80)
    img[seg == 2] -= rs.uniform(30, 50)
    bias = np.linspace(rs.uniform(0.85, 1.0), rs.uniform(1.0, 1.15), shape[0])[:, None, None]
    return (img * bias).astype(np.float32), seg


def write_raw_dataset(raw_root: Path, dataset_name: str, n_cases: int, shape_range: tuple[int, int],
                      seed: int = 0) -> Path:
    """nnU-Net raw format: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json (NibabelIO)."""
    import nibabel as nib

    folder = raw_root / dataset_name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    affine = np.eye(4)
    for i in range(n_cases):
        img, seg = synthetic_case(rs, shape_range)
        nib.save(nib.Nifti1Image(img, affine), str(folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "sphere": 1, "ellipsoid": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        # NibabelIO: the demo needs no SimpleITK reads, which keeps it runnable where SimpleITK is absent.
        "overwrite_image_reader_writer": "NibabelIO",
        "name": dataset_name,
        "description": "resenc-lightning embedded demo: synthetic spheres and ellipsoids",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def plan_and_preprocess(dataset_id: int, plans: str, num_processes: int = 2) -> None:
    """nnunetv2's own fingerprint extraction, ResEnc planning and 3d_fullres preprocessing."""
    import nnunetv2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    planner_cls = recursive_find_python_class(
        os.path.join(nnunetv2.__path__[0], "experiment_planning"), PLANNERS[plans],
        current_module="nnunetv2.experiment_planning",
    )
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
            DatasetFingerprintExtractor,
        )

        extract_fingerprint_dataset(dataset_id, DatasetFingerprintExtractor, num_processes=num_processes,
                                    check_dataset_integrity=False, clean=True, verbose=False)
        with _planner_safe_n_proc_da():
            _, plans_id = plan_experiment_dataset(dataset_id, planner_cls)
        assert plans_id == plans, (plans_id, plans)
        preprocess_configuration(dataset_id, plans, "3d_fullres", num_processes)


@contextlib.contextmanager
def _planner_safe_n_proc_da():
    """nnunetv2's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (in-process DA)."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def preprocess_configuration(dataset_id: int, plans: str, configuration: str, num_processes: int) -> None:
    """Run nnunetv2's preprocessor for one configuration (what `nnUNetv2_preprocess -c` does per config).

    Calls the preprocessor class directly rather than `preprocess_dataset`, which also copies the
    ground truth with `distutils` (absent on Python >= 3.12); we copy it with shutil.
    """
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = convert_id_to_dataset_name(dataset_id)
    pp_base = Path(os.fspath(nnUNet_preprocessed)) / name
    pm = PlansManager(str(pp_base / f"{plans}.json"))
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    preprocessor.run(dataset_id, configuration, plans, num_processes=num_processes)
    gt = pp_base / "gt_segmentations"
    gt.mkdir(exist_ok=True)
    for f in (Path(os.fspath(nnUNet_raw)) / name / "labelsTr").iterdir():
        shutil.copy(f, gt / f.name)


def add_demo_configuration(plans_file: Path, batch_size: int = DEMO_BATCH_SIZE) -> None:
    """Add nnU-Net's custom-configuration entry: inherits 3d_fullres, only the batch size differs."""
    plans = json.loads(plans_file.read_text())
    plans["configurations"][DEMO_CONFIGURATION] = {"inherits_from": "3d_fullres", "batch_size": batch_size}
    tmp = plans_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plans, indent=4))
    tmp.replace(plans_file)


def derive_plans(plans: dict, name: str, *, features: list[int] | None = None, feature_divisor: int | None = None,
                 blocks_per_stage: int | None = None, patch: int | None = None, batch_size: int | None = None) -> dict:
    """A copy of the planner's output with a smaller network, patch or another batch, under a new plans name.

    Tests and benchmarks train real nnunetv2 plans at a size the machine affords. `features` sets the stages
    (and their count), `feature_divisor` narrows every stage, `blocks_per_stage` sets the encoder blocks (and
    one decoder conv per stage); configurations without their own architecture inherit and are left alone.
    """
    plans = json.loads(json.dumps(plans))
    plans["plans_name"] = name
    for cfg in plans["configurations"].values():
        if "architecture" not in cfg:
            continue
        ak = cfg["architecture"]["arch_kwargs"]
        if features is not None:
            n = len(features)
            ak.update(n_stages=n, features_per_stage=list(features), kernel_sizes=ak["kernel_sizes"][:n],
                      strides=ak["strides"][:n], n_blocks_per_stage=ak["n_blocks_per_stage"][:n],
                      n_conv_per_stage_decoder=ak["n_conv_per_stage_decoder"][:n - 1])
        if feature_divisor is not None:
            ak["features_per_stage"] = [max(4, f // feature_divisor) for f in ak["features_per_stage"]]
        if blocks_per_stage is not None:
            ak["n_blocks_per_stage"] = [blocks_per_stage] * ak["n_stages"]
            ak["n_conv_per_stage_decoder"] = [1] * (ak["n_stages"] - 1)
        if patch is not None:
            cfg["patch_size"] = [patch] * len(cfg["patch_size"])
        if batch_size is not None:
            cfg["batch_size"] = batch_size
    return plans


@contextlib.contextmanager
def _locked(lock_file: Path):
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_dataset(dataset_id: int, dataset_name: str, plans: str, n_cases: int, shape_range: tuple[int, int],
                  seed: int = 0, num_processes: int = 2, extra_configuration: bool = True) -> Path:
    """Write, fingerprint, plan and preprocess a synthetic dataset once; rebuild if a build was cut short.

    Needs nnUNet_raw and nnUNet_preprocessed set. Returns the preprocessed dataset folder.
    """
    if plans not in PLANNERS:
        from resenc_lightning.plans import RunSpecError

        raise RunSpecError(
            f"--plans {plans!r} cannot be planned for the demo; use one of {', '.join(PLANNERS)} "
            f"or pass --dataset for your own preprocessed dataset."
        )
    raw_root = Path(os.environ["nnUNet_raw"])
    pp_root = Path(os.environ["nnUNet_preprocessed"])
    pp_folder = pp_root / dataset_name
    marker = pp_folder / f".resenc_lightning_complete_{plans}"
    # the markers record what was built: other parameters (or an older format) mean rebuild, not reuse
    built = json.dumps({"version": _FORMAT_VERSION, "n_cases": n_cases, "shape_range": list(shape_range),
                        "seed": seed}, sort_keys=True)
    with _locked(pp_root / f".{dataset_name}.lock"):
        raw_marker = raw_root / dataset_name / ".resenc_lightning_complete"
        raw_ok = raw_marker.is_file() and raw_marker.read_text() == built
        if raw_ok and marker.is_file() and marker.read_text() == built:
            return pp_folder
        if not raw_ok:
            # half-written raw data, or data built with other parameters: start from scratch, for every plans
            shutil.rmtree(raw_root / dataset_name, ignore_errors=True)
            shutil.rmtree(pp_folder, ignore_errors=True)
            write_raw_dataset(raw_root, dataset_name, n_cases, shape_range, seed)
            raw_marker.write_text(built)
        plan_and_preprocess(dataset_id, plans, num_processes)
        if extra_configuration:
            add_demo_configuration(pp_folder / f"{plans}.json")
        marker.write_text(built)
    return pp_folder


def ensure_demo_dataset(plans: str = "nnUNetResEncUNetLPlans") -> DemoInfo:
    """Build the demo dataset if needed (about 20 s on 2 cores) and say where it is."""
    set_default_nnunet_paths()
    build_dataset(DEMO_DATASET_ID, DEMO_DATASET_NAME, plans, n_cases=10, shape_range=(27, 33))
    return DemoInfo(DEMO_DATASET_NAME, DEMO_CONFIGURATION, DEMO_TRAIN_ITERATIONS, DEMO_VAL_ITERATIONS, DEMO_EPOCHS)
