"""The demo builder: nnunetv2's own planning/preprocessing, built once, rebuilt when cut short."""

from __future__ import annotations

import json
import os
from pathlib import Path

from resenc_lightning import demo


def test_demo_build_is_idempotent_and_recovers_from_an_interrupted_build(nnunet_env):
    kwargs = dict(n_cases=4, shape_range=(14, 16), num_processes=1)
    folder = demo.build_dataset(556, "Dataset556_DemoBuild", "nnUNetResEncUNetLPlans", **kwargs)
    plans_file = folder / "nnUNetResEncUNetLPlans.json"
    plans = json.loads(plans_file.read_text())
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncL"
    assert plans["configurations"][demo.DEMO_CONFIGURATION] == {"inherits_from": "3d_fullres",
                                                                "batch_size": demo.DEMO_BATCH_SIZE}
    assert len(list((folder / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) == 8  # data + seg per case
    mtime = plans_file.stat().st_mtime_ns
    demo.build_dataset(556, "Dataset556_DemoBuild", "nnUNetResEncUNetLPlans", **kwargs)
    assert plans_file.stat().st_mtime_ns == mtime  # second call reuses the build

    # an interrupted raw write: no completion marker, a stray half-written file
    raw = Path(os.environ["nnUNet_raw"]) / "Dataset556_DemoBuild"
    (raw / ".resenc_lightning_complete").unlink()
    (raw / "imagesTr" / "case_999_0000.nii.gz").write_bytes(b"truncated")
    demo.build_dataset(556, "Dataset556_DemoBuild", "nnUNetResEncUNetLPlans", **kwargs)
    assert not (raw / "imagesTr" / "case_999_0000.nii.gz").exists()
    assert (raw / ".resenc_lightning_complete").is_file()
    assert (folder / ".resenc_lightning_complete_nnUNetResEncUNetLPlans").is_file()
    assert plans_file.stat().st_mtime_ns != mtime


def test_demo_refuses_plans_it_cannot_plan(nnunet_env):
    try:
        demo.build_dataset(557, "Dataset557_X", "nnUNetPlans", n_cases=2, shape_range=(8, 8))
    except ValueError as e:
        assert "nnUNetResEncUNetLPlans" in str(e) and "--dataset" in str(e)
    else:
        raise AssertionError("expected a ValueError")
