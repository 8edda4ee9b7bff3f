"""The loggers users ask for, selected the LightningCLI way, on a real short training run: W&B offline and MLflow's
local file store write every epoch's figures, by default inside the fold's output folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args

from resenc_lightning.cli import build_cli, main

REPO = Path(__file__).resolve().parents[1]
EPOCH_KEYS = ("train_loss", "val_loss", "ema_fg_dice")


def nnunet_log(out: Path) -> dict[str, list]:
    """The per-epoch figures as the module recorded them (nnU-Net's logger), from the fold's last checkpoint."""
    log = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["nnunet"]["logging"]
    return {"train_loss": log["train_losses"], "val_loss": log["val_losses"], "ema_fg_dice": log["ema_fg_dice"]}


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run: its .wandb file is a LevelDB-style log (7-byte ':W&B' header, 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.fixture()
def wandb_offline(monkeypatch, tmp_path):
    """No network, nothing written outside tmp_path; the run is finished (flushed to disk) after the test."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    yield wandb
    wandb.finish()


@pytest.fixture()
def mlflow_local(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the CLI opts in for the file store itself
    monkeypatch.chdir(tmp_path)
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_wandb_offline_logs_every_epoch_in_the_fold_folder(tiny_dataset, results_dir, wandb_offline, tmp_path):
    out = main(tiny_args(results_dir, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                         "--trainer.logger.offline", "true", "--final_validation", "false"))
    wandb_offline.finish()  # what the end of `python train.py` does (atexit): flush the run to disk
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {out / 'wandb'}, found {runs}"
    assert not (tmp_path / "wandb").exists(), "W&B wrote into the current directory instead of the fold folder"
    rows = [r for r in wandb_history(next(runs[0].glob("run-*.wandb"))) if "train_loss" in r]
    assert [r["epoch"] for r in rows] == [0, 1]
    expected = nnunet_log(out)
    for key in EPOCH_KEYS:
        assert [r[key] for r in rows] == pytest.approx(expected[key], rel=1e-6), key
    assert all("lr" in r and "mean_fg_dice" in r and any(k.startswith("dice/") for k in r) for r in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())  # Lightning saves it in the logger's save_dir
    assert saved["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger", "rerun would lose W&B"


def test_mlflow_config_logs_every_epoch_to_a_file_store_in_the_fold_folder(tiny_dataset, results_dir, mlflow_local,
                                                                             tmp_path):
    out = main(tiny_args(results_dir, "--config", str(REPO / "configs" / "logger_mlflow.yaml"),
                         "--final_validation", "false"))
    assert not (tmp_path / "mlruns").exists(), "MLflow wrote into the current directory instead of the fold folder"
    runs = [p.parent for p in (out / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1, f"expected one MLflow run under {out / 'mlruns'}, found {runs}"
    expected = nnunet_log(out)
    for key in EPOCH_KEYS:
        # file store: one line per logged value, "<timestamp ms> <value> <step>"
        lines = (runs[0] / "metrics" / key).read_text().split("\n")
        values = [float(line.split()[1]) for line in lines if line.strip()]
        assert values == pytest.approx(expected[key], rel=1e-6), key
    assert (runs[0] / "metrics" / "lr").is_file() and (runs[0] / "metrics" / "dice").is_dir()
    saved = yaml.safe_load((out / "mlruns" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["experiment_name"] == "resenc-lightning"


def test_logger_placement_keeps_given_save_dirs_order_and_csv_default(tiny_dataset, results_dir, tmp_path, monkeypatch):
    """No training: the Trainer's loggers as the CLI builds them, from a YAML list and from flags."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger

    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "loggers.yaml"
    config.write_text(
        "trainer:\n  logger:\n"
        f"  - class_path: lightning.pytorch.loggers.CSVLogger\n    init_args: {{save_dir: {tmp_path / 'csv'}}}\n"
        "  - class_path: lightning.pytorch.loggers.WandbLogger\n    init_args: {offline: true}\n"
        f"  - class_path: lightning.pytorch.loggers.MLFlowLogger\n    init_args: {{save_dir: {tmp_path / 'ml'}}}\n"
    )
    cli = build_cli(tiny_args(results_dir, "--config", str(config)))  # flags and YAML mixed, as users do
    csv, wb, ml = cli.trainer.loggers
    assert isinstance(csv, CSVLogger) and csv.save_dir == str(tmp_path / "csv")
    assert isinstance(wb, WandbLogger) and wb.save_dir == str(cli.output_folder)
    assert isinstance(ml, MLFlowLogger) and ml.save_dir == str(tmp_path / "ml")  # given: kept

    cli = build_cli(tiny_args(results_dir, "--trainer.logger", "WandbLogger", "--trainer.logger.offline", "true"))
    assert cli.trainer.logger.save_dir == str(cli.output_folder)  # short class name, flags
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    cli = build_cli(tiny_args(results_dir, "--trainer.logger", "WandbLogger"))
    assert cli.trainer.logger.save_dir is None  # the user's WANDB_DIR wins (Lightning's "." would override it)

    cli = build_cli(tiny_args(results_dir))
    (csv,) = cli.trainer.loggers
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir).parent == cli.output_folder / "logs"


@pytest.mark.parametrize("name, logger", [("logger_wandb", "WandbLogger"), ("logger_mlflow", "MLFlowLogger")])
def test_logger_configs_combine_with_a_plans_config(name, logger, capsys):
    with pytest.raises(SystemExit) as e:
        build_cli(["--config", str(REPO / "configs" / "resenc_l.yaml"), "--config", str(REPO / "configs" / f"{name}.yaml"),
                   "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["class_path"].endswith(logger)
    assert printed["trainer"]["max_epochs"] == 1000 and printed["data"]["num_iterations_per_epoch"] == 250
