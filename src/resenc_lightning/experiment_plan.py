"""Which (configuration, fold) jobs an experiment has, where each writes, and which are finished: from the fold
folders only, so a rerun of the same command skips done folds and resumes the rest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from resenc_lightning.plans import resolve_dataset_name

CASCADE = "3d_cascade_fullres"
#: what a cascade configuration needs first (its previous stage), as nnU-Net's cascade does
NEEDS = {CASCADE: "3d_lowres"}


@dataclass(frozen=True)
class FoldJob:
    configuration: str
    fold: str
    folder: Path  # nnU-Net's fold folder: <results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<k>

    @property
    def name(self) -> str:
        return f"{self.configuration} fold {self.fold}"

    @property
    def done(self) -> bool:
        """nnU-Net's own "finished" mark: the exported final checkpoint."""
        return (self.folder / "checkpoint_final.pth").is_file()

    @property
    def started(self) -> bool:
        """Checkpoints exist: the job continues with --resume."""
        return any((self.folder / "checkpoints").glob("*.ckpt")) or any(self.folder.glob("hpc_ckpt_*.ckpt"))

    def train_args(self, cfg_plans: str, dataset: str, trainer_name: str, results: Path, extra: list[str]) -> list[str]:
        args = ["--plans", cfg_plans, "--dataset", dataset, "--configuration", self.configuration, "--fold", self.fold,
                "--data.trainer_name", trainer_name, "--data.results_dir", str(results), *extra]
        return [*args, "--resume", "true"] if self.started else args


def results_root(results_dir: str | None) -> Path:
    value = results_dir or os.environ.get("nnUNet_results")
    if not value:
        raise SystemExit("error: no --results_dir and $nnUNet_results is unset; set one of them.")
    return Path(value)


def dataset_name(dataset: str) -> str:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise SystemExit("error: $nnUNet_preprocessed is unset; export it (where nnUNetv2_plan_and_preprocess wrote).")
    try:
        return resolve_dataset_name(dataset, Path(root))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def plan(configurations: list[str], folds: list[str], plans: str, trainer_name: str, results: Path,
         dataset: str) -> list[list[FoldJob]]:
    """The jobs in waves: a wave starts once the previous one finished (cascade after its 3d_lowres)."""
    for configuration, needed in NEEDS.items():
        if configuration in configurations and needed not in configurations:
            model = results / dataset / f"{trainer_name}__{plans}__{needed}"
            missing = [f for f in folds if not (model / f"fold_{f}" / "checkpoint_final.pth").is_file()]
            if missing:
                raise SystemExit(f"error: {configuration} needs {needed} folds {' '.join(missing)} finished in {model}; "
                                 f"add {needed} to --configurations.")
    first = [c for c in configurations if c not in NEEDS]
    later = [c for c in configurations if c in NEEDS]

    def jobs(configs: list[str]) -> list[FoldJob]:
        return [FoldJob(c, str(f), results / dataset / f"{trainer_name}__{plans}__{c}" / f"fold_{f}")
                for c in configs for f in folds]

    return [w for w in (jobs(first), jobs(later)) if w]
