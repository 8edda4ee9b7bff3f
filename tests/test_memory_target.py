"""memory_target.py: the plans' VRAM target, the cap that fits a card, the planner command that re-plans."""

from __future__ import annotations

import pytest
from callback_helpers import PLANS_L

from resenc_lightning.memory_target import GB, decide_cap, planner_command, plans_target_gb


@pytest.mark.parametrize(("card_gib", "target", "cap", "fits", "fraction"), [
    (24, 24.0, 21.6, False, 0.9),  # L on a 24 GB card: 10% headroom
    (80, 24.0, 24.0, True, 0.3),  # L on an 80 GB card: capped at the target
    (24, 8.0, 8.0, True, 1 / 3),  # M on a 24 GB card
    (8, 8.0, 6.0, False, 0.75),  # M on an 8 GB card: the 2 GB minimum headroom applies
])
def test_decide_cap(card_gib, target, cap, fits, fraction):
    d = decide_cap(int(card_gib * GB), target)
    assert d.total_gb == pytest.approx(card_gib)
    assert d.cap_gb == pytest.approx(cap)
    assert d.fits is fits
    assert d.fraction == pytest.approx(fraction)
    assert d.cap_gb <= d.max_fit_gb


@pytest.mark.parametrize(("plans", "target"), [
    ({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetMPlans"}, 8.0),
    (PLANS_L, 24.0),
    ({"experiment_planner_used": "nnUNetPlannerResEncXL", "plans_name": "nnUNetResEncUNetXLPlans"}, 40.0),
    ({**PLANS_L, "plans_name": "nnUNetResEncUNetL_20GB_Plans"}, 20.0),  # the name wins over the planner default
    ({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetPlans_80G"}, 80.0),  # nnU-Net docs
    ({**PLANS_L, "gpu_memory_target_in_gb": 11}, 11.0),
    ({"experiment_planner_used": "ExperimentPlanner", "plans_name": "nnUNetPlans"}, None),
    ({}, None),
])
def test_plans_target_gb(plans, target):
    value, source = plans_target_gb(plans)
    assert value == target
    assert source  # says where the target came from (or why there is none)


def test_planner_command_replans_for_what_fits_this_card():
    fit_24 = decide_cap(24 * GB, 24.0).max_fit_gb
    assert planner_command(PLANS_L, 4, fit_24) == (
        "nnUNetv2_plan_experiment -d 4 -pl nnUNetPlannerResEncL -gpu_memory_target 21 "
        "-overwrite_plans_name nnUNetResEncUNetL_21GB_Plans")
    # an already re-planned name, and nnU-Net's documented naming, get the new target, not a second one
    for name in ("nnUNetResEncUNetL_20GB_Plans", "nnUNetResEncUNetLPlans_20G"):
        assert planner_command({**PLANS_L, "plans_name": name}, 4, fit_24).endswith(" nnUNetResEncUNetL_21GB_Plans")
    assert planner_command({"experiment_planner_used": "nnUNetPlannerResEncM", "plans_name": "nnUNetResEncUNetPlans_80G"},
                           "Dataset004_Hippocampus", 6.0) == (
        "nnUNetv2_plan_experiment -d Dataset004_Hippocampus -pl nnUNetPlannerResEncM -gpu_memory_target 6 "
        "-overwrite_plans_name nnUNetResEncUNet_6GB_Plans")
    # the plans it produces carry the target the cap will then use
    name = planner_command(PLANS_L, 4, fit_24).rsplit(" ", 1)[1]
    assert plans_target_gb({**PLANS_L, "plans_name": name})[0] == 21.0
