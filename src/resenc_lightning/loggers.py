"""Loggers picked with `--trainer.logger` (W&B, MLflow) write into the fold's output folder unless told otherwise.

Lightning's own defaults put them in the current directory (`./wandb`, `./mlruns`), which mixes the runs of every
fold started from there; nnU-Net users look for everything of a fold under its output folder, as our CSV logs are.
The fold folder is known only once the DataModule has resolved the run, after LightningCLI would have built the
loggers (and MLflow's file store creates its folder as soon as it is built), so such loggers are taken out of the
config before instantiation and built by the CLI in `instantiate_trainer`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

#: logger class -> sub folder of the fold's output folder given as its save_dir (W&B adds its own `wandb/`).
FOLD_SUBFOLDER: dict[str, str] = {
    "lightning.pytorch.loggers.WandbLogger": "",
    "lightning.pytorch.loggers.wandb.WandbLogger": "",
    "lightning.pytorch.loggers.MLFlowLogger": "mlruns",
    "lightning.pytorch.loggers.mlflow.MLFlowLogger": "mlruns",
}


def _entries(logger_cfg: Any) -> list[Any]:
    if isinstance(logger_cfg, (list, tuple)):
        return list(logger_cfg)
    return [logger_cfg] if logger_cfg is not None and not isinstance(logger_cfg, bool) else []


def _class_path(entry: Any) -> str | None:
    return entry.get("class_path") if hasattr(entry, "get") else None


def _plain(namespace: Any) -> dict:
    if namespace is None:
        return {}
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _user_gave_dir(entry: Any, class_path: str) -> bool:
    """Whether save_dir (or W&B's `dir`) differs from Lightning's default, i.e. the user chose a place."""
    params = inspect.signature(_import(class_path)).parameters
    init_args = _plain(entry.get("init_args"))
    if "Wandb" in class_path and init_args.get("dir"):
        return True
    return init_args.get("save_dir", params["save_dir"].default) != params["save_dir"].default


def allow_mlflow_file_store(logger_cfg: Any) -> None:
    """MLflow >= 3.x refuses its local file store unless MLFLOW_ALLOW_FILE_STORE is set ("maintenance mode"); a
    MLFlowLogger without a tracking URI asks for exactly that store, so opt in for this process."""
    for entry in _entries(logger_cfg):
        if "MLFlowLogger" in str(_class_path(entry)):
            uri = _plain(entry.get("init_args")).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
            if uri == "" or uri.startswith("file:") or "://" not in uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def defer_fold_loggers(trainer_cfg: Any) -> list[tuple[int, Any]]:
    """Take the W&B/MLflow logger entries without a save_dir out of `trainer_cfg.logger` (before LightningCLI
    instantiates it); returns (position, entry) pairs for `build_fold_loggers`."""
    logger_cfg = trainer_cfg.get("logger")
    allow_mlflow_file_store(logger_cfg)
    entries = _entries(logger_cfg)
    deferred = [(i, e) for i, e in enumerate(entries)
                if _class_path(e) in FOLD_SUBFOLDER and not _user_gave_dir(e, _class_path(e))]
    if deferred:
        kept = [e for i, e in enumerate(entries) if i not in {i for i, _ in deferred}]
        trainer_cfg.logger = kept if isinstance(logger_cfg, (list, tuple)) else False
    return deferred


def build_fold_loggers(logger: Any, deferred: list[tuple[int, Any]], output_folder: Path) -> Any:
    """Instantiate the deferred loggers with save_dir inside `output_folder`, back at their places in `logger`."""
    if not deferred:
        return logger
    loggers: list[Logger] = [lg for lg in (logger if isinstance(logger, (list, tuple)) else [logger])
                             if isinstance(lg, Logger)]
    for position, entry in deferred:
        class_path = _class_path(entry)
        init_args = {**_plain(entry.get("init_args")), **_plain(entry.get("dict_kwargs"))}
        # WANDB_DIR set: the user's choice, which Lightning's default save_dir "." would override
        wandb_dir = "Wandb" in class_path and os.environ.get("WANDB_DIR")
        init_args["save_dir"] = None if wandb_dir else str(output_folder / FOLD_SUBFOLDER[class_path])
        loggers.insert(position, _import(class_path)(**init_args))
    return loggers if len(loggers) > 1 or isinstance(logger, (list, tuple)) else loggers[0]
