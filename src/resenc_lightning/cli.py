"""`python train.py ...`: LightningCLI over the nnU-Net DataModule and the ResEnc module.

`--plans/--dataset/--configuration/--fold` read like `nnUNetv2_train`; everything else is
LightningCLI (`--config configs/x.yaml`, `--trainer.*`, `--model.*`, `--data.*`,
`--print_config`). This file holds only the glue: nnU-Net's defaults for the Trainer, the demo when
no `--dataset` is given, the output folder, the forced callbacks, and one-line errors. Which checkpoint
`--resume` continues from is resume.py's policy; native checkpoints are nnunet_import.py's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from resenc_lightning import demo, quiet
from resenc_lightning.atomic import CheckpointWriteError
from resenc_lightning.background_io import BackgroundCheckpointIO
from resenc_lightning.callbacks.checkpoint_boundaries import CheckpointBoundaries
from resenc_lightning.callbacks.cudnn_pinning import CudnnPinning
from resenc_lightning.callbacks.epoch_timing import EpochTiming
from resenc_lightning.callbacks.gpu_monitor import GpuMonitor
from resenc_lightning.callbacks.graceful_stop import GracefulStop
from resenc_lightning.callbacks.memory_cap import CudaMemoryCap, MemoryTargetError
from resenc_lightning.callbacks.nnunet_export import NnUNetExport
from resenc_lightning.callbacks.rng_state import RNGStateCheckpoint
from resenc_lightning.data import NnUNetDataModule
from resenc_lightning.fault_hooks import PauseAt, pause_in_final_validation
from resenc_lightning.loggers import build_fold_loggers, defer_fold_loggers
from resenc_lightning.module import ResEncUNetModule, drop_compiled_duplicates
from resenc_lightning.plans import RunSpec, RunSpecError
from resenc_lightning.rank_watchdog import (
    launching_ranks,
    leave_after_launcher,
    outlive_started_ranks,
    watch_launcher,
)
from resenc_lightning.resume import LAST_CHECKPOINT, ResumeError, resume_checkpoint, validation_checkpoint
from resenc_lightning.stop_signals import StopSignals, install_on
from resenc_lightning.validation_stop import ValidationStopped, stop_on_signal

#: nnUNetTrainer's loop settings expressed as Trainer defaults (each overridable with --trainer.*).
TRAINER_DEFAULTS: dict[str, Any] = {
    "gradient_clip_val": 12.0,
    "gradient_clip_algorithm": "norm",
    "num_sanity_val_steps": 0,  # nnU-Net does not validate before training (and it would shift RNG)
    "use_distributed_sampler": False,  # each rank draws its own random cases, like nnU-Net
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": 50,  # lowered to the epoch's length when shorter (the demo's 12): we log per epoch
    # Lightning's table would show a FLOPs column of zeros (it counts FLOPs only with an example input, a full
    # forward pass we do not spend); the CLI prints one line with the network and its size instead.
    "enable_model_summary": False,
}
#: Our boolean options also work bare, as nnU-Net's flags (`--resume` = `--resume true`; `--resume false` still works).
BARE_FLAG: dict[str, Any] = {"nargs": "?", "const": True}
CHECKPOINT_DIR = "checkpoints"


class UsageError(SystemExit):
    """A one-line, user-fixable error: printed without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


class ResEncLightningCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.resume = False
        self.fold_loggers: list[tuple[int, Any]] = []
        self.logger_config: Any = None
        self.stop_signals = StopSignals()  # flag-only handlers, installed from the fit's start to the very end
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--plans", type=str, default="nnUNetResEncUNetLPlans",
                            help="nnU-Net plans identifier (file name in the dataset's preprocessed folder).")
        parser.add_argument("--dataset", type=str | None, default=None,
                            help="Dataset ID or name in $nnUNet_preprocessed; omit to train the embedded demo.")
        parser.add_argument("--configuration", type=str | None, default=None,
                            help="Plans configuration: 3d_fullres (default), 3d_lowres, 2d or a custom one.")
        parser.add_argument("--fold", type=str, default="0", help="Fold 0-4 of nnU-Net's split, or 'all'.")
        parser.add_argument("--resume", type=bool, default=False, **BARE_FLAG,
                            help="Continue from the fold's last checkpoint (nnU-Net's --c).")
        parser.add_argument("--save_every", type=int, default=50,
                            help="Keep a snapshot checkpoint, and refresh nnU-Net's checkpoint_latest.pth, every N epochs "
                                 "(nnU-Net's save_every).")
        parser.add_argument("--memcheck", type=bool, default=False, **BARE_FLAG,
                            help="Run real training steps at the plans' batch and patch on the GPU (one that lets cuDNN "
                                 "benchmark, then two measured ones) and report their peak memory against the card "
                                 "and the plans' VRAM target; no training.")
        parser.add_argument("--final_validation", type=bool, default=True, **BARE_FLAG,
                            help="After training, nnU-Net's final validation: sliding-window prediction of the fold's "
                                 "validation cases, validation/summary.json, plus validation/summary_surface.json.")
        parser.add_argument("--validate_only", type=bool, default=False, **BARE_FLAG,
                            help="Only run the final validation from the fold's last checkpoint (nnU-Net's --val).")
        parser.add_argument("--npz", type=bool, default=False, **BARE_FLAG,
                            help="Final validation also saves the softmax (validation/<case>.npz + .pkl) as nnU-Net's "
                                 "--npz; needed to ensemble configurations with nnUNetv2_find_best_configuration.")
        parser.add_argument("--val_best", type=bool, default=False, **BARE_FLAG,
                            help="With --validate_only: use the best (EMA pseudo-Dice) checkpoint (nnU-Net's --val_best).")
        parser.add_argument("--init_from_nnunet", type=str | None, default=None,
                            help="Initialise the network from a native nnU-Net checkpoint_*.pth (weights only, "
                                 "segmentation heads excepted, like nnU-Net's -pretrained_weights); loaded on the CPU.")
        parser.add_argument("--resume_from_nnunet", type=str | None, default=None,
                            help="Continue a native nnU-Net run from its checkpoint_latest/final.pth (weights, optimizer, "
                                 "epoch, EMA/best, logging), with our callbacks; loaded on the CPU.")
        parser.add_argument("--seed", type=int | None, default=None,
                            help="Seed everything (alias of --seed_everything; also seeds the augmentation workers).")
        parser.add_argument("--deterministic", type=bool, default=False, **BARE_FLAG,
                            help="Deterministic algorithms (alias of --trainer.deterministic true): with --seed and "
                                 "nnUNet_n_proc_DA=0 a CPU run repeats bit for bit, across kill -9 and --resume too.")
        parser.add_argument("--require_exclusive_gpu", type=bool, default=False, **BARE_FLAG,
                            help="Refuse to train when other processes use the GPU (see --gpu_monitor.*).")
        # The stable-epoch callbacks: on by default, each switchable off (--<name>.enabled false).
        parser.add_lightning_class_args(CudaMemoryCap, "memory_cap")
        parser.add_lightning_class_args(CudnnPinning, "cudnn_pinning")
        parser.add_lightning_class_args(EpochTiming, "epoch_timing")
        parser.add_lightning_class_args(GpuMonitor, "gpu_monitor")
        parser.add_lightning_class_args(NnUNetExport, "nnunet_export")
        parser.link_arguments("require_exclusive_gpu", "gpu_monitor.require_exclusive_gpu")
        parser.link_arguments("save_every", "nnunet_export.latest_every")
        for name in ("plans", "dataset", "configuration", "fold"):
            parser.link_arguments(name, f"data.{name}")
        parser.link_arguments("data.spec", "model.spec", apply_on="instantiate")
        # one flag for network, loss and targets, as nnU-Net's trainer (its DS scales drive the transforms)
        parser.link_arguments("model.enable_deep_supervision", "data.enable_deep_supervision")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from jsonargparse import ArgumentError

        parser.exit_on_error = False  # one line instead of the full usage text
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            message = " ".join(str(e).split())
            raise UsageError(f"{message}; see `python train.py --help` for the accepted options "
                             f"(or `--print_config` for a valid config).") from None
        # before LightningCLI seeds (it reads seed_everything right after parsing)
        if self.config.get("seed") is not None:
            self.config["seed_everything"] = self.config["seed"]
        if self.config.get("deterministic"):
            self.config.trainer.deterministic = True
        if self.config.get("dataset") is None:
            print(f"resenc-lightning: no --dataset given, training the embedded demo dataset "
                  f"({demo.DEMO_DATASET_NAME}, plans {self.config.get('plans')}).", flush=True)

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        self.resume = bool(cfg.get("resume"))
        if cfg.get("dataset") is None:
            resolve_demo(cfg)
        elif cfg.trainer.max_epochs is None:
            cfg.trainer.max_epochs = 1000
        self.logger_config = cfg.trainer.get("logger")  # as given, for the saved config.yaml
        self.fold_loggers = defer_fold_loggers(cfg.trainer)  # W&B/MLflow without save_dir: built in the fold folder

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except RunSpecError as e:
            raise UsageError(str(e)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        out = self.output_folder
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        config["default_root_dir"] = config.get("default_root_dir") or str(out)
        iterations = int(self.datamodule.num_iterations_per_epoch)
        if config.get("log_every_n_steps") == TRAINER_DEFAULTS["log_every_n_steps"] and iterations < TRAINER_DEFAULTS[
                "log_every_n_steps"]:
            config["log_every_n_steps"] = iterations  # else Lightning warns that an epoch is shorter than the interval
        config["logger"] = build_fold_loggers(config.get("logger"), self.fold_loggers, out)
        if self.fold_loggers:
            self._get(self.config, "trainer").logger = self.logger_config
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(save_dir=str(out), name="logs")
        on_cuda = _uses_cuda(config.get("accelerator"))
        limit_torch_threads(on_cuda)
        config["deterministic"] = deterministic_mode(config.get("deterministic"), on_cuda)
        if config.get("precision") is None:
            config["precision"] = "16-mixed" if on_cuda else "32-true"
        if config.get("benchmark") is None and on_cuda and not config.get("deterministic"):
            config["benchmark"] = True  # nnU-Net's run_training sets cudnn.benchmark on CUDA
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            if sys.stdout.isatty():
                callbacks.append(RichProgressBar())
            else:
                config["enable_progress_bar"] = False  # plain per-epoch lines in CI / SLURM logs
        config["callbacks"] = callbacks
        plugins = config.get("plugins")
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # atomic files (a crash mid-save never leaves a truncated .ckpt), written off the training thread
            plugins.append(BackgroundCheckpointIO())
        config["plugins"] = plugins
        return self._instantiate_trainer(config, extra + self.forced_callbacks())

    # -- helpers -----------------------------------------------------------------------------------------
    @property
    def output_folder(self) -> Path:
        return Path(self.datamodule.spec.output_folder)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_folder / CHECKPOINT_DIR

    def forced_callbacks(self) -> list:
        save_every = int(self.config.get("save_every") or 50)
        # last.ckpt every epoch. (ModelCheckpoint's own save_last only refreshes last.ckpt when a top-k checkpoint
        # is written, i.e. here only when the EMA improves: an interrupted run could lose epochs.)
        return [
            ModelCheckpoint(dirpath=self.checkpoint_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                            enable_version_counter=False, save_on_train_epoch_end=True),
            ModelCheckpoint(dirpath=self.checkpoint_dir, filename="best", monitor="ema_fg_dice", mode="max",
                            save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=True),
            # mode="max" (unused without a monitor) keeps its state key distinct from last's when --save_every 1
            ModelCheckpoint(dirpath=self.checkpoint_dir, filename="epoch_{epoch:04d}", auto_insert_metric_name=False,
                            every_n_epochs=save_every, save_top_k=-1, monitor=None, mode="max",
                            enable_version_counter=False, save_on_train_epoch_end=True),
            RNGStateCheckpoint(),
            *([pause] if (pause := PauseAt.from_env()) is not None else []),  # test-only, before GracefulStop
            GracefulStop(self.checkpoint_dir / LAST_CHECKPOINT, self.stop_signals),
            CheckpointBoundaries(),  # after NnUNetExport: the end of training waits for checkpoint_final.pth too
        ]

    def import_native_checkpoint(self, path: str, ckpt_path: str | None) -> str:
        """Turn a native nnU-Net checkpoint into a Lightning one in this fold's checkpoints/ and resume from it."""
        from resenc_lightning.nnunet_import import NnUNetImportError, import_native_run

        if ckpt_path is not None or self.config.get("init_from_nnunet"):
            raise UsageError("--resume_from_nnunet starts a fold from a native checkpoint; it excludes --resume and "
                             "--init_from_nnunet.")
        dm = self.datamodule
        try:
            return str(import_native_run(path, self.trainer, self.model, dm.num_iterations_per_epoch,
                                         dm.num_val_iterations_per_epoch, self.checkpoint_dir))
        except NnUNetImportError as e:
            raise UsageError(str(e)) from None

    def load_weights_for_validation(self) -> str:
        try:
            path = validation_checkpoint(self.checkpoint_dir, bool(self.config.get("val_best")))
        except ResumeError as e:
            raise UsageError(str(e)) from None
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        self.model.load_state_dict(drop_compiled_duplicates(state), strict=True)
        return f"checkpoint {path}"

    def resolve_ckpt_path(self) -> str | None:
        """The checkpoint to continue from (resume.py's policy), or None for a fresh start."""
        try:
            return resume_checkpoint(self.checkpoint_dir, self.output_folder, self.datamodule.spec, self.resume,
                                     self.trainer.is_global_zero)
        except ResumeError as e:
            raise UsageError(str(e)) from None

def resolve_demo(cfg: Any) -> None:
    """No --dataset means the embedded demo: build it once (nnunetv2's planner and preprocessor, cached) and fill in
    its dataset, configuration and short schedule wherever the user left them open."""
    info = demo.ensure_demo_dataset(plans=cfg.get("plans"))
    cfg.data.dataset = info.dataset_name
    cfg.data.configuration = cfg.data.configuration or info.configuration
    cfg.data.num_iterations_per_epoch = cfg.data.num_iterations_per_epoch or info.num_iterations_per_epoch
    cfg.data.num_val_iterations_per_epoch = cfg.data.num_val_iterations_per_epoch or info.num_val_iterations_per_epoch
    if cfg.trainer.max_epochs is None:
        cfg.trainer.max_epochs = info.max_epochs


def validate(cli: ResEncLightningCLI, source: str, redo: str = "--resume") -> dict:
    """nnU-Net's final validation of the fold (all ranks take part; metrics on rank 0). A stop signal abandons it on
    every rank (validation_stop.py) and exits 128 + signal; `redo` names the flag that runs it again."""
    from resenc_lightning.validation import run_final_validation

    device = cli.trainer.strategy.root_device
    model = cli.model.to(device)
    if cli.datamodule.batch_size is None:
        cli.datamodule.setup("validate")
    signals = cli.stop_signals
    pause = pause_in_final_validation(model.network, lambda: signals.received is not None)  # test-only
    try:
        with stop_on_signal(model.network, lambda: signals.received):
            result = run_final_validation(model.network, cli.datamodule.spec, device,
                                          model.inference_allowed_mirroring_axes, int(cli.datamodule.batch_size),
                                          save_probabilities=bool(cli.config.get("npz")))
    except ValidationStopped as stopped:
        if cli.trainer.is_global_zero:
            print(f"Stopped by {signal.Signals(stopped.signum).name} during the final validation of {source}; its "
                  f"results are incomplete, the checkpoints intact: run it again with {redo}.", flush=True)
        leave_after_launcher()
        raise SystemExit(_signal_exit_code(stopped.signum)) from None
    finally:
        if pause is not None:
            pause.remove()
    if cli.trainer.is_global_zero:
        dice = result.get("final_val/foreground_dice")
        print(f"Final validation of {source}: foreground mean Dice {dice:.4f}; {result['summary']}, "
              f"{result.get('summary_surface')}", flush=True)
    return result


def check_world_size(trainer: Trainer, spec: RunSpec) -> None:
    """nnU-Net splits the plans' batch over the ranks, so there cannot be more ranks than samples."""
    nodes, devices = int(trainer.num_nodes), int(trainer.num_devices)
    batch = int(spec.configuration_manager.batch_size)
    if nodes * devices > batch:
        raise UsageError(
            f"{nodes * devices} processes ({nodes} node(s) x {devices} device(s)) exceed the global batch size {batch} "
            f"of {spec.plans_identifier} {spec.configuration}, which nnU-Net splits over the ranks; use at most {batch} "
            f"processes (--trainer.devices / --trainer.num_nodes) or plan a larger batch size."
        )


def _uses_cuda(accelerator: Any) -> bool:
    """Whether the Trainer will run on CUDA: accelerator auto/gpu/cuda (name or instance) and a GPU present."""
    if not torch.cuda.is_available():
        return False
    if accelerator is None:
        return True
    name = (accelerator if isinstance(accelerator, str) else type(accelerator).__name__).lower()
    return name in ("auto", "gpu") or "cuda" in name


#: nnunetv2/run/run_training.py's `__main__` sets these to 1 (after its imports, before training starts anything).
NNUNET_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


def limit_torch_threads(on_cuda: bool) -> bool:
    """nnU-Net's run_training on CUDA ("multithreading in torch doesn't help nnU-Net if run on GPU"): one intra-op and
    one inter-op thread in the training process, leaving the cores to the augmentation workers, and nnU-Net's thread
    variables at 1 for the processes the run starts (DDP ranks, inductor's compile workers; the augmentation workers
    inherit them). Called before the Trainer exists, so before any of those start. A value the user exported stands
    (nnUNetv2_train never sets them; only `python run_training.py` overwrites). Inductor read its compile-pool size
    when lightning imported its config, so that is set directly too. CPU runs keep the defaults. Returns whether the
    limit was applied."""
    if not on_cuda:
        return False
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # allowed only once, before any inter-op work (a second main() in one process)
        pass
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    for name in NNUNET_THREAD_ENV:
        os.environ.setdefault(name, "1")
    return True


def deterministic_mode(requested: Any, on_cuda: bool) -> Any:
    """Lightning's `deterministic` for this run. On CUDA, `True` would make torch raise on the first training step
    (AvgPool3d backward in ResEnc's skip path and CUDA NLLLoss have no deterministic kernel), so it becomes "warn":
    deterministic kernels wherever torch has one, a warning where not; said in one line. CPU keeps `True`."""
    if requested is True and on_cuda:
        print("resenc-lightning: --trainer.deterministic true on CUDA -> \"warn\": AvgPool3d backward (ResEnc skip path) "
              "and NLLLoss have no deterministic CUDA kernel, so CUDA runs are close but not bit-exact; CPU runs are.",
              flush=True)
        return "warn"
    return requested


#: The seed a run gets without --seed: Lightning's own fallback, given explicitly (no "No seed found" warning).
DEFAULT_SEED = 0


def build_cli(args: list[str] | None = None) -> ResEncLightningCLI:
    quiet.install()
    return ResEncLightningCLI(
        ResEncUNetModule,
        NnUNetDataModule,
        run=False,
        seed_everything_default=DEFAULT_SEED,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": __doc__.split("\n")[0], "default_env": False},
        args=args,
    )


def model_line(model: ResEncUNetModule) -> str:
    """What Lightning's model summary would tell a user, in one line (`--trainer.enable_model_summary true`: its
    table)."""
    spec = model.spec
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"Network: {type(model.network).__name__} ({spec.plans_identifier} / {spec.configuration}), "
            f"{params / 1e6:.1f} M parameters ({trainable / 1e6:.1f} M trainable, {params * 4 / 1e6:.1f} MB in fp32).")


def _signal_exit_code(signum: int | None) -> int:
    """The shell's 128 + signal number, so a script tells "stopped, resumable" from finished (0) and failed (1)."""
    return 128 + int(signum or signal.SIGTERM)


def fit(cli: ResEncLightningCLI, ckpt_path: str | None, keep_signals: bool = False) -> None:
    """trainer.fit with the faults a user can act on turned into one-line errors. Stop signals are flag-only from
    here on (stop_signals.py); `keep_signals` leaves them installed after a completed fit, for the final validation."""
    trainer = cli.trainer
    installed = install_on(trainer, cli.stop_signals)
    completed = False
    try:
        with launching_ranks(trainer):  # the ranks it starts end if this process dies (rank_watchdog.py)
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        completed = True
    except SIGTERMException:
        stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
        signum = stop.received if stop is not None else None
        saved = stop.saved_to if stop is not None and stop.saved_to is not None else cli.checkpoint_dir / LAST_CHECKPOINT
        then = "the requeued job resumes from it" if stop is not None and stop.requeue else "continue with --resume"
        if trainer.is_global_zero:
            print(f"Stopped by {signal.Signals(signum or signal.SIGTERM).name} at epoch {trainer.current_epoch}, step "
                  f"{trainer.global_step}; {saved} holds it, {then}.", flush=True)
        leave_after_launcher()
        raise SystemExit(_signal_exit_code(signum)) from None
    except CheckpointWriteError as e:
        raise UsageError(str(e.strerror or e)) from None
    except MemoryTargetError as e:
        raise UsageError(str(e)) from None
    except torch.OutOfMemoryError:
        if trainer.global_step > 0:
            raise
        from resenc_lightning.memory_target import first_step_oom_message

        raise UsageError(first_step_oom_message(cli.datamodule.spec, trainer.strategy.root_device)) from None
    finally:
        if installed and not (completed and keep_signals):
            cli.stop_signals.restore()


def main(args: list[str] | None = None) -> Path | None:
    with watch_launcher():  # in a rank Lightning's launcher started: end it when the launcher dies
        return _main(args)


def _main(args: list[str] | None) -> Path | None:
    cli = build_cli(args)
    if cli.config.get("memcheck"):
        from resenc_lightning.memcheck import MemcheckError, run_memcheck

        try:
            result = run_memcheck(cli.model, cli.datamodule, precision=str(cli.trainer.precision))
        except MemcheckError as e:
            raise UsageError(str(e)) from None
        print(result.report(), flush=True)
        return None
    if cli.config.get("validate_only"):
        source = cli.load_weights_for_validation()
        install_on(cli.trainer, cli.stop_signals)
        try:
            validate(cli, source, redo="--validate_only")
        finally:
            cli.stop_signals.restore()
        return cli.output_folder
    check_world_size(cli.trainer, cli.datamodule.spec)
    ckpt_path = cli.resolve_ckpt_path()
    if cli.config.get("resume_from_nnunet"):
        ckpt_path = cli.import_native_checkpoint(cli.config["resume_from_nnunet"], ckpt_path)
    if cli.config.get("init_from_nnunet"):
        if ckpt_path is not None:
            raise UsageError("--init_from_nnunet and --resume exclude each other (as nnU-Net's -pretrained_weights "
                             "and --c): resume restores its own weights.")
        from resenc_lightning.nnunet_import import NnUNetImportError, init_from_nnunet

        try:
            copied = init_from_nnunet(cli.model.network, cli.config["init_from_nnunet"])
        except NnUNetImportError as e:
            raise UsageError(str(e)) from None
        print(f"Initialised {len(copied)} weights from {cli.config['init_from_nnunet']}", flush=True)
    if cli.trainer.is_global_zero:
        print(model_line(cli.model), flush=True)
    if ckpt_path is not None:
        quiet.resuming(cli.checkpoint_dir)
    fit(cli, ckpt_path, keep_signals=True)
    try:
        if cli.config.get("final_validation") and not cli.trainer.interrupted:
            validate(cli, "the trained network")
    finally:
        cli.stop_signals.restore()
    outlive_started_ranks(cli.trainer)  # none of them finds its launcher gone while it finishes
    out = cli.output_folder
    if cli.trainer.is_global_zero:
        print(f"Output folder: {out}", flush=True)
    return out
