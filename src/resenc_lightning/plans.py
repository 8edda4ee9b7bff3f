"""Find and validate the nnU-Net dataset, plans and configuration a run trains on.

Everything here runs before any model or GPU work so that a user's mistake costs seconds and
produces one sentence naming the bad value and the fix (docs/DESIGN.md, "Errors a user can cause").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

#: Configurations we refuse with a reason instead of training them wrongly (none at present).
UNSUPPORTED_CONFIGURATIONS: dict[str, str] = {}

#: Keys a configuration must resolve to (after `inherits_from`) for us to build data and network.
REQUIRED_CONFIGURATION_KEYS = ("data_identifier", "patch_size", "batch_size", "architecture", "spacing")
REQUIRED_ARCHITECTURE_KEYS = ("network_class_name", "arch_kwargs", "_kw_requires_import")


class RunSpecError(ValueError):
    """A user-fixable problem with the dataset / plans / configuration / fold a run asks for."""


#: The "nnunet" checkpoint keys that say which run a checkpoint belongs to (RunSpec.identity).
IDENTITY_KEYS = ("dataset_name", "plans_identifier", "configuration", "fold")


@dataclass
class RunSpec:
    """Everything the DataModule, the module and the callbacks need to know about one nnU-Net run."""

    dataset_name: str
    plans_identifier: str
    configuration: str
    fold: int | str
    plans: dict
    dataset_json: dict
    preprocessed_base: Path
    output_folder: Path | None
    trainer_name: str
    plans_file: Path
    extra: dict = field(default_factory=dict)

    @property
    def plans_manager(self) -> PlansManager:
        return PlansManager(self.plans)

    @property
    def configuration_manager(self) -> ConfigurationManager:
        return self.plans_manager.get_configuration(self.configuration)

    @property
    def preprocessed_data_folder(self) -> Path:
        return self.preprocessed_base / self.configuration_manager.data_identifier

    @property
    def dataset_id(self) -> int:
        return int(self.dataset_name[len("Dataset"):len("Dataset") + 3])

    def identity(self) -> tuple[str, str, str, str]:
        """What makes a checkpoint this run's: dataset, plans, configuration, fold (the fold as text: 0 == "0")."""
        return self.dataset_name, self.plans_identifier, self.configuration, str(self.fold)

    def checkpoint_section(self, ema_fg_dice: float | None, best_ema: float | None, logging: dict) -> dict:
        """The checkpoint's "nnunet" section: nnU-Net's EMA/best/logging state plus this run's identity.
        One builder for our own checkpoints and those imported from a native nnU-Net run."""
        return {"ema_fg_dice": ema_fg_dice, "best_ema": best_ema, "logging": logging,
                **dict(zip(IDENTITY_KEYS, (self.dataset_name, self.plans_identifier, self.configuration, self.fold)))}

    def checkpoint_mismatch(self, section: dict) -> str | None:
        """None when a checkpoint's "nnunet" section belongs to this run (or it has none, e.g. a foreign
        Lightning checkpoint), else "trained on <theirs> but this run is <ours>"."""
        theirs = tuple(str(section.get(k)) for k in IDENTITY_KEYS)
        if not section or theirs == self.identity():
            return None
        return f"trained on {'/'.join(theirs)} but this run is {'/'.join(self.identity())}"


def _env_dir(var: str, purpose: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise RunSpecError(
            f"{var} is not set; {purpose}. Export it (e.g. `export {var}=/data/nnUNet/{var.split('_')[1]}`) "
            f"or omit --dataset to train the embedded demo."
        )
    return Path(value)


def resolve_dataset_name(dataset: str | int, preprocessed: Path) -> str:
    """Map an ID (`4`, `"004"`) or full name (`Dataset004_Hippocampus`) to the folder name, like nnunetv2."""
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        if not (preprocessed / text).is_dir():
            raise RunSpecError(
                f"dataset {text!r} not found in nnUNet_preprocessed={preprocessed}; run "
                f"`nnUNetv2_plan_and_preprocess -d {text[7:10]} -pl nnUNetPlannerResEncL` first or fix the name."
            )
        return text
    if not text.isdigit():
        raise RunSpecError(
            f"--dataset {text!r} is neither a dataset ID (e.g. 4) nor a name starting with 'Dataset' "
            f"(e.g. Dataset004_Hippocampus)."
        )
    prefix = f"Dataset{int(text):03d}_"
    found = sorted(p.name for p in preprocessed.glob(prefix + "*") if p.is_dir()) if preprocessed.is_dir() else []
    if not found:
        raise RunSpecError(
            f"no dataset with ID {int(text)} in nnUNet_preprocessed={preprocessed}; run "
            f"`nnUNetv2_plan_and_preprocess -d {int(text)} -pl nnUNetPlannerResEncL` or pick an existing ID."
        )
    if len(found) > 1:
        raise RunSpecError(f"dataset ID {int(text)} is ambiguous in {preprocessed}: {found}; pass the full name.")
    return found[0]


def load_plans(plans_file: Path) -> dict:
    """Read a plans JSON and check the keys we rely on, naming the first one missing."""
    try:
        plans = json.loads(plans_file.read_text())
    except json.JSONDecodeError as e:
        raise RunSpecError(
            f"plans file {plans_file} is not valid JSON ({e}); regenerate it with nnUNetv2_plan_experiment."
        ) from None
    for key in ("dataset_name", "plans_name", "configurations"):
        if key not in plans:
            raise RunSpecError(
                f"plans file {plans_file} has no {key!r} key; regenerate it with nnUNetv2_plan_experiment."
            )
    return plans


def _check_configuration(plans: dict, configuration: str, plans_file: Path) -> None:
    if configuration in UNSUPPORTED_CONFIGURATIONS:
        raise RunSpecError(f"--configuration {configuration} is not supported: {UNSUPPORTED_CONFIGURATIONS[configuration]}.")
    available = sorted(plans["configurations"])
    if configuration not in plans["configurations"]:
        raise RunSpecError(
            f"configuration {configuration!r} is not in {plans_file.name}; available: {', '.join(available)}."
        )
    resolved = _resolve_inheritance(plans, configuration)
    for key in REQUIRED_CONFIGURATION_KEYS:
        if key not in resolved:
            raise RunSpecError(
                f"configuration {configuration!r} in {plans_file} has no {key!r} key; regenerate the plans "
                f"with nnUNetv2_plan_experiment."
            )
    for key in REQUIRED_ARCHITECTURE_KEYS:
        if key not in resolved["architecture"]:
            raise RunSpecError(
                f"configuration {configuration!r} in {plans_file} has no 'architecture.{key}' key; regenerate "
                f"the plans with nnUNetv2_plan_experiment."
            )


def _resolve_inheritance(plans: dict, configuration: str, seen: tuple[str, ...] = ()) -> dict:
    """nnunetv2's `inherits_from` resolution (shallow update), on the raw dict so a missing key gets our message."""
    raw = plans["configurations"][configuration]
    parent = raw.get("inherits_from")
    if parent is None:
        return dict(raw)
    if parent not in plans["configurations"] or parent in seen:
        raise RunSpecError(f"configuration {configuration!r} inherits from {parent!r}, which is missing or circular; "
                           f"fix inherits_from in the plans.")
    return {**_resolve_inheritance(plans, parent, (*seen, configuration)), **raw}


def _check_fold(fold: int | str) -> int | str:
    if str(fold) == "all":
        return "all"
    try:
        fold = int(fold)
    except (TypeError, ValueError):
        raise RunSpecError(f"--fold {fold!r} is not a fold; use 0-4 or 'all'.") from None
    if fold < 0:
        raise RunSpecError(f"--fold {fold} is negative; use 0-4 (or a fold of your splits_final.json) or 'all'.")
    # A fold beyond splits_final.json (or beyond the 5 folds nnU-Net writes when it is missing): nnU-Net's do_split
    # trains a seeded random 80:20 split for it, and so do we (recipe.split calls it).
    return fold


def resolve_run(
    plans: str,
    dataset: str | int,
    configuration: str = "3d_fullres",
    fold: int | str = 0,
    trainer_name: str = "nnUNetTrainer_Lightning",
    preprocessed_root: Path | None = None,
    results_root: Path | None = None,
) -> RunSpec:
    """Resolve and validate dataset/plans/configuration/fold exactly the way nnunetv2 looks them up."""
    preprocessed_root = preprocessed_root or _env_dir("nnUNet_preprocessed", "it is where nnU-Net datasets live")
    dataset_name = resolve_dataset_name(dataset, preprocessed_root)
    base = preprocessed_root / dataset_name
    plans_file = base / f"{plans}.json" if not plans.endswith(".json") else Path(plans)
    if not plans_file.is_file():
        existing = sorted(p.stem for p in base.glob("*Plans*.json"))
        raise RunSpecError(
            f"plans {plans!r} not found in {base}; existing plans: {', '.join(existing) or 'none'} "
            f"(make them with `nnUNetv2_plan_experiment -d {dataset_name[7:10]} -pl nnUNetPlannerResEncL`)."
        )
    plans_dict = load_plans(plans_file)
    _check_configuration(plans_dict, configuration, plans_file)
    dataset_json_file = base / "dataset.json"
    if not dataset_json_file.is_file():
        raise RunSpecError(f"{dataset_json_file} is missing; rerun nnUNetv2_plan_and_preprocess for {dataset_name}.")
    dataset_json = json.loads(dataset_json_file.read_text())
    spec = RunSpec(
        dataset_name=dataset_name,
        plans_identifier=plans_dict["plans_name"],
        configuration=configuration,
        fold=_check_fold(fold),
        plans=plans_dict,
        dataset_json=dataset_json,
        preprocessed_base=base,
        output_folder=None,
        trainer_name=trainer_name,
        plans_file=plans_file,
    )
    data_folder = spec.preprocessed_data_folder
    if not data_folder.is_dir() or not any(data_folder.glob("*.pkl")):
        raise RunSpecError(
            f"{dataset_name} is not preprocessed for {configuration} ({data_folder} is missing or empty); run "
            f"`nnUNetv2_preprocess -d {spec.dataset_id} -plans_name {spec.plans_identifier} -c {configuration}`."
        )
    n_cases = len(list(data_folder.glob("*.pkl")))
    if spec.fold != "all" and not (base / "splits_final.json").is_file() and n_cases < 5:
        raise RunSpecError(
            f"{dataset_name} has {n_cases} preprocessed cases, too few for nnU-Net's 5-fold split; use --fold all "
            f"or write your own {base / 'splits_final.json'}."
        )
    if results_root is None and os.environ.get("nnUNet_results"):
        results_root = Path(os.environ["nnUNet_results"])
    if results_root is None:
        raise RunSpecError(
            "nnUNet_results is not set; it is where checkpoints are written. Export it "
            "(e.g. `export nnUNet_results=/data/nnUNet/results`)."
        )
    spec.output_folder = (
        results_root / dataset_name / f"{trainer_name}__{spec.plans_identifier}__{configuration}" / f"fold_{spec.fold}"
    )
    return spec
