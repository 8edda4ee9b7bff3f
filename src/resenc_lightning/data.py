"""nnU-Net's data pipeline as a LightningDataModule.

nnunetv2's dataset class, split, `nnUNetDataLoader`, batchgeneratorsv2 transforms and
(NonDet)MultiThreadedAugmenter are used as they are. We add only what Lightning needs: a finite
"epoch" view of nnU-Net's infinite augmenter (250/50 iterations), augmenters started after
Lightning has set the rank's device, and seeded workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from lightning.pytorch.utilities import rank_zero_warn
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from resenc_lightning import recipe
from resenc_lightning.data_checks import check_network_class, check_preprocessed_data
from resenc_lightning.device_augment import DeviceAugmentation, device_seed
from resenc_lightning.orphans import die_with_parent
from resenc_lightning.plans import RunSpec, resolve_run
from resenc_lightning.rng import collect_rng_states, run_seed, set_rng_states

#: nnU-Net's schedule (nnUNetTrainer.__init__).
NNUNET_TRAIN_ITERATIONS = 250
NNUNET_VAL_ITERATIONS = 50


class EpochBatches:
    """A finite, sized view (one epoch) of nnU-Net's infinite augmenter; Lightning iterates it per epoch.

    `already_done()` says how many of this epoch's batches a mid-epoch checkpoint already trained on; a resumed
    epoch then yields only the rest. For the in-process augmenter (global RNGs) the RNG states before the last two
    draws are kept, so a stop can rewind a batch that was fetched but not trained on (a prefetch) and the resumed
    run draws it again.
    """

    def __init__(self, source: Any, num_batches: int, already_done: Callable[[], int] | None = None) -> None:
        self.source = source
        self.num_batches = num_batches
        self.already_done = already_done
        self._drawn = 0
        self._rng_before: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        skip = self.already_done() if self.already_done is not None else 0
        in_process = isinstance(self.source, SingleThreadedAugmenter)
        self._drawn, self._rng_before = skip, {}
        for _ in range(self.num_batches - skip):
            if in_process:
                self._rng_before = {i: s for i, s in self._rng_before.items() if i >= self._drawn - 1}
                self._rng_before[self._drawn] = collect_rng_states()
            batch = next(self.source)
            self._drawn += 1
            yield batch

    def rewind_to(self, trained: int) -> None:
        """Put the global RNGs back to before batch `trained` of this epoch if it was fetched but not trained on."""
        if self._drawn > trained and trained in self._rng_before:
            set_rng_states(self._rng_before[trained])


def shutdown_augmenter(augmenter: Any) -> None:
    """Stop worker processes so no augmenter outlives the run."""
    finish = getattr(augmenter, "_finish", None)
    if finish is not None:
        finish()


class NnUNetDataModule(pl.LightningDataModule):
    """Training and validation batches exactly as nnUNetTrainer.get_dataloaders makes them.

    Args:
        plans: plans identifier (file name without .json), e.g. nnUNetResEncUNetLPlans.
        dataset: dataset ID or name under nnUNet_preprocessed; None trains the embedded demo.
        configuration: plans configuration (3d_fullres, 3d_lowres, 2d, or a custom one);
            None means 3d_fullres, or the demo's configuration for the demo.
        fold: 0-4 (nnU-Net's 5-fold split from splits_final.json) or "all".
        num_iterations_per_epoch: training batches per epoch (None: nnU-Net's 250; the demo's own).
        num_val_iterations_per_epoch: validation batches per epoch (None: nnU-Net's 50; the demo's own).
        oversample_foreground_percent: fraction of each batch centred on foreground (nnU-Net: 0.33).
        probabilistic_oversampling: oversample per sample with that probability instead of the last samples.
        num_workers: augmentation processes; None honours nnUNet_n_proc_DA like nnU-Net; 0 = in-process.
        seed: base seed of the augmentation workers (None: the run seed, PL_GLOBAL_SEED, else 12345).
        trainer_name: the `<trainer>` part of nnU-Net's output folder name.
        results_dir: where runs are written; None means $nnUNet_results.
        enable_deep_supervision: build deep-supervision targets. Not a CLI option: the CLI links it from
            `--model.enable_deep_supervision`, so one flag drives targets, network and loss (as nnU-Net's trainer).
        augment_on_device: the CPU workers only load and crop (at the initial patch size, with nnU-Net's
            oversampling); nnU-Net's training transforms then run on the training device before the forward pass
            (see device_augment.py). Validation is unchanged.
    """

    def __init__(
        self,
        plans: str = "nnUNetResEncUNetLPlans",
        dataset: str | None = None,
        configuration: str | None = None,
        fold: str = "0",
        num_iterations_per_epoch: int | None = None,
        num_val_iterations_per_epoch: int | None = None,
        oversample_foreground_percent: float = 0.33,
        probabilistic_oversampling: bool = False,
        num_workers: int | None = None,
        seed: int | None = None,
        trainer_name: str = "nnUNetTrainer_Lightning",
        results_dir: str | None = None,
        enable_deep_supervision: bool = True,
        augment_on_device: bool = False,
    ) -> None:
        super().__init__()
        self.is_demo = dataset is None
        if self.is_demo:
            from resenc_lightning import demo

            info = demo.ensure_demo_dataset(plans=plans)
            dataset = info.dataset_name
            configuration = configuration or info.configuration
            num_iterations_per_epoch = num_iterations_per_epoch or info.num_iterations_per_epoch
            num_val_iterations_per_epoch = num_val_iterations_per_epoch or info.num_val_iterations_per_epoch
        self.spec: RunSpec = resolve_run(
            plans, dataset, configuration or "3d_fullres", fold, trainer_name=trainer_name,
            results_root=Path(results_dir) if results_dir else None,
        )
        check_network_class(self.spec)
        check_preprocessed_data(self.spec)  # seconds now instead of a crash hours into the run
        self.num_iterations_per_epoch = num_iterations_per_epoch or NNUNET_TRAIN_ITERATIONS
        self.num_val_iterations_per_epoch = num_val_iterations_per_epoch or NNUNET_VAL_ITERATIONS
        self.oversample_foreground_percent = oversample_foreground_percent
        self.probabilistic_oversampling = probabilistic_oversampling
        self.num_workers = num_workers
        self.seed = seed
        self.enable_deep_supervision = enable_deep_supervision
        self.augment_on_device = bool(augment_on_device)
        self.device_augmentation: DeviceAugmentation | None = None
        self._train_augmenter = None
        self._val_augmenter = None
        self.batch_size: int | None = None
        self.rank_oversample: float | None = None

    # -- recipe ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Legacy .npz data: unpack to .npy once, as nnUNetTrainer.on_train_start does (a no-op for blosc2).

        Lightning runs this on local rank 0 before any rank's setup and augmentation workers, then barriers,
        which is nnU-Net's `if local_rank == 0: unpack_dataset(...)` + `dist.barrier()`. Without it every read
        of a case would decompress the whole .npz.
        """
        folder = str(self.spec.preprocessed_data_folder)
        infer_dataset_class(folder).unpack_dataset(
            folder, overwrite_existing=False, num_processes=max(1, round(recipe.n_proc_da() // 2)), verify=True,
        )

    def setup(self, stage: str | None = None) -> None:
        view = recipe.trainer_view(self.spec, oversample_foreground_percent=self.oversample_foreground_percent,
                                   enable_deep_supervision=self.enable_deep_supervision)
        self.batch_size, self.rank_oversample = recipe.batch_size_and_oversample(view)
        self.aug = recipe.augmentation_params(view)
        self.train_keys, self.val_keys = recipe.split(view)
        dataset_class = infer_dataset_class(str(self.spec.preprocessed_data_folder))
        folder = str(self.spec.preprocessed_data_folder)
        patch = view.configuration_manager.patch_size
        self._dl_train = nnUNetDataLoader(
            dataset_class(folder, self.train_keys), self.batch_size, self.aug.initial_patch_size, patch,
            view.label_manager, oversample_foreground_percent=self.rank_oversample,
            probabilistic_oversampling=self.probabilistic_oversampling,
            transforms=None if self.augment_on_device else recipe.training_transforms(view, self.aug),
        )
        if self.augment_on_device and self.device_augmentation is None:
            base = self.seed if self.seed is not None else run_seed()
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.device_augmentation = DeviceAugmentation(recipe.training_transforms(view, self.aug),
                                                          seed=device_seed(base, rank))
        self._dl_val = nnUNetDataLoader(
            dataset_class(folder, self.val_keys), self.batch_size, patch, patch, view.label_manager,
            oversample_foreground_percent=self.rank_oversample,
            probabilistic_oversampling=self.probabilistic_oversampling,
            transforms=recipe.validation_transforms(view),
        )

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(self.spec.configuration_manager.patch_size)

    def workers(self) -> int:
        return recipe.n_proc_da() if self.num_workers is None else int(self.num_workers)

    def _worker_seeds(self, n: int, offset: int) -> list[int]:
        """Distinct per rank/worker/stream and reproducible from the run seed and the epoch we start at."""
        base = self.seed if self.seed is not None else run_seed()
        rank = self.trainer.global_rank if self.trainer is not None else 0
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        rs = np.random.SeedSequence([base, rank, epoch, offset])
        return [int(s) for s in rs.generate_state(n)]

    def _augmenter(self, loader: nnUNetDataLoader, train: bool):
        n = self.workers()
        if n == 0:
            return SingleThreadedAugmenter(loader, None)
        die_with_parent(loader)  # a kill -9 of the trainer must not leave workers behind
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        num_processes = n if train else max(1, n // 2)
        cached = max(6, n // 2) if train else max(3, n // 4)
        return NonDetMultiThreadedAugmenter(
            loader, None, num_processes=num_processes, num_cached=cached,
            seeds=self._worker_seeds(num_processes, 0 if train else 1), pin_memory=pin, wait_time=0.002,
        )

    # -- Lightning hooks --------------------------------------------------------------------------------
    def train_dataloader(self) -> EpochBatches:
        # Called by Lightning after the rank's device is set: the pin-memory thread binds to it.
        if self._train_augmenter is None:
            self._train_augmenter = self._augmenter(self._dl_train, train=True)
        return EpochBatches(self._train_augmenter, self.num_iterations_per_epoch, self._batches_done_this_epoch)

    def _batches_done_this_epoch(self) -> int:
        """At a mid-epoch resume: the batches of the epoch the checkpoint had trained on (else 0)."""
        loop = self.trainer.fit_loop.epoch_loop if self.trainer is not None else None
        if loop is None or not loop.restarting:
            return 0
        done = int(loop.batch_progress.current.completed)
        return done if done < self.num_iterations_per_epoch else 0

    def val_dataloader(self) -> EpochBatches:
        if self._val_augmenter is None:
            self._val_augmenter = self._augmenter(self._dl_val, train=False)
        return EpochBatches(self._val_augmenter, self.num_val_iterations_per_epoch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With augment_on_device: nnU-Net's training transforms on the device, on training batches only."""
        if self.device_augmentation is not None and self.trainer is not None and self.trainer.training:
            return self.device_augmentation(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The device augmentation's random stream, every rank's (empty, so not saved, with the switch off)."""
        if self.device_augmentation is None:
            return {}
        state = self.device_augmentation.state_dict()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"device_augmentation": [state]}
        # every rank dumps the checkpoint (rank 0 writes it), so every rank reaches this collective
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, state)
        return {"device_augmentation": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict.get("device_augmentation")
        if self.device_augmentation is None or not per_rank:
            return
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        if len(per_rank) == world:
            self.device_augmentation.load_state_dict(per_rank[rank])
        else:
            rank_zero_warn(f"The checkpoint holds device-augmentation streams for {len(per_rank)} process(es), this run "
                           f"has {world}: each rank keeps its stream seeded from (seed, rank).")

    def on_exception(self, exception: BaseException) -> None:
        """Lightning skips teardown when fit ends by an exception (SIGTERM stop, OOM, ...): stop the workers here."""
        self.teardown("fit")

    def teardown(self, stage: str | None = None) -> None:
        for attr in ("_train_augmenter", "_val_augmenter"):
            augmenter = getattr(self, attr)
            if augmenter is not None:
                shutdown_augmenter(augmenter)
                setattr(self, attr, None)
